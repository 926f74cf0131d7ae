"""The machine a run starts on, and every start-up decision that depends on it.

A :class:`Machine` is a plain description (CUDA? Transformer Engine importable? apex? compute
capability?); :func:`megatron_defaults` turns it into the defaults megatron's parser gets, and
:func:`compute_device` into the device every buffer the project allocates lives on. Because the
decisions are functions of a description, "CPU", "GPU without TE", "Ampere with TE" and "Hopper
with TE" are unit tests on any machine (tests/unit/test_machine.py), not only on the machine at
hand.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Optional

import torch

# Set to 1 to train on the CPU although GPUs are visible (e.g. to debug a driver problem).
ALLOW_CPU_ENV = "MEGATRON_TW_ALLOW_CPU"


@dataclasses.dataclass(frozen=True)
class Machine:
    cuda: bool                      # torch can use a CUDA device
    te: bool                        # Transformer Engine's PyTorch extension imports
    te_error: Optional[str] = None  # TE is installed but does not import: why
    apex: bool = False              # apex's fused CUDA kernels (persistent layer norm, wgrad)
    capability: Optional[tuple[int, int]] = None  # CUDA compute capability of the device
    gpus_visible: bool = False      # /dev/nvidia* exists (whatever torch says)

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores (Ada 8.9, Hopper 9.0 and newer) and TE to drive them."""
        return self.te and self.capability is not None and tuple(self.capability) >= (8, 9)


def probe_transformer_engine() -> tuple[bool, Optional[str]]:
    """(imports, error): TE is tried only when installed; a broken install (missing core
    library, built against another torch) imports with an error that is kept for the message."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, None
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, OSError (missing .so), RuntimeError (ABI)
        return False, f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return True, None


def probe_apex() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def describe(cuda: bool, te: bool, capability=None, te_error: Optional[str] = None) -> Machine:
    """A Machine from the runtime's probes (``megatron_tw.runtime``; tests replace the probes
    to describe another machine)."""
    return Machine(cuda=cuda, te=te, te_error=te_error, apex=cuda and probe_apex(),
                   capability=tuple(capability) if capability else None,
                   gpus_visible=bool(glob.glob("/dev/nvidia[0-9]*")))


def megatron_defaults(machine: Machine) -> dict:
    """Defaults for megatron's parser on ``machine`` (each flag can still be given; the start-up
    checks refuse what cannot work). Every default names why."""
    defaults = {
        # The method's loss is sum(w * mask * loss) / sum(mask) over the whole global batch:
        # megatron's per-token mode divides once by the global token count (upstream #7452).
        "calculate_per_token_loss": True,
        # Causal attention needs no [s, s] mask tensor: at 32k-128k tokens one costs GBs.
        "create_attention_mask_in_dataloader": False,
    }
    if not machine.cuda:
        defaults.update(
            transformer_impl="local",           # TE needs CUDA
            distributed_backend="gloo",         # NCCL needs CUDA
            use_cpu_initialization=True,        # also makes initial weights layout-independent
            gradient_accumulation_fusion=False,  # fused wgrad kernel is CUDA-only
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            no_persist_layer_norm=True,
            bias_swiglu_fusion=False,           # jit-fused elementwise kernels target CUDA
            bias_gelu_fusion=False,
            bias_dropout_fusion=False,
        )
        return defaults
    if not machine.te:
        # megatron's own modules; the fusions below are TE (or apex) kernels and raise without
        # them: TransformerConfig (apply_rope_fusion: "install TE >= 1.4"), WrappedTorchNorm
        # (persist_layer_norm) and tensor_parallel/layers.py (gradient_accumulation_fusion).
        defaults.update(transformer_impl="local", apply_rope_fusion=False,
                        no_persist_layer_norm=True, masked_softmax_fusion=False)
    if not (machine.te or machine.apex):
        defaults["gradient_accumulation_fusion"] = False
    return defaults


def compute_device(machine: Machine) -> torch.device:
    """Where the batch, the scores, the weights and every buffer the project allocates live:
    the current CUDA device (megatron's ``torch.cuda.set_device(local_rank)``) or the CPU."""
    if machine.cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_mode_refused(machine: Machine) -> Optional[str]:
    """Why training on the CPU must be refused here, or None: GPUs are visible, yet torch cannot
    use them (typically a driver older than the CUDA this torch was built for); the run would
    otherwise quietly train on gloo and the CPU."""
    if machine.cuda or not machine.gpus_visible or os.environ.get(ALLOW_CPU_ENV) == "1":
        return None
    return (f"GPUs are visible ({', '.join(sorted(glob.glob('/dev/nvidia[0-9]*'))[:2])}...) but "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them: "
            "torch.cuda.is_available() is False, usually a driver older than this CUDA (check "
            f"nvidia-smi); fix the driver or torch, or set {ALLOW_CPU_ENV}=1 to train on the CPU")
