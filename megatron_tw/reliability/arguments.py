"""The ``--tw-nonfinite*`` flags (megatron_tw/reliability/guard.py) and what they decide."""

from __future__ import annotations

import argparse

from megatron_tw.reliability.guard import NONFINITE_POLICIES


def add_reliability_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="non-finite values")
    group.add_argument("--tw-nonfinite", choices=NONFINITE_POLICIES, default="stop",
                       help="NaN/Inf in the loss, the short-context losses, the token weights or "
                            "the gradients (docs/reliability.md). stop: end the run before the "
                            "optimizer step, naming the tensor and iteration; skip: skip that "
                            "iteration's update on every rank (parameters, optimizer state and "
                            "LR schedule unchanged) and go on. --no-check-for-nan-in-loss-and-grad "
                            "turns the checks off.")
    group.add_argument("--tw-nonfinite-max-skips", type=int, default=10,
                       help="With --tw-nonfinite skip: stop once more than this many consecutive "
                            "iterations were skipped (a diverged run skips every step).")
    return parser


def validate_reliability_args(args: argparse.Namespace) -> None:
    if args.tw_nonfinite_max_skips < 0:
        raise ValueError("--tw-nonfinite-max-skips must be >= 0, got "
                         f"{args.tw_nonfinite_max_skips}")


def resolve_reliability_args(args: argparse.Namespace) -> dict:
    """The settings the flags imply (applied by megatron_tw.arguments; pure)."""
    check = bool(args.check_for_nan_in_loss_and_grad)
    settings = {"tw_check_nonfinite": check}
    if check and args.tw_nonfinite == "skip":
        # megatron's own gradient check (DDP buckets, before the data-parallel reduction) is
        # fatal; the step guard checks the same gradients after the reduction and skips.
        settings["check_for_nan_in_loss_and_grad"] = False
    return settings
