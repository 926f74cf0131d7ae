"""The command lines benchmarks/gpu_check.py runs: the pretrain rows (ROWS, their
pretrain_tw.py flags), tools/score_data.py, tools/evaluate.py, the fixtures and the attention
cases, the work paths they share, and the environment of a child process.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from gpu_check_machine import MODELS, transformer_impl

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# pretrain rows: name -> (precision, --tw-* flags; W = the short context, WW/SS = windows mode)
ROWS = {
    "uniform": ("bf16", ["--tw-preset", "uniform"]),
    "dense-self-sliding": ("bf16", ["--tw-preset", "dense", "--tw-scorer", "self",
                                    "--tw-short-context", "W", "--tw-short-mode", "sliding"]),
    "dense-self-windows": ("bf16", ["--tw-preset", "dense", "--tw-scorer", "self",
                                    "--tw-short-context", "WW", "--tw-short-mode", "windows",
                                    "--tw-short-stride", "SS"]),
    "dense-frozen": ("bf16", ["--tw-preset", "dense", "--tw-scorer", "frozen",
                              "--tw-scorer-load", "SCORER", "--tw-short-context", "W",
                              "--tw-short-mode", "sliding"]),
    "sparse-precomputed": ("bf16", ["--tw-preset", "sparse", "--tw-scorer", "precomputed",
                                    "--tw-short-context", "W", "--tw-short-mode", "sliding",
                                    "--tw-short-loss-path", "SIDECAR"]),
    "fp8-uniform": ("fp8", ["--tw-preset", "uniform"]),
    "fp8-dense": ("fp8", ["--tw-preset", "dense", "--tw-scorer", "self",
                          "--tw-short-context", "W", "--tw-short-mode", "sliding"]),
}


def paths(args) -> dict:
    work = Path(args.log_dir)
    return {"work": work, "fixtures": work / "fixtures", "scorer": work / "fixtures" / "scorer",
            "tokenizer": work / "fixtures" / "tok.model",
            "heldout": work / "fixtures" / "heldout.jsonl", "sidecar": work / "sidecar" / "mock",
            "ckpt": work / "ckpt-uniform", "eval": work / "eval-uniform"}


def windows_setting(seq: int) -> tuple[int, int]:
    """W and S of the windows row: windows of W = seq/2 + 1 tokens every S = seq/4 tile the
    sample of seq + 1 tokens ((seq + 1 - W) divisible by S)."""
    return seq // 2 + 1, seq // 4


def base_flags(args) -> list[str]:
    shape = MODELS[args.model].shape
    return [*shape.flags(),
            "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
            "--micro-batch-size", "1", "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(args.iters), "--lr", str(args.lr), "--min-lr", str(args.lr),
            "--lr-decay-style", "constant", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(shape.vocab_size), "--make-vocab-size-divisible-by", "128",
            "--seed", "1234", "--log-interval", "1", "--log-throughput",
            "--eval-iters", "0", "--eval-interval", "1000000", "--bf16"]


def _substitute(flags: list[str], args) -> list[str]:
    p = paths(args)
    ww, ss = windows_setting(args.seq_length)
    values = {"W": str(args.short_context), "WW": str(ww), "SS": str(ss),
              "SCORER": str(p["scorer"]), "SIDECAR": str(p["sidecar"])}
    return [values.get(f, f) for f in flags]


def row_flags(row: str, args, info: dict) -> list[str]:
    """The pretrain_tw.py flags of one pretrain row."""
    precision, tw = ROWS[row]
    flags = [*base_flags(args), "--transformer-impl", transformer_impl(args, info, precision),
             *_substitute(tw, args)]
    if precision == "fp8":
        flags += ["--fp8-format", "hybrid", "--fp8-recipe", args.fp8_recipe]
        if args.fp8_recipe == "delayed":
            flags += ["--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"]
    if row == "uniform":  # its checkpoint is the evaluate row's model (weights only)
        flags += ["--save", str(paths(args)["ckpt"]), "--save-interval", str(args.iters),
                  "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng"]
    return flags + extra_flags(args, row)


def extra_flags(args, name: str) -> list[str]:
    out = []
    for target, flags in args.row_extra:
        if target in (name, "all"):
            out += flags
    return out


def row_command(row: str, args, info: dict) -> list[str]:
    """One pretrain row: ``python benchmarks/gpu_check_train.py <flags>`` (one process; the
    launcher is pretrain_tw.main with the host-sync counter)."""
    return [sys.executable, str(BENCH / "gpu_check_train.py"), *row_flags(row, args, info)]


def score_command(args, info: dict) -> list[str]:
    """tools/score_data.py with the sparse row's own flags (the sidecar matches its samples)."""
    flags = [f for f in row_flags("sparse-precomputed", args, info)]
    i = flags.index("--tw-scorer")
    del flags[i:i + 2]
    return [sys.executable, str(ROOT / "tools" / "score_data.py"), *flags,
            "--tw-scorer-load", str(paths(args)["scorer"]), "--no-progress",
            *extra_flags(args, "score_data")]


def eval_command(args, info: dict) -> list[str]:
    p = paths(args)
    length = min(args.ppl_length, args.seq_length)
    return [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(p["ckpt"]),
            "--model-type", "megatron", "--tokenizer", str(p["tokenizer"]),
            "--heldout", str(p["heldout"]), "--ppl-length", str(length),
            "--ppl-sequences", "4", "--batch-size", "2",
            "--dtype", "bfloat16" if info["cuda"] else "float32",
            "--device", "cuda" if info["cuda"] else "cpu", "--out", str(p["eval"]),
            *extra_flags(args, "evaluate")]


def fixtures_command(args) -> list[str]:
    shape = MODELS[args.model].shape
    return [sys.executable, str(BENCH / "gpu_check_fixtures.py"), "--out",
            str(paths(args)["fixtures"]), "--vocab", str(shape.vocab_size),
            "--max-positions", str(max(args.seq_length, 2048))]


def attention_command(args, info: dict, out: Path) -> list[str]:
    a = attention_settings(args, info)
    return [sys.executable, str(BENCH / "gpu_check_attention.py"),
            "--device", "cuda" if info["cuda"] else "cpu", "--lengths", a["lengths"],
            "--heads", str(a["heads"]), "--kv-groups", str(a["kv_groups"]),
            "--head-dim", str(a["head_dim"]), "--window", str(a["window"]),
            "--rows", str(args.attn_rows), "--out", str(out), *extra_flags(args, "attention")]


def attention_settings(args, info: dict) -> dict:
    cpu = not info["cuda"]  # small sizes on the CPU (--allow-cpu)
    return {"lengths": args.attn_lengths or ("512,1024" if cpu else "16384,32768"),
            "window": args.attn_window or (128 if cpu else 4096),
            "heads": 4 if cpu else 8, "kv_groups": 2, "head_dim": 64 if cpu else 128}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(sync_debug: bool = False) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # one process, no torchrun: the rendezvous torchrun would set
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.setdefault("OMP_NUM_THREADS", "1")
    if sync_debug:
        env["GPU_CHECK_SYNC_DEBUG"] = "1"
    return env
