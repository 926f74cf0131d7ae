#!/usr/bin/env python
"""One-GPU check of the GPU path: Transformer Engine imports, and bf16 and FP8 training steps of a
~1B Llama-style model with token weighting off (uniform) and on (dense), as a table.

    bash benchmarks/gpu_check.sh [options]      # = python benchmarks/gpu_check.py [options]
    python benchmarks/gpu_check.py --seq-length 16384 --rows bf16-uniform,fp8-uniform
    python benchmarks/gpu_check.py --dry-run    # print the commands only

Each row is one short run of ``pretrain_tw.py`` in one process on megatron's ``--mock-data``
(Llama-3.2-1B's shape by default: 16 layers, hidden 2048, 32 heads / 8 KV groups, SwiGLU 8192,
vocabulary 128,256, tied embeddings). Its log is kept under ``--log-dir``.

    step time  median of megatron's "elapsed time per iteration" after ``--warmup`` iterations
    tokens/s   T / step time, T = global batch x sequence length (tokens per step)
    TFLOP/s    F / step time, the trained model's FLOPs per step (causal attention):
                 F = 6 N T + 6 L s d_attn T
                 N = L (h (d_attn + 2 g d_head) + d_attn h + 3 h f) + V h
               N counts the weight-matmul parameters (q, k/v, o, SwiGLU MLP, output layer over
               the padded vocabulary V; embedding lookups do no matmul): 2 N T forward + 4 N T
               backward. Attention adds QK^T and AV: 4 s d_attn per token forward over full
               attention, halved by the causal mask, times 3 with the backward.
               (L layers, h hidden, f MLP width, d_attn = heads x d_head, g KV groups, s sequence)
               The dense row's scorer forward is overhead, not counted: weighting shows as lower
               TFLOP/s at the same F.
    MFU        TFLOP/s / the GPU's dense peak (H100/H200 SXM: bf16 989, FP8 1979 TFLOP/s;
               --peak-bf16/--peak-fp8 for other GPUs)

Where Transformer Engine is absent the bf16 rows run with ``--transformer-impl local`` and the
FP8 rows are marked skipped; without CUDA every row is skipped unless ``--allow-cpu`` (the bf16
rows then run on the CPU, for a tiny model). Exit status: 0 when every row that could run ran,
1 when a row failed or nothing could run.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


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


# name -> (shape, default sequence length, default short context for the dense rows)
MODELS = {
    "llama-1b": (ModelShape(16, 2048, 8192, 32, 8, 64, 128256), 8192, 4096),
    "tiny": (ModelShape(2, 64, 128, 4, 2, 16, 512), 256, 64),
}
ROWS = {  # name -> (precision, --tw-* flags without the short context)
    "bf16-uniform": ("bf16", ["--tw-preset", "uniform"]),
    "bf16-dense": ("bf16", ["--tw-preset", "dense"]),
    "fp8-uniform": ("fp8", ["--tw-preset", "uniform"]),
    "fp8-dense": ("fp8", ["--tw-preset", "dense"]),
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
    """F = 6 N T + 6 L s d_attn T (module docstring)."""
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


def probe_machine() -> dict:
    """CUDA device and Transformer Engine (imported in a child process: a broken TE install is
    reported, not fatal)."""
    import importlib.util
    import json

    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": "CPU",
            "capability": None, "te_installed": importlib.util.find_spec("transformer_engine") is not None,
            "te": None, "te_error": None}
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = torch.cuda.get_device_capability(0)
    if info["te_installed"]:
        proc = subprocess.run([sys.executable, "-c", _TE_PROBE], capture_output=True, text=True,
                              timeout=300)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("TE_PROBE ")), None)
        if proc.returncode == 0 and line:
            info["te"] = json.loads(line[len("TE_PROBE "):])
        else:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            info["te_error"] = tail
    return info


def fp8_recipe_support(info: dict, recipe: str) -> Optional[str]:
    """None when FP8 with ``recipe`` can run here, else the reason it cannot."""
    reasons = []
    if not info["te_installed"]:
        reasons.append("Transformer Engine not installed")
    elif info["te"] is None:
        reasons.append(f"Transformer Engine does not import ({info['te_error']})")
    if not info["cuda"]:
        reasons.append("no CUDA GPU")
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


# -- one row -----------------------------------------------------------------------------------

def row_command(row: str, args, info: dict) -> list[str]:
    shape, _, _ = MODELS[args.model]
    precision, tw = ROWS[row]
    # FP8 GEMMs are Transformer Engine kernels; bf16 falls back to megatron's local modules.
    impl = ("transformer_engine" if precision == "fp8" or (info["te"] is not None and info["cuda"])
            else "local")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(ROOT / "pretrain_tw.py"), *shape.flags(),
           "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
           "--micro-batch-size", "1", "--global-batch-size", str(args.global_batch_size),
           "--train-iters", str(args.iters), "--lr", "1e-5", "--min-lr", "1e-5",
           "--lr-decay-style", "constant", "--mock-data", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", str(shape.vocab_size), "--make-vocab-size-divisible-by", "128",
           "--seed", "1234", "--log-interval", "1", "--log-throughput",
           "--eval-iters", "0", "--eval-interval", "1000000",
           "--bf16", "--transformer-impl", impl, *tw]
    if "dense" in row:
        cmd += ["--tw-short-context", str(args.short_context)]
    if precision == "fp8":
        cmd += ["--fp8-format", "hybrid", "--fp8-recipe", args.fp8_recipe]
        if args.fp8_recipe == "delayed":
            cmd += ["--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_STEP_MS = re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.]+)")
_MEGATRON_TFLOPS = re.compile(r"throughput per GPU \(TFLOP/s/GPU\):\s*([0-9.]+)")
_PARAMS = re.compile(r"number of parameters on \([^)]*\) model parallel rank \([0, ]*\):\s*(\d+)")
_PADDED_VOCAB = re.compile(r"padded vocab \(size: \d+\) with \d+ dummy tokens \(new size: (\d+)\)")
_MAX_ALLOC = re.compile(r"max allocated:\s*([0-9.]+)")


def parse_log(text: str, warmup: int) -> dict:
    """Step times (ms) after ``warmup`` iterations, megatron's own TFLOP/s, parameter count,
    padded vocabulary and peak allocated memory (MB), from one run's console output."""
    steps, megatron_tflops = {}, {}
    for line in text.splitlines():
        m = _ITERATION.search(line)
        if not m:
            continue
        it = int(m.group(1))
        if (t := _STEP_MS.search(m.group(2))):
            steps[it] = float(t.group(1))
        if (f := _MEGATRON_TFLOPS.search(m.group(2))):
            megatron_tflops[it] = float(f.group(1))
    kept = [ms for it, ms in sorted(steps.items()) if it > warmup]
    found = lambda rx, cast: cast(m.group(1)) if (m := rx.search(text)) else None  # noqa: E731
    return {"step_ms": statistics.median(kept) if kept else None, "steps": len(kept),
            "megatron_tflops": (statistics.median(v for it, v in megatron_tflops.items()
                                                  if it > warmup)
                                if any(it > warmup for it in megatron_tflops) else None),
            "params": found(_PARAMS, int), "padded_vocab": found(_PADDED_VOCAB, int),
            "max_alloc_mb": max((float(x) for x in _MAX_ALLOC.findall(text)), default=None) or None}


