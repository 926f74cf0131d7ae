"""Sparsification: a binary mask on the top floor(kappa * N) tokens of each sequence by score.

Layout independence is the point of this file. The selection must not depend on how the sequence
is split over context-parallel ranks, so:
- the scores of the whole sequence are gathered over the CP group ([b, s_local] floats per rank,
  the only data of sequence size that is communicated), and every rank computes the same
  selection on the whole sequence, then keeps its own slice;
- the order is total and a pure function of the data: score (descending), then a pseudo-random
  tie-break key (descending): a 31-bit hash of (seed, iteration, sample id, global position)
  followed by the position's 32 bits, so keys are distinct within a sequence (positions are
  unique there) and equal hashes fall back to the position.
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
_SALT = 0x2545F491


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
    """Pseudo-random int64 keys in [0, 2^63), a pure function of the four inputs.

    sample_ids: [b] int64; position_ids: [b, s] int64 (global positions, < 2^32).
    Returns [b, s] int64: (31-bit hash << 32) | position, hence distinct for distinct positions.
    Integer-only arithmetic: identical on CPU and GPU and for every parallel layout.
    """
    device = position_ids.device
    scalars = torch.tensor([seed, iteration], dtype=torch.int64, device=device)
    h = torch.full((1, 1), _SALT, dtype=torch.int64, device=device)
    h = _absorb(h, scalars[0])
    h = _absorb(h, scalars[1])
    # Per-sequence prefix [b, 1], computed once; then one mix per token (the costly part).
    h = _absorb(h, sample_ids.to(device=device, dtype=torch.int64).reshape(-1, 1))
    position = position_ids.to(torch.int64) & _MASK32
    return ((_mix32(h ^ position) >> 1) << 32) | position


def num_selected(kappa: float, num_tokens: torch.Tensor) -> torch.Tensor:
    """k = floor(kappa * N), but 1 when kappa * N < 1 <= N. num_tokens: [b] -> [b] int64."""
    n = num_tokens.to(torch.float64)
    k = torch.floor(n * kappa + _FLOOR_SLACK).to(torch.int64)
    return torch.where((k < 1) & (n >= 1), torch.ones_like(k), k)


def max_selected(kappa: float, length: int) -> int:
    """An upper bound of ``num_selected`` for any row of ``length`` tokens, from shapes alone
    (N <= length), so the top-k size needs no read of a device value."""
    return max(1, min(length, int(length * kappa + _FLOOR_SLACK)))


def _kth_largest(values: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per row, the k-th largest entry of values [b, n] (k: [b] int64 in [0, k_max]; rows with
    k = 0 get the largest). One top-k of the static size k_max: no host sync, and cheaper than a
    full sort for kappa < 1."""
    top = torch.topk(values, k_max, dim=1).values  # [b, k_max], descending
    return top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [b, 1]


def top_kappa_mask(scores: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor,
                   sample_ids: torch.Tensor, *, kappa: float, seed: int, iteration: int,
                   cp_group=None) -> torch.Tensor:
    """Binary mask of the top-k loss-masked tokens of each whole sequence (see module docstring).

    scores: [b, s_local] float64; valid: [b, s_local] bool (the loss mask);
    position_ids: [b, s_local] int64 global positions; sample_ids: [b] int64.
    Gathers scores, positions and the mask over `cp_group` (the whole sequence; no other group).
    Returns [b, s_local] float64 in {0, 1}. A nan score counts as -inf.

    Selection by threshold instead of a full sort: t = the k-th largest score; every token
    above t is kept, and the remaining slots go to the tokens equal to t with the largest
    tie-break keys (usually one tied token, many after a `max`). No step reads a device value
    back to the host: the top-k size comes from the shapes (``max_selected``).
    """
    s_local = scores.shape[1]
    full_scores = cp_gather_seq(scores, cp_group)
    full_meta = cp_gather_seq(torch.stack([position_ids.to(torch.int64), valid.to(torch.int64)]),
                              cp_group)
    full_pos, full_valid = full_meta[0], full_meta[1] != 0
    full_scores = torch.where(full_valid & ~torch.isnan(full_scores), full_scores, float("-inf"))

    k = num_selected(kappa, full_valid.sum(dim=1))  # [b]
    k_max = max_selected(kappa, full_scores.shape[1])
    active = (k > 0).unsqueeze(1)
    threshold = _kth_largest(full_scores, k, k_max)
    above = active & full_valid & (full_scores > threshold)
    tied = active & full_valid & (full_scores == threshold)
    need = k - above.sum(dim=1)  # [b], slots left for tied tokens

    # Keys for every position, kept for the tied ones: elementwise integer work instead of
    # gathering the tied positions (nonzero), which would read their count back to the host.
    keys = torch.where(tied, tie_break_keys(seed, iteration, sample_ids.to(full_pos.device),
                                            full_pos), -1)
    key_threshold = _kth_largest(keys, need, k_max)
    chosen = tied & (need > 0).unsqueeze(1) & (keys >= key_threshold)

    keep = (above | chosen).to(torch.float64)
    # This rank's tokens sit at block cp_rank of the gathered (layout-ordered) sequence.
    start = cp_rank(cp_group) * s_local
    return keep[:, start:start + s_local]
