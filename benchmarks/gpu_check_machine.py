"""The model and the machine of benchmarks/gpu_check.py: the model shapes (ModelShape, MODELS),
their parameter and FLOP counts (the formulas of gpu_check.py's docstring), the GPUs' dense peak
TFLOP/s, and the probe of the machine (CUDA device, versions, Transformer Engine and its FP8
recipes) with what follows from it (FP8 support, the --transformer-impl of a row).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from gpu_check_logs import error_line


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int

    def flags(self) -> list[str]:
        return ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
                "--ffn-hidden-size", str(self.ffn_hidden_size),
                "--num-attention-heads", str(self.num_attention_heads),
                "--group-query-attention", "--num-query-groups", str(self.num_query_groups),
                "--kv-channels", str(self.kv_channels),
                "--position-embedding-type", "rope", "--rotary-base", "500000",
                "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
                "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0"]


@dataclass(frozen=True)
class ModelDefaults:
    shape: ModelShape
    seq_length: int
    short_context: int
    global_batch_size: int
    lr: float
    ppl_length: int


MODELS = {  # Llama-3.2-1B's shape (tied embeddings), and a tiny model for CPU runs
    "llama-1b": ModelDefaults(ModelShape(16, 2048, 8192, 32, 8, 64, 128256), 8192, 4096, 4,
                              1e-4, 2048),
    "tiny": ModelDefaults(ModelShape(2, 64, 128, 4, 2, 16, 512), 256, 64, 2, 3e-3, 128),
}

# Dense (non-sparse) peak TFLOP/s by device-name pattern, checked in order.
PEAKS = [("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
         ("H100", {"bf16": 989.0, "fp8": 1979.0}),
         ("H200", {"bf16": 989.0, "fp8": 1979.0})]


def matmul_params(shape: ModelShape, vocab: int) -> int:
    """N: weight-matmul parameters of one forward (output layer included, embedding excluded)."""
    h, d_head = shape.hidden_size, shape.kv_channels
    d_attn = shape.num_attention_heads * d_head
    d_kv = shape.num_query_groups * d_head
    per_layer = h * (d_attn + 2 * d_kv) + d_attn * h + 3 * h * shape.ffn_hidden_size
    return shape.num_layers * per_layer + vocab * h


def total_params(shape: ModelShape, vocab: int) -> int:
    """All parameters with tied embeddings: matmul weights + two RMSNorms per layer + final norm
    (what megatron reports; the tied output layer shares the embedding)."""
    return matmul_params(shape, vocab) + (2 * shape.num_layers + 1) * shape.hidden_size


def flops_per_step(shape: ModelShape, vocab: int, seq_length: int, tokens: int) -> float:
    """F = 6 N T + 6 L s d_attn T (gpu_check.py's docstring)."""
    d_attn = shape.num_attention_heads * shape.kv_channels
    return (6.0 * matmul_params(shape, vocab) * tokens
            + 6.0 * shape.num_layers * seq_length * d_attn * tokens)


# -- the machine -------------------------------------------------------------------------------

_TE_PROBE = r"""
import json, importlib
import transformer_engine, transformer_engine.pytorch as te
out = {"version": getattr(transformer_engine, "__version__", "?")}
checks = {"fp8": ("is_fp8_available", "check_fp8_support"),
          "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
          "blockwise": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support")}
fp8 = importlib.import_module("transformer_engine.pytorch.fp8")
for name, (new, old) in checks.items():
    if hasattr(te, new):
        ok, why = getattr(te, new)(return_reason=True)
    elif hasattr(fp8, old):
        ok, why = getattr(fp8, old)()
    else:
        ok, why = None, "unknown to this Transformer Engine version"
    out[name] = [ok, why]
print("TE_PROBE " + json.dumps(out))
"""

# CUDA and the versions, in a child process: the check's own process never touches the GPU.
_MACHINE_PROBE = r"""
import importlib.metadata as md, importlib.util, json, torch
out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": "CPU",
       "capability": None, "memory_gib": None, "cuda_version": torch.version.cuda}
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, capability=[p.major, p.minor], memory_gib=p.total_memory / 2**30)
for name in ("megatron-core", "transformers", "sentencepiece", "tensorboard"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = None
spec = importlib.util.find_spec("megatron")
out["megatron_path"] = (list(spec.submodule_search_locations or [None])[0]
                        if spec is not None else None)
print("MACHINE " + json.dumps(out))
"""


def probe_machine() -> dict:
    """CUDA device and versions, and Transformer Engine (each imported in a child process: a
    broken install is reported, not fatal)."""
    info = {"torch": "?", "cuda": False, "device": "CPU", "capability": None, "memory_gib": None,
            "cuda_version": None, "megatron-core": None, "te_installed": False, "te": None,
            "te_error": None, "probe_error": None}
    proc = subprocess.run([sys.executable, "-c", _MACHINE_PROBE], capture_output=True,
                          text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MACHINE ")), None)
    if line:
        info.update(json.loads(line[len("MACHINE "):]))
    else:
        info["probe_error"] = error_line(proc.stdout + proc.stderr)
    import importlib.util

    info["te_installed"] = importlib.util.find_spec("transformer_engine") is not None
    if info["te_installed"]:
        proc = subprocess.run([sys.executable, "-c", _TE_PROBE], capture_output=True, text=True,
                              timeout=300)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("TE_PROBE ")), None)
        if proc.returncode == 0 and line:
            info["te"] = json.loads(line[len("TE_PROBE "):])
        else:
            info["te_error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return info


def te_reason(info: dict) -> Optional[str]:
    """None when Transformer Engine imports here, else why not."""
    if not info["te_installed"]:
        return "Transformer Engine not installed"
    if info["te"] is None:
        return f"Transformer Engine does not import ({info['te_error']})"
    return None


def fp8_recipe_support(info: dict, recipe: str) -> Optional[str]:
    """None when FP8 with ``recipe`` can run here, else the reason it cannot."""
    reasons = [r for r in (te_reason(info), None if info["cuda"] else "no CUDA GPU") if r]
    if reasons:
        return "; ".join(reasons)
    key = {"mxfp8": "mxfp8", "blockwise": "blockwise"}.get(recipe, "fp8")
    ok, why = info["te"][key]
    return None if ok in (True, None) else f"{why}"


def peak_tflops(info: dict, precision: str, args) -> Optional[float]:
    override = args.peak_bf16 if precision == "bf16" else args.peak_fp8
    if override:
        return override
    for pattern, peaks in PEAKS:
        if pattern in info["device"]:
            return peaks[precision]
    return None


def transformer_impl(args, info: dict, precision: str) -> str:
    if precision == "fp8" or args.impl == "transformer_engine":
        return "transformer_engine"  # FP8 GEMMs are Transformer Engine kernels
    if args.impl == "local":
        return "local"
    return "transformer_engine" if (info["cuda"] and te_reason(info) is None) else "local"

