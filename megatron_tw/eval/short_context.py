"""Short-context log-probabilities: each token scored with only a few previous tokens of context.

This is step 1 of the method (shared/METHOD.md) done offline, by running a backend on windows of
the sequence. ``W`` has the meaning of ``--tw-short-context`` in training: a window holds W tokens
and the last one is the target, so a target sees at most W - 1 tokens of context.

    sliding  every target i >= W sees exactly the previous W - 1 tokens (the trainer's
             ``--tw-short-mode sliding``). One window per target: cost (T - W) x W tokens.
    windows  the reference code: windows of W tokens every S tokens, each keeping its last S
             targets, so a target sees W - S .. W - 1 tokens (``--tw-short-mode windows``).
             Needs 1 <= S < W and (T - W) divisible by S. Cost T / S x W tokens.

Targets i < W have at most i <= W - 1 tokens before them: their short context is their whole
context, so the short log-probability equals the long one there (d = 0), as in the trainer.
"""

from __future__ import annotations

from typing import Optional

import torch

MODES = ("sliding", "windows")


def _check(ids: torch.Tensor, window: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"short-context scoring takes one sequence [s]; got {tuple(ids.shape)}")
    if window < 2:
        raise ValueError(f"short context W={window} must be >= 2 (a window of W tokens holds "
                         "W - 1 context tokens and the target)")


def _run_windows(backend, windows: torch.Tensor, batch: int, last: int) -> torch.Tensor:
    """windows [n, W] -> logprobs of each window's last ``last`` targets [n, last]."""
    return torch.cat([backend.logprobs(chunk, last=last) for chunk in windows.split(batch)])


def short_context_logprobs(backend, ids: torch.Tensor, window: int, mode: str = "sliding",
                           stride: Optional[int] = None, batch: int = 32) -> torch.Tensor:
    """ids [T] -> [T - 1] float32: log p(ids[i] | at most W - 1 previous tokens), i = 1..T-1.

    Aligned with ``backend.logprobs(ids)`` (same positions), so ``long - short`` is the method's
    comparison. ``batch``: windows per forward call.
    """
    _check(ids, window)
    T = ids.shape[0]
    if T <= window:  # the whole sequence fits in one short window: short context == long
        return backend.logprobs(ids)
    first = backend.logprobs(ids[:window])  # targets 1 .. W-1, each with its full prefix
    if mode == "sliding":
        # window k = ids[k : k + W] ends at target k + W - 1; k = 1 .. T - W covers W .. T - 1
        windows = ids.unfold(0, window, 1)[1:]
        rest = _run_windows(backend, windows, batch, 1)[:, 0]
    elif mode == "windows":
        stride = stride if stride is not None else max(1, window // 2)
        # S = W would leave each window's first target with no context at all.
        if not 1 <= stride < window or (T - window) % stride != 0:
            raise ValueError(f"windows mode: stride S={stride} must be in [1, W={window}) and "
                             f"(T - W) = {T - window} divisible by S; pick a sequence length "
                             "that tiles")
        # window j = ids[jS : jS + W] keeps its last S targets: jS + W - S .. jS + W - 1
        windows = ids.unfold(0, window, stride)[1:]
        rest = _run_windows(backend, windows, batch, stride).reshape(-1)
    else:
        raise ValueError(f"short-context mode {mode!r}: choose one of {MODES}")
    return torch.cat([first, rest])
