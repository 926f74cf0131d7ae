"""Non-finite numbers are caught where they appear, before they reach the weights.

Checks go through megatron's rerun state machine (the mechanism stock pretrain_gpt uses for the
loss), so ``--check-for-nan-in-loss-and-grad`` and ``--rerun-mode`` keep their megatron meaning.
"""

from __future__ import annotations

import torch


def _non_finite(tensor: torch.Tensor) -> bool:
    return not bool(torch.isfinite(tensor).all())


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Fail the step (fatal, with the iteration and ``name``) if ``tensor`` holds NaN or Inf.

    No-op when ``--no-check-for-nan-in-loss-and-grad`` is given.
    """
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    if not args.check_for_nan_in_loss_and_grad:
        return
    get_rerun_state_machine().validate_result(
        result=tensor,
        rejection_func=_non_finite,
        message=f"found NaN or Inf in {name} at iteration {args.curr_iteration}",
        tolerance=0.0,  # forward computations are deterministic
        fatal=True,
    )
