"""torchrun worker: context-parallel token weights == whole-sequence weights, for every preset.

Every rank builds the same full-sequence inputs from a fixed seed and computes the reference on
the whole sequence with cp_group=None. It then keeps its own tokens in Megatron's load-balanced
order (2*CP chunks, rank r keeps chunks r and 2*CP-1-r, as megatron.core.utils.
get_batch_on_this_cp_rank does), computes the weights with the world group as the CP group and
checks them against its slice of the reference; the weight statistics summed over ranks must
equal the single-rank ones. Exits non-zero on any mismatch; rank 0 prints WEIGHTING_CP_OK.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_tw.weighting import (PRESETS, WeightingConfig, build_weighting_config,  # noqa: E402
                                   compute_token_weights, weight_statistics)

SHORT_CONTEXT = 20


def split_for_cp_rank(tensor: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[b, S] -> [b, S / cp_size]: chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size."""
    b, s = tensor.shape
    chunks = tensor.view(b, 2 * cp_size, s // (2 * cp_size))
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1])
    return chunks.index_select(1, index).reshape(b, -1)


def make_inputs(seed: int, b: int = 4, s: int = 96):
    """Full-sequence inputs with ties, masked tokens (nan losses), a tiny and an empty row."""
    g = torch.Generator().manual_seed(seed)
    long = torch.rand(b, s, generator=g) * 8
    short = torch.rand(b, s, generator=g) * 8
    long[1], short[1] = (long[1] * 2).round() / 2, (short[1] * 2).round() / 2  # many ties
    short[3] = long[3]  # all-zero scores
    mask = (torch.rand(b, s, generator=g) < 0.85).float()
    mask[2] = 0
    mask[2, torch.randperm(s, generator=g)[:3]] = 1  # kappa * N < 1
    if seed % 2:
        mask[3] = 0  # no token at all
    long = torch.where(mask > 0, long, torch.nan)
    short = torch.where(mask > 0, short, torch.nan)
    positions = torch.arange(s).repeat(b, 1)
    samples = torch.tensor([3, 1 << 35, 17, 0])[:b]
    return long, short, mask, positions, samples


def configs():
    named = {name: build_weighting_config(name) for name in sorted(PRESETS)}
    named["sparse-0.1"] = build_weighting_config("sparse", sparsity=0.1)
    named["ppmi-s2"] = build_weighting_config("ppmi", shift=2.0, sparsity=0.5)
    named["softmax-sparse"] = WeightingConfig(transforms=("minus",), sparsity=0.3,
                                              normalization="softmax", temperature=0.5,
                                              interpolation=0.25)
    named["quotient-softmax"] = WeightingConfig(comparison="quotient", normalization="softmax")
    return named


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cp_group = dist.group.WORLD
    failures = []
    for seed in (0, 1):
        full = make_inputs(seed)
        local = [split_for_cp_rank(t, world, rank) for t in full[:4]] + [full[4]]
        for name, cfg in configs().items():
            kw = dict(config=cfg, seed=99, iteration=seed + 5)
            ref = compute_token_weights(*full, **kw)
            got = compute_token_weights(*local, **kw, cp_group=cp_group)
            want = split_for_cp_rank(ref, world, rank)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6) or \
                    not torch.equal(got != 0, want != 0):
                failures.append(f"weights {name} seed={seed}: max |diff| "
                                f"{(got - want).abs().max().item():.3g}")

            long, short, mask, positions, _ = full
            ref_stats = weight_statistics(ref, long, short, mask, positions,
                                          short_context=SHORT_CONTEXT)
            local_stats = weight_statistics(got, *local[:4], short_context=SHORT_CONTEXT,
                                            cp_group=cp_group)
            for key, value in local_stats.items():
                total = value.clone()
                dist.all_reduce(total, group=cp_group)
                if not torch.allclose(total, ref_stats[key], rtol=1e-5, atol=1e-5):
                    failures.append(f"statistic {key!r} {name} seed={seed}: summed "
                                    f"{total.tolist()} vs single-rank {ref_stats[key].tolist()}")
    for failure in failures:
        print(f"[rank {rank}] MISMATCH {failure}", flush=True)
    failed = torch.tensor([len(failures)])
    dist.all_reduce(failed)
    if rank == 0 and failed.item() == 0:
        print(f"WEIGHTING_CP_OK world={world} configs={len(configs())}", flush=True)
    dist.destroy_process_group()
    return 1 if failed.item() else 0


if __name__ == "__main__":
    sys.exit(main())
