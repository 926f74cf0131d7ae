"""Normalizations: rescale each sequence's weights to mean 1 over its N loss-masked tokens.

Each function takes weights [b, s_local] float64, the loss mask `valid` [b, s_local] bool, the
per-sequence token count N [b] float64 (already summed over the CP group) and returns weights
[b, s_local] float64, 0 outside the mask. Per-sequence sums and maxima are reduced over the
context-parallel group only (a sequence lives within one CP group), in float64.

A sequence whose weights are all zero falls back to uniform weights (1 on masked tokens):
L1 would divide 0 by 0 there, and all-zero weights would drop the sequence from training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from megatron_tw.weighting.comm import cp_max, cp_sum

if TYPE_CHECKING:
    from megatron_tw.weighting.config import WeightingConfig

NormalizationFn = Callable[..., torch.Tensor]
NORMALIZATIONS: dict[str, NormalizationFn] = {}


def register_normalization(name: str):
    def decorator(fn: NormalizationFn) -> NormalizationFn:
        if name in NORMALIZATIONS:
            raise ValueError(f"normalization {name!r} is already registered")
        NORMALIZATIONS[name] = fn
        return fn

    return decorator


@register_normalization("l1")
def l1(weights: torch.Tensor, valid: torch.Tensor, num_tokens: torch.Tensor,
       config: "WeightingConfig", cp_group=None) -> torch.Tensor:
    """w = N * w / sum|w| (sum over the whole sequence: reduced over cp_group)."""
    weights = torch.where(valid, weights, 0.0)
    total = cp_sum(weights.abs().sum(dim=1), cp_group)  # [b]
    nonzero = total > 0
    scale = torch.where(nonzero, num_tokens / torch.where(nonzero, total, 1.0), 0.0)
    uniform = valid.to(weights.dtype)
    return torch.where(nonzero.unsqueeze(1), weights * scale.unsqueeze(1), uniform)


@register_normalization("softmax")
def softmax(weights: torch.Tensor, valid: torch.Tensor, num_tokens: torch.Tensor,
            config: "WeightingConfig", cp_group=None) -> torch.Tensor:
    """w = N * softmax(w / tau) over the masked tokens of the whole sequence.

    The global max (reduced over cp_group) is subtracted before exp, so no term overflows; every
    masked token then has exp(.) <= 1 and the top one exactly 1, so the sum is >= 1 whenever
    N >= 1. An all-zero row gives uniform weights by itself (softmax of a constant).
    """
    logits = torch.where(valid, weights / config.temperature, float("-inf"))
    row_max = cp_max(logits.amax(dim=1), cp_group)  # [b]; -inf for a row without tokens
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    expo = torch.exp(logits - row_max.unsqueeze(1))  # exactly 0 outside the mask
    total = cp_sum(expo.sum(dim=1), cp_group)  # [b]
    scale = torch.where(total > 0, num_tokens / torch.where(total > 0, total, 1.0), 0.0)
    return expo * scale.unsqueeze(1)
