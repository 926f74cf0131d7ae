"""What megatron-core 0.19.2 and megatron.training need to run on a CPU with gloo.

megatron-core assumes CUDA in a few dozen places (``device="cuda"`` literals, ``torch.cuda.*``
RNG and stream calls, tensor type-name assertions). On a machine without a GPU each of them
raises ``Torch not compiled with CUDA enabled`` or ``Found no NVIDIA driver``. Rather than fork
megatron, every such place is redirected here, in one module, each measure named and justified.

The measures are applied by :func:`apply` only when CUDA is absent (``megatron_tw.runtime``
checks); a test pins that nothing here is touched when CUDA is available. The training
mathematics is untouched: the CPU run executes the same megatron code path (schedules,
optimizer, distributed data parallel, checkpointing) with gloo instead of NCCL.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from typing import Any, Callable

import torch

# name -> one-line justification; filled by @_measure, read by tests and `describe()`.
MEASURES: dict[str, str] = {}
_APPLIED: list[str] = []


def _measure(why: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        MEASURES[fn.__name__] = why
        return fn

    return register


def _is_cuda_device(device: Any) -> bool:
    # An integer device means "accelerator index" (megatron passes torch.cuda.current_device()).
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _redirect_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return fn(*args, **kwargs)

    wrapper.__megatron_tw_cpu__ = True
    return wrapper


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "randperm", "zeros_like", "ones_like", "empty_like", "full_like", "linspace",
)


class _MegatronTorch(types.ModuleType):
    """What the name ``torch`` means inside megatron's modules on a CPU machine: the real torch,
    except that its tensor factories create on the CPU what megatron asks to create on a GPU.

    Scoped to megatron on purpose: replacing ``torch.zeros`` & co. process-wide changes how
    other libraries behave (transformers' meta-device initialisation then leaves RoPE buffers
    uninitialised), so only megatron's own lookups of ``torch.<factory>`` are redirected.
    """

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _redirect_device_kwarg(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_MEGATRON_TORCH = None


def _patch_module(module) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _MEGATRON_TORCH


class _PatchMegatronOnImport(importlib.abc.MetaPathFinder):
    """Gives megatron modules imported later (megatron imports lazily) the same ``torch``."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module, _exec=exec_module):
            _exec(module)
            _patch_module(module)

        spec.loader.exec_module = exec_and_patch
        return spec


@_measure("megatron creates tensors with device='cuda' or device=torch.cuda.current_device(), "
          "some pinned (pipeline schedules, optimizer, RoPE CP slicing, pretrain start-up): "
          "inside megatron's modules, create them on the CPU, unpinned")
def factory_device_redirect() -> None:
    global _MEGATRON_TORCH
    _MEGATRON_TORCH = _MegatronTorch()
    for name, module in list(sys.modules.items()):
        if name == "megatron" or name.startswith("megatron."):
            _patch_module(module)
    sys.meta_path.insert(0, _PatchMegatronOnImport())


@_measure("Tensor.cuda()/Module.cuda() and Tensor.to('cuda'|int) move data to the GPU: keep it on the CPU")
def tensor_to_cpu() -> None:
    original_to = torch.Tensor.to

    @functools.wraps(original_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


@_measure("megatron asserts tensor type names such as 'torch.cuda.FloatTensor' (grad clipping, "
          "mixed-precision optimizers): report CPU tensors under their CUDA type names")
def cuda_type_names() -> None:
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    torch.Tensor.type = type_


@_measure("torch.cuda.current_device/set_device/synchronize/streams/memory queries are called on "
          "the training path: answer them as a single 'device 0' with no memory pool")
def cuda_device_queries() -> None:
    class _Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a, **k):
            pass

        def synchronize(self):
            pass

        def record_event(self, *a, **k):
            return None

    import contextlib

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0


@_measure("the tensor-parallel RNG tracker saves and restores the CUDA generator: back it by the CPU "
          "generator, which is the one dropout and CPU initialisation draw from, so per-TP-rank streams "
          "keep their meaning")