# The exception a failed worker raised, or the start-up error pretrain_tw.py printed; torchrun's
# own ChildFailedError report that follows it says nothing about the cause.
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]*(?:Error|Exception)|pretrain_tw\.py: error): ")


def error_line(output: str) -> str:
    lines = [x.strip() for x in output.splitlines()
             if _ERROR_LINE.match(x.strip()) and "ChildFailedError" not in x]
    if lines:
        return lines[-1]
    tail = output.strip().splitlines()
    return tail[-1].strip() if tail else "no output"


def run_row(row: str, args, info: dict) -> dict:
    precision, _ = ROWS[row]
    result = {"row": row, "precision": precision, "status": "ok"}
    skip = None
    if not info["cuda"] and not args.allow_cpu:
        skip = "no CUDA GPU (--allow-cpu runs the bf16 rows on the CPU)"
    elif precision == "fp8":
        skip = fp8_recipe_support(info, args.fp8_recipe)
    cmd = row_command(row, args, info)
    if args.dry_run:
        result["status"] = "dry run" + (f" (here: skipped, {skip})" if skip else "")
        result["command"] = cmd
        return result
    if skip:
        result["status"] = f"skipped: {skip}"
        return result
    result["impl"] = cmd[cmd.index("--transformer-impl") + 1]
    log = Path(args.log_dir) / f"{row}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        code = f"timeout after {args.timeout} s"
    log.write_text(output)
    result.update(parse_log(output, args.warmup), log=str(log))
    if code != 0 or result["step_ms"] is None:
        why = f"exit {code}" if code != 0 else "no timed iteration after the warm-up"
        result["status"] = f"FAILED ({why}): {error_line(output)[:240]} [log: {log}]"
    return result


