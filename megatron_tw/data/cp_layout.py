"""The load-balanced context-parallel layout: which positions of a sequence a CP rank holds.

megatron's ``get_batch_on_this_cp_rank`` cuts each sequence into 2*CP chunks and CP rank r keeps
chunks r and 2*CP-1-r (so causal attention work is even across ranks). The batch path applies
that split (data/batch.py); the CP attention (model/cp_attention.py) and the scorers'
span planning (scoring/spans.py) read the same rule from here, the only place it is written.
"""

from __future__ import annotations

import torch


def owned_chunks(seq_length: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """[(a, b), (c, d)]: the global position ranges a CP rank holds (one range for CP=1)."""
    if cp_size == 1:
        return [(0, seq_length)]
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return [(first * chunk, (first + 1) * chunk), (second * chunk, (second + 1) * chunk)]


def query_runs(s_local: int, cp_size: int, cp_rank: int) -> list[tuple[int, int, int]]:
    """(local start, local end, global start) of each contiguous run of a rank's ``s_local``
    positions. Plain integers: no device tensor is read back to the host."""
    runs, local = [], 0
    for a, b in owned_chunks(s_local * cp_size, cp_size, cp_rank):
        runs.append((local, local + b - a, a))
        local += b - a
    return runs


def load_balanced_positions(s_local: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions [s_local] of the tokens a CP rank holds."""
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in owned_chunks(s_local * cp_size, cp_size, cp_rank)])


def local_index(position: int, seq_length: int, cp_size: int, cp_rank: int) -> int:
    """Index in this CP rank's [s / CP] tensors of a global position it owns."""
    offset = 0
    for a, b in owned_chunks(seq_length, cp_size, cp_rank):
        if a <= position < b:
            return offset + position - a
        offset += b - a
    raise ValueError(f"position {position} is not held by CP rank {cp_rank}")
