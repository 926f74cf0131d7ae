"""Which token spans a context-parallel rank must run through the short-context model.

Conventions (megatron's frame): a sample is ``seq_length + 1`` tokens; position p holds input
token ``tokens[p]`` and is trained to predict ``labels[p]`` (token p + 1); its long context is
tokens 0..p. W is the reference code's window length: a window is W tokens, so a target sees at
most W - 1 tokens of context in the windows mode (docs/method.md, "Short-context modes"):

- ``windows`` (the reference code): window k is the W tokens ``k*S .. k*S + W - 1``, run as the
  W - 1 inputs at positions ``k*S .. k*S + W - 2`` (its first token replaced by BOS when the row
  starts with BOS); window 0 supplies positions 0..W-2, window k >= 1 its last S positions, so a
  target sees between W - S and W - 1 tokens. The windows tile the sample's tokens:
  ``(seq_length + 1 - W)`` divisible by S, as the reference requires ``(T - W) % S == 0``.
- ``sliding``: one pass over the rank's own positions (no spans: scoring/model.py); a target sees
  exactly the previous W - 1 tokens plus the sink, the sequence's first token.

Positions whose short context is their whole long context (p < W - 1 in the windows mode,
p < W in the sliding mode) are skipped by the self scorer: their short loss is the long loss,
d = 0, as in the reference code.

Each CP rank owns two chunks (load-balanced split) and plans spans only for positions it owns, so
scoring work splits with the chunks and no rank scores a position it does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_tw.data.cp_layout import local_index, owned_chunks  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Span:
    """Run the scorer on ``tokens[start:end]``; keep the losses of positions [keep_from, keep_to)."""

    start: int
    end: int
    keep_from: int
    keep_to: int

    def __post_init__(self):
        assert self.start <= self.keep_from < self.keep_to <= self.end, self


def windows_tile(seq_length: int, window: int, stride: int) -> bool:
    """Whether windows of W tokens every S tokens tile a sample of seq_length + 1 tokens."""
    return 1 <= stride <= window - 1 and (seq_length + 1 - window) % stride == 0


def window_spans(chunks, seq_length: int, window: int, stride: int,
                 skip_below: int = 0) -> list[Span]:
    if not windows_tile(seq_length, window, stride):
        raise ValueError(f"windows of {window} tokens with stride {stride} do not tile a sample "
                         f"of {seq_length + 1} tokens")
    spans = []
    for k in range((seq_length + 1 - window) // stride + 1):
        start, end = k * stride, k * stride + window - 1  # positions [start, end): W - 1 inputs
        supplies = (0, end) if k == 0 else (end - stride, end)
        for a, b in chunks:
            lo, hi = max(supplies[0], a, skip_below), min(supplies[1], b)
            if lo < hi:
                spans.append(Span(start, end, lo, hi))
    return spans


def plan_spans(mode: str, *, seq_length: int, window: int, stride: int | None, cp_size: int,
               cp_rank: int, skip_below: int = 0) -> list[Span]:
    """The windows-mode spans of this CP rank's positions (the sliding mode has none)."""
    if mode != "windows":
        raise ValueError(f"spans are planned for --tw-short-mode windows only, not {mode!r}")
    chunks = owned_chunks(seq_length, cp_size, cp_rank)
    return window_spans(chunks, seq_length, window, stride, skip_below)
