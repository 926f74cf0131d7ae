"""The --tw-* weighting flags (argparse) and their translation into a WeightingConfig.

`add_weighting_args(parser)` has the signature of Megatron's `extra_args_provider`. A preset
sets every step; each override flag replaces one field of it:

    --tw-preset dense --tw-interpolation 0.5
    --tw-preset uniform --tw-transforms absolute --tw-normalization softmax --tw-temperature 2
    --tw-preset ppmi --tw-shift 2 --tw-sparsity 0.1

Override flags default to None ("keep the preset's value"); "none" removes a step. Validation
(`weighting_config_from_args`) raises ValueError naming the flag and the fix.
"""

from __future__ import annotations

import argparse

from megatron_tw.weighting.config import WeightingConfig
from megatron_tw.weighting.presets import PRESETS, build_weighting_config


def _float_or_none(text: str):
    """argparse type: a float, or the string "none" (removes the preset's step)."""
    if text.strip().lower() == "none":
        return "none"
    return float(text)


_float_or_none.__name__ = "float-or-none"  # argparse shows it in "invalid ... value" errors


def add_weighting_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="token weighting")
    group.add_argument("--tw-preset", type=str.lower, choices=sorted(PRESETS), default="uniform",
                       help="Weighting scheme (docs/method.md). The flags below override it.")
    group.add_argument("--tw-comparison", type=str, default=None,
                       help="Score: 'difference' L_long - L_short or 'quotient'.")
    group.add_argument("--tw-transforms", type=str, default=None,
                       help="Comma list applied left to right, e.g. 'minus,shift,max' "
                            "(absolute, minus, max, exp, shift); 'none' for no transform.")
    group.add_argument("--tw-shift", type=_float_or_none, default=None,
                       help="s of the 'shift' transform (d - log s), s > 0.")
    group.add_argument("--tw-truncation", type=_float_or_none, default=None,
                       help="gamma: w = min(w, gamma), gamma > 0.")
    group.add_argument("--tw-sparsity", type=_float_or_none, default=None,
                       help="kappa in (0, 1]: keep the top floor(kappa N) tokens per sequence "
                            "(exactly one when kappa N < 1).")
    group.add_argument("--tw-normalization", type=str, default=None,
                       help="none | l1 (N w / sum|w|) | softmax (N softmax(w / temperature)).")
    group.add_argument("--tw-temperature", type=float, default=None,
                       help="Softmax temperature tau > 0 (default 1).")
    group.add_argument("--tw-interpolation", type=_float_or_none, default=None,
                       help="lambda in [0, 1]: w = lambda + (1 - lambda) w; needs a "
                            "normalization. lambda = 1 is uniform.")
    group.add_argument("--tw-dump-weights", type=str, default=None, metavar="DIR",
                       help="Write the token weights (with sample ids, positions and the long/"
                            "short losses) of every micro-batch to DIR/iter_<n>/ at the first "
                            "iteration and every --tw-dump-weights-interval iterations "
                            "(megatron_tw/weight_dump.py). Not for the uniform preset, which "
                            "computes no weights.")
    group.add_argument("--tw-dump-weights-interval", type=int, default=100,
                       help="Iterations between weight dumps (default 100).")
    return parser


def weighting_config_from_args(args: argparse.Namespace) -> WeightingConfig:
    """Build and validate the config from parsed --tw-* flags (missing attributes = not given)."""
    return build_weighting_config(
        getattr(args, "tw_preset", None) or "uniform",
        comparison=getattr(args, "tw_comparison", None),
        transforms=getattr(args, "tw_transforms", None),
        shift=getattr(args, "tw_shift", None),
        truncation=getattr(args, "tw_truncation", None),
        sparsity=getattr(args, "tw_sparsity", None),
        normalization=getattr(args, "tw_normalization", None),
        temperature=getattr(args, "tw_temperature", None),
        interpolation=getattr(args, "tw_interpolation", None),
    )


def validate_dump_args(args: argparse.Namespace) -> None:
    """--tw-dump-weights needs weights to dump and a positive interval."""
    if getattr(args, "tw_dump_weights_interval", 1) < 1:
        raise ValueError(f"--tw-dump-weights-interval must be >= 1, got "
                         f"{args.tw_dump_weights_interval}")
    config = getattr(args, "tw_weighting", None)
    if getattr(args, "tw_dump_weights", None) and (config is None or config.is_uniform):
        raise ValueError("--tw-dump-weights: the uniform preset computes no token weights; "
                             "drop the flag or choose a weighting (--tw-preset)")


def needs_short_losses(args) -> bool:
    """Whether the run's weighting (``args.tw_weighting``, set at start-up) compares long- and
    short-context losses, so a scorer must run (False for uniform, and before validation)."""
    config = getattr(args, "tw_weighting", None)
    return config is not None and config.needs_short_loss