# -- the table ---------------------------------------------------------------------------------

def add_figures(result: dict, args, info: dict) -> None:
    shape, _, _ = MODELS[args.model]
    vocab = result.get("padded_vocab") or shape.vocab_size
    result["params_formula"] = total_params(shape, vocab)
    if result.get("step_ms") is None:
        return
    tokens = args.global_batch_size * args.seq_length
    seconds = result["step_ms"] / 1000.0
    result["tokens_per_s"] = tokens / seconds
    result["tflops"] = flops_per_step(shape, vocab, args.seq_length, tokens) / seconds / 1e12
    peak = peak_tflops(info, result["precision"], args)
    result["mfu"] = result["tflops"] / peak if (peak and info["cuda"]) else None


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == ".1f" and abs(value) < 10:  # tiny CPU runs: keep three significant digits
        spec = ".3g"
    return format(value, spec)


def render(results: list[dict], args, info: dict) -> str:
    shape, _, _ = MODELS[args.model]
    te = info["te"]["version"] if info["te"] else ("not installed" if not info["te_installed"]
                                                  else f"does not import: {info['te_error']}")
    lines = [f"# GPU check: {args.model}, seq {args.seq_length}, global batch "
             f"{args.global_batch_size}, {args.iters} iterations ({args.warmup} warm-up)", "",
             f"- device: {info['device']} (capability {info['capability']}), torch "
             f"{info['torch']}, Transformer Engine {te}",
             f"- FP8 recipe: hybrid / {args.fp8_recipe}; dense rows: --tw-short-context "
             f"{args.short_context}",
             "- TFLOP/s = (6 N T + 6 L s d_attn T) / step time; MFU against the dense peak", "",
             "| row | impl | step time (ms) | tokens/s | TFLOP/s | MFU | megatron TFLOP/s "
             "| max alloc (GB) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r.get("max_alloc_mb")
        lines.append(
            f"| {r['row']} | {r.get('impl', '-')} | {_fmt(r.get('step_ms'), '.1f')} "
            f"| {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('tflops'), '.1f')} "
            f"| {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('megatron_tflops'), '.1f')} "
            f"| {_fmt(mem / 1024 if mem else None, '.1f')} | {r['status']} |")
    for r in results:
        if r.get("params") is not None and r["params"] != r.get("params_formula"):
            lines.append(f"\nwarning: {r['row']}: megatron reports {r['params']:,} parameters, "
                         f"the FLOP formula assumes {r['params_formula']:,}")
    for r in results:
        if "command" in r:
            lines.append(f"\n{r['row']}:\n    " + " ".join(r["command"]))
    n = matmul_params(shape, next((r["padded_vocab"] for r in results if r.get("padded_vocab")),
                                  shape.vocab_size))
    lines.append(f"\nN = {n:,} matmul parameters; T = {args.global_batch_size * args.seq_length:,}"
                 " tokens per step")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    p.add_argument("--seq-length", type=int, default=None, help="default: the model's (8192)")
    p.add_argument("--short-context", type=int, default=None,
                   help="dense rows' --tw-short-context (default: the model's, 4096)")
    p.add_argument("--global-batch-size", type=int, default=4,
                   help="sequences per step (micro-batch 1, accumulated)")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="iterations left out of the median")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
                   default="delayed")
    p.add_argument("--peak-bf16", type=float, default=None, help="dense bf16 peak TFLOP/s")
    p.add_argument("--peak-fp8", type=float, default=None, help="dense FP8 peak TFLOP/s")
    p.add_argument("--log-dir", default="/tmp/tw_gpu_check")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the bf16 rows on "
                   "the CPU (use --model tiny)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    _, seq, short = MODELS[args.model]
    args.seq_length = args.seq_length or seq
    args.short_context = args.short_context or min(short, args.seq_length // 2)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if args.iters <= args.warmup:
        p.error(f"--iters {args.iters} must exceed --warmup {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    info = probe_machine()
    results = []
    for row in args.rows:
        print(f"[gpu_check] {row} ...", file=sys.stderr, flush=True)
        result = run_row(row, args, info)
        add_figures(result, args, info)
        results.append(result)
    table = render(results, args, info)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    failed = [r for r in results if r["status"].startswith("FAILED")]
    ran = [r for r in results if r["status"] == "ok"]
    if failed or (not ran and not args.dry_run):
        print("gpu_check: " + (f"{len(failed)} row(s) failed, logs above" if failed
                               else "nothing could run on this machine"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
