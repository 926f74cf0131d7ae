"""Short-context log-probabilities: each token scored with only a few previous tokens of context.

This is step 1 of the method (docs/method.md) done offline, by running a backend on windows of
the sequence. ``W`` means what ``--tw-short-context`` means in training: a target is predicted
from at most the W tokens before it (in megatron's view a window is W input tokens, each with the
next token as its label).

    sliding  every target i > W sees exactly the previous W tokens. One forward per target (a
             window of W + 1 tokens): cost (T - W) x (W + 1) tokens. The context is cut hard at
             W; the trainer's ``--tw-short-mode sliding`` instead runs one pass of sliding-window
             attention, whose information reaches up to layers x W tokens back.
    windows  the reference code (``--tw-short-mode windows``): windows of W input tokens every S
             tokens, each keeping its last S targets, so a target sees W - S + 1 .. W tokens.
             Needs 1 <= S <= W and (T - 1 - W) divisible by S (T - 1 = megatron's seq_length).

Targets i <= W have at most W tokens before them: their short context is their whole context, so
the short log-probability equals the long one there (d = 0), as in the trainer.
"""

from __future__ import annotations

from typing import Optional

import torch

MODES = ("sliding", "windows")


def _check(ids: torch.Tensor, window: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"short-context scoring takes one sequence [s]; got {tuple(ids.shape)}")
    if window < 1:
        raise ValueError(f"short context W={window} must be >= 1 token")


def _run_windows(backend, windows: torch.Tensor, batch: int, last: int) -> torch.Tensor:
    """windows [n, W + 1] -> logprobs of each window's last ``last`` targets [n, last]."""
    return torch.cat([backend.logprobs(chunk, last=last) for chunk in windows.split(batch)])


def short_context_logprobs(backend, ids: torch.Tensor, window: int, mode: str = "sliding",
                           stride: Optional[int] = None, batch: int = 32) -> torch.Tensor:
    """ids [T] -> [T - 1] float32: log p(ids[i] | at most the W previous tokens), i = 1..T-1.

    Aligned with ``backend.logprobs(ids)`` (same positions), so ``long - short`` is the method's
    comparison. ``batch``: windows per forward call.
    """
    _check(ids, window)
    T = ids.shape[0]
    if T - 1 <= window:  # every target has at most W tokens before it: short == long
        return backend.logprobs(ids)
    span = window + 1  # W context tokens and the target
    first = backend.logprobs(ids[:span])  # targets 1 .. W, each with its full prefix
    if mode == "sliding":
        # window k = ids[k : k + W + 1] ends at target k + W; k = 1 .. T - W - 1
        windows = ids.unfold(0, span, 1)[1:]
        rest = _run_windows(backend, windows, batch, 1)[:, 0]
    elif mode == "windows":
        stride = stride if stride is not None else max(1, window // 2)
        if not 1 <= stride <= window or (T - 1 - window) % stride != 0:
            raise ValueError(f"windows mode: stride S={stride} must be in [1, W={window}] and "
                             f"(T - 1 - W) = {T - 1 - window} divisible by S; pick a sequence "
                             "length that tiles")
        # window j = ids[jS : jS + W + 1] keeps its last S targets: jS + W - S + 1 .. jS + W
        windows = ids.unfold(0, span, stride)[1:]
        rest = _run_windows(backend, windows, batch, stride).reshape(-1)
    else:
        raise ValueError(f"short-context mode {mode!r}: choose one of {MODES}")
    return torch.cat([first, rest])
