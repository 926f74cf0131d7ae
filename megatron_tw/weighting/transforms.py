"""Comparisons and element-wise score transforms, each in a registry.

A transform maps scores [b, s_local] float64 -> [b, s_local] float64, element-wise, so it needs no
communication and gives the same value for a token on whichever context-parallel rank holds it.
Register a new one with

    @register_transform("square")
    def square(scores, config):
        return scores * scores

and it becomes valid in `--tw-transforms` and `WeightingConfig.transforms`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from megatron_tw.weighting.config import WeightingConfig

TransformFn = Callable[[torch.Tensor, "WeightingConfig"], torch.Tensor]
ComparisonFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TRANSFORMS: dict[str, TransformFn] = {}
COMPARISONS: dict[str, ComparisonFn] = {}

# exp() saturates at e^80 (~5.5e34): far above any useful weight (LongCE caps at 5), still finite
# after the cast to float32 (max ~3.4e38), and a sum of 2^30 such values stays finite in float64.
# Real scores are differences of two cross-entropies (|d| ~ 20 at most), so this only tames
# pathological inputs (e.g. a diverged model) that would otherwise put inf/nan into the loss.
EXP_MAX_EXPONENT = 80.0

# The quotient comparison's smoothing constant (as in the reference code).
QUOTIENT_EPS = 1e-5


def register_transform(name: str) -> Callable[[TransformFn], TransformFn]:
    """Decorator: add `fn(scores, config) -> scores` to TRANSFORMS under `name`."""
    key = name.strip().lower()

    def decorator(fn: TransformFn) -> TransformFn:
        if key in TRANSFORMS:
            raise ValueError(f"transform {key!r} is already registered ({TRANSFORMS[key]!r})")
        TRANSFORMS[key] = fn
        return fn

    return decorator


def register_comparison(name: str) -> Callable[[ComparisonFn], ComparisonFn]:
    """Decorator: add `fn(long_loss, short_loss) -> scores` to COMPARISONS under `name`."""
    key = name.strip().lower()

    def decorator(fn: ComparisonFn) -> ComparisonFn:
        if key in COMPARISONS:
            raise ValueError(f"comparison {key!r} is already registered")
        COMPARISONS[key] = fn
        return fn

    return decorator


@register_comparison("difference")
def difference(long_loss: torch.Tensor, short_loss: torch.Tensor) -> torch.Tensor:
    """d = L_long - L_short = log(p_short / p_long): > 0 where the long context hurt."""
    return long_loss - short_loss


@register_comparison("quotient")
def quotient(long_loss: torch.Tensor, short_loss: torch.Tensor) -> torch.Tensor:
    """(L_long + eps) / (L_short + eps); the eps keeps near-zero losses finite."""
    return (long_loss + QUOTIENT_EPS) / (short_loss + QUOTIENT_EPS)


@register_transform("absolute")
def absolute(scores: torch.Tensor, config: "WeightingConfig") -> torch.Tensor:
    return scores.abs()


@register_transform("minus")
def minus(scores: torch.Tensor, config: "WeightingConfig") -> torch.Tensor:
    """-d = log(p_long / p_short): swaps the roles of the two models."""
    return -scores


@register_transform("max")
def positive_part(scores: torch.Tensor, config: "WeightingConfig") -> torch.Tensor:
    """max(d, 0)."""
    return scores.clamp(min=0.0)


@register_transform("exp")
def exponential(scores: torch.Tensor, config: "WeightingConfig") -> torch.Tensor:
    """e^d, saturating at e^EXP_MAX_EXPONENT (see there why)."""
    return torch.exp(scores.clamp(max=EXP_MAX_EXPONENT))


@register_transform("shift")
def shift(scores: torch.Tensor, config: "WeightingConfig") -> torch.Tensor:
    """d - log(s), with s = config.shift (> 0, checked by WeightingConfig.validate)."""
    return scores - math.log(config.shift)
