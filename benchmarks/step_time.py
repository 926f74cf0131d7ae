"""Training step time of each weighting preset and scorer, against uniform, side by side.

Every row is a real ``pretrain_tw.py`` run on the same model, data and seed (one process), timed
from megatron's per-iteration log; the table gives each row's fastest and median step time after
warm-up and their ratios to the uniform row of the same invocation. Rows:
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


def llama(hidden: int, ffn: int, layers: int, heads: int):
    """An untied HF Llama with the trainee's vocabulary and 2 K/V heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=False))


def make_scorer(path: str) -> float:
    """Saves the frozen scorer; returns its size as a fraction of the trainee's parameters."""
    import torch

    torch.manual_seed(0)
    scorer = llama(128, 352, 3, 4)
    scorer.save_pretrained(path)
    trainee_model = llama(256, 704, 4, 8)  # the architecture of trainee(), for its size
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(scorer) / count(trainee_model)


def run(script: str, args: list[str], timeout: int = 1800) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", "29811", script, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def emit(lines: list[str], out: str | None) -> None:
    """Print the table; also write it to ``out`` when given."""
    table = "\n".join(lines)
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


def step_times(log: str, warmup: int) -> list[float]:
    """Per-iteration wall times (ms) after ``warmup`` iterations, from megatron's log."""
    return [float(t) for it, t in re.findall(
        r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)", log)
        if int(it) > warmup]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3,
                   help="run every row this many times, interleaved (rows see the same machine "
                        "conditions); the ratio uses each row's fastest step over all rounds: on "
                        "a shared machine other jobs only ever slow a step down")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args()
    W = a.seq_length // 4
    tmp = tempfile.mkdtemp(prefix="tw-bench-")
    scorer = os.path.join(tmp, "scorer")
    scorer_fraction = make_scorer(scorer)
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
    times = {name: [] for name, _ in rows}
    for r in range(a.rounds):
        for name, args in rows:
            got = step_times(run("pretrain_tw.py", args), a.warmup)
            times[name] += got
            print(f"  round {r + 1}: {name}: median {statistics.median(got):.1f} ms, "
                  f"fastest {min(got):.1f} ms", flush=True)
    fastest = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    uniform, uniform_median = fastest["uniform"], median["uniform"]
    lines = [f"seq {a.seq_length}, trainee 4x256 (vocab 2048), frozen scorer 3x128 "
             f"({scorer_fraction:.2f} of the trainee's parameters); {a.iters - a.warmup} timed steps (after "
             f"{a.warmup} warm-up) x {a.rounds} interleaved rounds per row, one CPU process", "",
             "| run | fastest step (ms) | ratio to uniform | median step (ms) | ratio of medians |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {fastest[name]:.1f} | {fastest[name] / uniform:.3f} | "
              f"{median[name]:.1f} | {median[name] / uniform_median:.3f} |" for name, _ in rows]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
