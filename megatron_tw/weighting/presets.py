"""Named weighting schemes (docs/method.md, "Presets") and `build_weighting_config`.

A preset is a function `(**params) -> WeightingConfig` registered by name; a new scheme is one
decorated function (here or in any module imported before argument parsing):

    @register_preset("rho1")
    def rho1(sparsity: float = 0.6) -> WeightingConfig:
        return WeightingConfig(transforms=("max",), sparsity=sparsity, normalization="l1")

Parameter names equal WeightingConfig field names, so `--tw-<field>` overrides them.

Defaults not fixed by the method (the paper sweeps them): kappa = 0.25 for `sparse`, `ppmi`
and `npmi` (the top quarter of tokens, weight 4 each after L1), and s = 1 for `ppmi` and
`npmi` (log s = 0: the plain positive part of the pointwise mutual information; raise s to keep
only tokens whose probability ratio exceeds s).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from megatron_tw.weighting.config import FLAGS, WeightingConfig

PresetFn = Callable[..., WeightingConfig]
PRESETS: dict[str, PresetFn] = {}

DEFAULT_DENSE_LAMBDA = 0.75  # shipped in the reference configuration (llama3_32k_dense)
DEFAULT_SPARSE_KAPPA = 0.25
DEFAULT_LONGCE_GAMMA = 5.0  # LongCE (Fang et al., 2025)
DEFAULT_PMI_SHIFT = 1.0
DEFAULT_PMI_KAPPA = 0.25

# Overrides that accept "none" to remove a step the preset turned on.
_CLEARABLE = ("shift", "truncation", "sparsity", "normalization", "interpolation")


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Decorator: add a preset under `name` (becomes a --tw-preset choice)."""
    key = name.strip().lower()

    def decorator(fn: PresetFn) -> PresetFn:
        if key in PRESETS:
            raise ValueError(f"weighting preset {key!r} is already registered ({PRESETS[key]!r})")
        PRESETS[key] = fn
        return fn

    return decorator


@register_preset("uniform")
def uniform() -> WeightingConfig:
    """Every token weight 1: the stock language-modeling loss."""
    return WeightingConfig()


@register_preset("dense")
def dense(interpolation: float = DEFAULT_DENSE_LAMBDA) -> WeightingConfig:
    """lambda + (1 - lambda) * N |d| / sum |d|."""
    return WeightingConfig(transforms=("absolute",), normalization="l1",
                           interpolation=interpolation)


@register_preset("sparse")
def sparse(sparsity: float = DEFAULT_SPARSE_KAPPA) -> WeightingConfig:
    """N / k on the top k = floor(kappa N) tokens by |d| (1 / kappa when divisible), 0 elsewhere."""
    return WeightingConfig(transforms=("absolute",), sparsity=sparsity, normalization="l1")


@register_preset("longce")
def longce(truncation: float = DEFAULT_LONGCE_GAMMA) -> WeightingConfig:
    """min(p_long / p_short, gamma) = min(exp(-d), gamma), unnormalized."""
    return WeightingConfig(transforms=("minus", "exp"), truncation=truncation)


@register_preset("ppmi")
def ppmi(shift: float = DEFAULT_PMI_SHIFT, sparsity: float = DEFAULT_PMI_KAPPA) -> WeightingConfig:
    """Top-kappa mask of max(log(p_long / p_short) - log s, 0), L1-normalized."""
    return WeightingConfig(transforms=("minus", "shift", "max"), shift=shift, sparsity=sparsity,
                           normalization="l1")


@register_preset("npmi")
def npmi(shift: float = DEFAULT_PMI_SHIFT, sparsity: float = DEFAULT_PMI_KAPPA) -> WeightingConfig:
    """Top-kappa mask of max(log(p_short / p_long) - log s, 0), L1-normalized."""
    return WeightingConfig(transforms=("shift", "max"), shift=shift, sparsity=sparsity,
                           normalization="l1")


def build_weighting_config(preset: str = "uniform", **overrides: Any) -> WeightingConfig:
    """The preset's config with explicit overrides merged on top, validated.

    overrides: WeightingConfig fields. A value of None means "not given" (keep the preset's);
    the string "none" removes the step (shift, truncation, sparsity, normalization,
    interpolation; for transforms it means no transform). Raises ValueError naming the flag.
    """
    key = (preset or "uniform").strip().lower()
    if key not in PRESETS:
        raise ValueError(
            f"{FLAGS['preset']}={preset!r} is not a registered weighting preset; choose one of "
            f"{', '.join(sorted(PRESETS))} or register one with @register_preset in "
            "megatron_tw/weighting/presets.py."
        )
    fields = {f.name for f in dataclasses.fields(WeightingConfig)}
    changes = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown weighting override {name!r}; known: {sorted(fields)}")
        if value is None:
            continue
        if isinstance(value, str) and value.strip().lower() == "none":
            if name == "transforms":
                value = ()
            elif name in _CLEARABLE:
                value = None
            else:
                raise ValueError(f"{FLAGS[name]} cannot be 'none'")
        changes[name] = value
    return dataclasses.replace(PRESETS[key](), **changes).validate()
