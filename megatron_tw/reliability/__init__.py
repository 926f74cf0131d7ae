"""Non-finite numbers and damaged inputs, caught before they cost a step or a checkpoint.

guard.py: per-micro-batch checks and the optimizer-step guard (``--tw-nonfinite``);
arguments.py: those flags; preflight.py: start-up checks of the checkpoint and tokenizer files.
"""

from megatron_tw.reliability.guard import (
    NONFINITE_POLICIES,
    NonFiniteError,
    check_finite,
    count_loss_tokens,
    install_step_guard,
    reset_step_record,
)

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "check_finite", "count_loss_tokens",
           "install_step_guard", "reset_step_record"]
