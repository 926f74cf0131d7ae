"""Sparsification: a binary mask on the top floor(kappa * N) tokens of each sequence by score.

Layout independence is the point of this file. The selection must not depend on how the sequence
is split over context-parallel ranks, so:
- the scores of the whole sequence are gathered over the CP group ([b, s_local] floats per rank,
  the only data of sequence size that is communicated), and every rank computes the same
  selection on the whole sequence, then keeps its own slice;
- the order is total and a pure function of the data: score (descending), then a pseudo-random
  tie-break key (descending) that is a hash of (seed, iteration, sample id, global position),
  then the global position itself (ascending) in the astronomically rare case of equal keys.
The key makes ties (e.g. many exact zeros after `max`) fall at random, as the method asks, yet
reproducibly: the same batch at the same iteration gives the same weights on any layout.

Rule for small sequences: k = floor(kappa * N) with N the number of loss-masked tokens; when
kappa * N < 1 and N >= 1, exactly one token (the top one) is kept, never all and never none.
Positions outside the loss mask are never selected and never count in N.
"""

from __future__ import annotations

import torch

from megatron_tw.weighting.comm import cp_gather_seq, cp_rank

_MASK32 = 0xFFFFFFFF
# floor(kappa * N) is evaluated in float64, where e.g. 0.29 * 100 = 28.999999999999996. The slack
# restores the decimal intent; it is far below the distance 1/N of kappa*N to the next integer
# for any realistic kappa (<= 6 decimals) and N (<= 2^20 tokens).
_FLOOR_SLACK = 1e-9
# Independent hash streams: the 62-bit key is built from two 31-bit hashes.
_SALTS = (0x2545F491, 0x6C8E9CF5)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, exactly, without int64 overflow.

    A plain int64 product of two 32-bit values can exceed 2^63; splitting x in 16-bit halves
    keeps every intermediate below 2^49, so the result is the same on every device.
    """
    low = (x & 0xFFFF) * c
    high = ((x >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer ("lowbias32"): x in [0, 2^32) -> well-mixed x in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fold a 64-bit integer (tensor, broadcastable to h) into the 32-bit hash state h."""
    h = _mix32(h ^ (value & _MASK32))
    return _mix32(h ^ ((value >> 32) & _MASK32))


def tie_break_keys(seed: int, iteration: int, sample_ids: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 keys in [0, 2^62), a pure function of the four inputs.

    sample_ids: [b] int64; position_ids: [b, s] int64 (global positions).
    Returns [b, s] int64. Integer-only arithmetic: identical on CPU and GPU and for every
    parallel layout.
    """
    device = position_ids.device
    positions = position_ids.to(torch.int64)
    scalars = torch.tensor([seed, iteration], dtype=torch.int64, device=device)
    samples = sample_ids.to(device=device, dtype=torch.int64).reshape(-1, 1)
    halves = []
    for salt in _SALTS:
        h = torch.full((1, 1), salt, dtype=torch.int64, device=device)
        h = _absorb(h, scalars[0])
        h = _absorb(h, scalars[1])
        h = _absorb(h, samples)  # [b, 1]: per-row prefix, computed once per sequence
        h = _absorb(h, positions)  # [b, s]
        halves.append(h >> 1)  # 31 bits
    return (halves[0] << 31) | halves[1]


def num_selected(kappa: float, num_tokens: torch.Tensor) -> torch.Tensor:
    """k = floor(kappa * N), but 1 when kappa * N < 1 <= N. num_tokens: [b] -> [b] int64."""
    n = num_tokens.to(torch.float64)
    k = torch.floor(n * kappa + _FLOOR_SLACK).to(torch.int64)
    return torch.where((k < 1) & (n >= 1), torch.ones_like(k), k)


def top_kappa_mask(scores: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor,
                   sample_ids: torch.Tensor, *, kappa: float, seed: int, iteration: int,
                   cp_group=None) -> torch.Tensor:
    """Binary mask of the top-k loss-masked tokens of each whole sequence (see module docstring).

    scores: [b, s_local] float64; valid: [b, s_local] bool (the loss mask);
    position_ids: [b, s_local] int64 global positions; sample_ids: [b] int64.
    Gathers scores, positions and the mask over `cp_group` (the whole sequence; no other group).
    Returns [b, s_local] float64 in {0, 1}.
    """
    s_local = scores.shape[1]
    full_scores = cp_gather_seq(torch.where(valid, scores, 0.0), cp_group)
    full_meta = cp_gather_seq(torch.stack([position_ids.to(torch.int64), valid.to(torch.int64)]),
                              cp_group)
    full_pos, full_valid = full_meta[0], full_meta[1]
    keys = tie_break_keys(seed, iteration, sample_ids, full_pos)

    # Lexicographic order by (valid desc, score desc, key desc, position asc), built from the
    # least significant criterion up with stable sorts.
    order = torch.argsort(full_pos, dim=1, stable=True)
    for criterion in (keys, full_scores, full_valid):
        step = torch.argsort(criterion.gather(1, order), dim=1, descending=True, stable=True)
        order = order.gather(1, step)

    k = num_selected(kappa, full_valid.sum(dim=1))
    ranks = torch.arange(full_scores.shape[1], device=scores.device).expand_as(order)
    keep_sorted = (ranks < k.unsqueeze(1)).to(torch.float64)
    keep = torch.zeros_like(full_scores).scatter_(1, order, keep_sorted)
    # This rank's tokens sit at block cp_rank of the gathered (layout-ordered) sequence.
    start = cp_rank(cp_group) * s_local
    return keep[:, start:start + s_local]
