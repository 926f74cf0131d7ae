"""Device, backend and start-up set-up shared by every entry point.

One code path runs everywhere: on a GPU machine training uses CUDA + NCCL (and Transformer Engine
when installed); without CUDA the same megatron code runs on the CPU with gloo, after the measures
in :mod:`megatron_tw.runtime.cpu` are applied. Nothing CPU-specific is applied when CUDA is
available (pinned by ``tests/unit/test_runtime.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

_PREPARED = False


def cuda_available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _te_probe():
    from megatron_tw.runtime.machine import probe_transformer_engine

    return probe_transformer_engine()


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension is installed *and imports* (a broken
    install would otherwise select the TE spec and fail deep inside TE)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    return _te_probe()[0]


def transformer_engine_error():
    """Why an installed Transformer Engine does not import (None when it imports or is absent)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    return _te_probe()[1]


def device_capability():
    """(major, minor) CUDA compute capability of the current device, or None without CUDA."""
    if not cuda_available():
        return None
    try:
        return torch.cuda.get_device_capability()
    except (RuntimeError, AssertionError):  # a driver problem: let CUDA report it later
        return None


def this_machine():
    """This machine as a :class:`~megatron_tw.runtime.machine.Machine` (from the probes above)."""
    from megatron_tw.runtime.machine import describe

    cuda = cuda_available()
    return describe(cuda, cuda and transformer_engine_available(),
                    device_capability() if cuda else None,
                    te_error=transformer_engine_error() if cuda else None)


def compute_device() -> torch.device:
    """The device of every buffer the project allocates (runtime/machine.py)."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """torch.distributed backend for this machine: NCCL with CUDA, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"


def _use_prebuilt_dataset_helpers() -> None:
    """megatron.training runs ``make -C megatron/core/datasets`` at start-up to build the dataset
    index helpers. The megatron-core wheel ships the compiled ``helpers_cpp`` extension but no
    Makefile, so that ``make`` fails and the job exits, on GPU machines as well. Use the shipped
    extension when it imports; fall back to megatron's own build otherwise (source checkouts).
    """
    import megatron.core.datasets.utils as dutils

    original = dutils.compile_helpers

    @functools.wraps(original)
    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    dutils.compile_helpers = compile_helpers


def prepare() -> list[str]:
    """Make megatron runnable on this machine. Call once, before megatron parses arguments.

    Returns the names of the CPU measures applied (empty when CUDA is available).
    """
    global _PREPARED
    if _PREPARED:
        from megatron_tw.runtime import cpu

        return cpu.applied()
    _PREPARED = True
    _use_prebuilt_dataset_helpers()
    if cuda_available():
        return []
    from megatron_tw.runtime import cpu

    return cpu.apply()