def rng_on_cpu_generator() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # fork() warns when the CPU generator changes inside a "GPU" RNG context; here they are the
    # same generator by construction, so the warning is noise on every dropout call.
    class _DropCpuRngWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


@_measure("argument validation reads the GPU architecture for TP/CP>1 and then requires "
          "CUDA_DEVICE_MAX_CONNECTIONS=1 (a CUDA stream-ordering setting, meaningless on CPU)")
def device_arch_for_validation() -> None:
    import megatron.core.utils as mutils
    import megatron.training.arguments as margs

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # 0 = "not Blackwell or newer": megatron then takes its conservative code paths.
    for module in (mutils, margs):
        if hasattr(module, "get_device_arch_version"):
            module.get_device_arch_version = lambda: 0


@_measure("pretrain() calls initialize_megatron() without allow_no_cuda, which asserts CUDA; "
          "torch.distributed itself runs on gloo")
def allow_no_cuda() -> None:
    import megatron.training.initialize as minit
    import megatron.training.training as mtrain

    original = minit.initialize_megatron
    wrapped = functools.partial(original, allow_no_cuda=True)
    minit.initialize_megatron = wrapped
    mtrain.initialize_megatron = wrapped


@_measure("_initialize_distributed only builds the model-parallel groups when "
          "torch.cuda.device_count() > 0: build them (TP/PP/CP/DP/EP, same order flag) on CPU too")
def model_parallel_groups_without_gpu() -> None:
    import megatron.core.parallel_state as mpu
    import megatron.training.initialize as minit
    from megatron.training.global_vars import get_args

    original = minit._initialize_distributed

    @functools.wraps(original)
    def initialize_distributed(get_embedding_ranks, get_position_embedding_ranks, store,
                               skip_model_parallel_init=False):
        original(get_embedding_ranks, get_position_embedding_ranks, store,
                 skip_model_parallel_init=skip_model_parallel_init)
        if skip_model_parallel_init or mpu.model_parallel_is_initialized():
            return
        args = get_args()
        mpu.initialize_model_parallel(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            num_distributed_optimizer_instances=args.num_distributed_optimizer_instances,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
            get_embedding_ranks=get_embedding_ranks,
            get_position_embedding_ranks=get_position_embedding_ranks,
            create_gloo_process_groups=args.use_gloo_process_groups,
        )

    minit._initialize_distributed = initialize_distributed


@_measure("_set_random_seed only seeds the tensor-parallel RNG tracker when a GPU is present: "
          "seed it on CPU too (dropout and TP-sharded initialisation need its named streams)")
def seed_rng_tracker_without_gpu() -> None:
    import megatron.training.initialize as minit
    from megatron.core import tensor_parallel

    original = minit._set_random_seed

    @functools.wraps(original)
    def set_random_seed(seed_, *args, **kwargs):
        original(seed_, *args, **kwargs)
        tensor_parallel.model_parallel_cuda_manual_seed(seed_)

    minit._set_random_seed = set_random_seed


@_measure("set_jit_fusion_options() warms up fused kernels on device='cuda' (~20 s per process); "
          "the CPU run disables those fusions, so there is nothing to warm up")
def skip_jit_warmup() -> None:
    import megatron.training.training as mtrain

    mtrain.set_jit_fusion_options = lambda *a, **k: None


def apply() -> list[str]:
    """Apply every measure once (idempotent). Returns the names applied in this call."""
    applied = []
    for name in MEASURES:
        if name in _APPLIED:
            continue
        globals()[name]()
        _APPLIED.append(name)
        applied.append(name)
    return applied


def applied() -> list[str]:
    """Names of the measures applied in this process so far."""
    return list(_APPLIED)


def describe() -> str:
    """One line per measure, for logs and docs."""
    return "\n".join(f"- {name}: {why}" for name, why in MEASURES.items())
