"""Training step time of each weighting preset and scorer, against uniform, side by side.

Every row is a real ``pretrain_tw.py`` run on the same model, data and seed (one process), timed
from megatron's per-iteration log; the table gives the median step time after warm-up and its
ratio to the uniform run of the same invocation. Rows:
  * each preset with the same precomputed short-context losses (the weighting's own cost),
  * the scorers with the dense preset: precomputed, a frozen scorer ~1/4 of the trainee's size,
    self with sliding-window scoring at sequence length 4W, self with the reference's windows.

    python benchmarks/step_time.py [--iters 12] [--seq-length 1024] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trainee(seq: int) -> list[str]:
    return ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704",
            "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "2",
            "--seq-length", str(seq), "--max-position-embeddings", str(seq),
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
            "--disable-bias-linear", "--untie-embeddings-and-output-weights",
            "--attention-dropout", "0", "--hidden-dropout", "0",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "2048",
            "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
            "--eval-interval", "100000"]


def make_scorer(path: str) -> float:
    """A frozen HF scorer with the trainee's vocabulary; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=False))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run(script: str, args: list[str], timeout: int = 1800) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", "29811", script, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def step_ms(log: str, warmup: int) -> float:
    times = [float(t) for it, t in re.findall(
        r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)", log)
        if int(it) > warmup]
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3,
                   help="run every row this many times, interleaved; report the fastest median "
                        "(on a shared machine other jobs only ever slow a run down)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args()
    W = a.seq_length // 4
    tmp = tempfile.mkdtemp(prefix="tw-bench-")
    scorer = os.path.join(tmp, "scorer")
    scorer_params = make_scorer(scorer)
    base = trainee(a.seq_length) + ["--train-iters", str(a.iters)]
    sidecar = ["--tw-short-loss-path", os.path.join(tmp, "short_loss"),
               "--tw-short-context", str(W), "--tw-short-mode", "sliding"]
    # score the run's samples once with the frozen scorer (the precomputed rows read them)
    run("tools/score_data.py", base + ["--tw-preset", "dense", "--tw-scorer-load", scorer]
        + sidecar)

    rows = [("uniform", base)]
    for preset in ("dense", "sparse", "longce", "ppmi", "npmi"):
        rows.append((f"{preset}, precomputed",
                     base + ["--tw-preset", preset, "--tw-scorer", "precomputed"] + sidecar))
    rows.append((f"dense, frozen scorer (online, sliding W={W})",
                 base + ["--tw-preset", "dense", "--tw-scorer", "frozen", "--tw-scorer-load",
                         scorer, "--tw-short-context", str(W), "--tw-short-mode", "sliding"]))
    rows.append((f"dense, self scorer, sliding W={W} (seq = 4W)",
                 base + ["--tw-preset", "dense", "--tw-scorer", "self", "--tw-short-context",
                         str(W), "--tw-short-mode", "sliding"]))
    rows.append((f"dense, self scorer, windows W={W} S={W // 2}",
                 base + ["--tw-preset", "dense", "--tw-scorer", "self", "--tw-short-context",
                         str(W), "--tw-short-mode", "windows", "--tw-short-stride", str(W // 2)]))
    best = {name: float("inf") for name, _ in rows}
    for r in range(a.rounds):
        for name, args in rows:
            ms = step_ms(run("pretrain_tw.py", args), a.warmup)
            best[name] = min(best[name], ms)
            print(f"  round {r + 1}: {name}: {ms:.1f} ms", flush=True)
    results = [(name, best[name]) for name, _ in rows]
    uniform = results[0][1]
    lines = [f"seq {a.seq_length}, trainee 4x256 (vocab 2048), frozen scorer "
             f"{scorer_params / 1e6:.2f}M params; median step after {a.warmup} warm-up steps of "
             f"{a.iters}, fastest of {a.rounds} interleaved rounds, one CPU process", "",
             "| run | step (ms) | ratio to uniform |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / uniform:.3f} |" for name, ms in results]
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
