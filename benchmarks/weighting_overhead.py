"""Cost of the token weighting alone: weights + weighted loss, per preset, vs uniform.

Times `compute_token_weights` followed by the weighted loss sum(w * mask * L) / sum(mask) for
realistic sequence shapes, every preset side by side in one run (same process, same inputs,
interleaved repetitions so that machine noise hits all presets alike), and prints a table:
median milliseconds, the ratio to uniform and the added milliseconds. It isolates the weighting;
the scorer's extra forward pass and the whole training step are measured elsewhere.

    OMP_NUM_THREADS=1 python benchmarks/weighting_overhead.py [--seq-lens 8192 32768]
        [--reps 20] [--device cpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_tw.weighting import PRESETS, build_weighting_config, compute_token_weights  # noqa


def make_batch(batch: int, seq_len: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    long = (torch.rand(batch, seq_len, generator=g) * 6).to(device)
    short = (long.cpu() + torch.randn(batch, seq_len, generator=g) * 0.5).clamp(min=0).to(device)
    mask = torch.ones(batch, seq_len, device=device)
    mask[:, -1] = 0  # the last token has no label
    positions = torch.arange(seq_len, device=device).repeat(batch, 1)
    samples = torch.arange(batch, device=device)
    return long, short, mask, positions, samples


def weighted_loss_step(config, long, short, mask, positions, samples, iteration):
    weights = compute_token_weights(long, short, mask, positions, samples, config=config,
                                    seed=1234, iteration=iteration)
    return (weights * mask * long).sum() / mask.sum()


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(seq_lens, batch, reps, warmup, device):
    configs = {name: build_weighting_config(name) for name in PRESETS}
    rows = []
    for seq_len in seq_lens:
        inputs = make_batch(batch, seq_len, device)
        times = {name: [] for name in configs}
        for rep in range(warmup + reps):
            for name, cfg in configs.items():  # interleaved: noise is shared by all presets
                sync(device)
                start = time.perf_counter()
                weighted_loss_step(cfg, *inputs, iteration=rep)
                sync(device)
                if rep >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(times["uniform"])
        for name in configs:
            ms = statistics.median(times[name])
            rows.append(dict(seq_len=seq_len, batch=batch, preset=name, median_ms=ms,
                             ratio_to_uniform=ms / base, added_ms=ms - base))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    rows = run(args.seq_lens, args.batch, args.reps, args.warmup, args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          f"reps={args.reps} (median ms of weights + weighted loss)")
    print(f"{'seq_len':>8} {'preset':>8} {'ms':>9} {'x uniform':>10} {'+ms':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['preset']:>8} {r['median_ms']:>9.3f} "
              f"{r['ratio_to_uniform']:>10.1f} {r['added_ms']:>9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=args.device, threads=torch.get_num_threads(), rows=rows), f,
                      indent=2)


if __name__ == "__main__":
    main()
