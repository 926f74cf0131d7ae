"""Activation memory per rank of one forward/backward at CP=1 vs CP=2 (same sequence).

Counts the bytes autograd saves for the backward pass during the trainee's forward (the
activations; parameters excluded), per rank, with ``torch.autograd.graph.saved_tensors_hooks``
(storages counted once). With CP each rank keeps its own tokens' activations plus the K/V
all-gathered per layer ([s, b, ng, hn], small next to the rest); the causal attention of a
rank's chunks keeps nothing quadratic in s (megatron_tw/model/chunk_attention.py).
Run:   python benchmarks/cp_memory.py [--seq-length 4096]
It launches itself under torchrun with 1 and 2 processes and prints the per-rank ratio.
"""

import argparse
import os
import subprocess
import sys

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704",
         "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "2",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--micro-batch-size", "1", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "8000", "--attention-dropout", "0", "--hidden-dropout", "0"]


def worker(seq: int) -> None:
    import torch

    from megatron_tw import runtime

    runtime.prepare()
    from megatron.core import parallel_state
    from megatron.training.initialize import initialize_megatron

    from megatron_tw.arguments import parse_and_validate_args
    from megatron_tw.model.cp_attention import load_balanced_positions
    from megatron_tw.model.provider import model_provider

    parse_and_validate_args(MODEL + ["--seq-length", str(seq), "--max-position-embeddings",
                                     str(seq), "--context-parallel-size",
                                     os.environ["WORLD_SIZE"]])
    initialize_megatron(allow_no_cuda=True)
    model = model_provider()
    cp, rank = (parallel_state.get_context_parallel_world_size(),
                parallel_state.get_context_parallel_rank())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7999, (1, seq), generator=g)
    mine = load_balanced_positions(seq // cp, cp, rank) if cp > 1 else torch.arange(seq)
    # parameters are saved by linear layers too, but they are weights, not activations
    seen = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
            for p in model.parameters()}
    total = [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, mine], mine[None], None, labels=torch.roll(tokens, -1, 1)[:, mine])
    loss.sum().backward()
    print(f"ACTIVATIONS cp={cp} rank={rank} bytes={total[0]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.seq_length)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    per_rank = {}
    for n in (1, 2):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                              str(n), "--master-port", str(29700 + n), __file__, "--worker",
                              "--seq-length", str(a.seq_length)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=900)
        lines = [l for l in out.stdout.splitlines() if l.startswith("ACTIVATIONS")]
        if out.returncode or len(lines) != n:
            sys.exit(f"CP={n} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        per_rank[n] = max(int(l.rsplit("=", 1)[1]) for l in lines)
    print(f"| seq {a.seq_length} | CP=1 per rank | CP=2 per rank (max) | ratio |")
    print("|---|---|---|---|")
    print(f"| activations saved for backward | {per_rank[1] / 2**20:.1f} MiB | "
          f"{per_rank[2] / 2**20:.1f} MiB | {per_rank[2] / per_rank[1]:.3f} |")


if __name__ == "__main__":
    main()
