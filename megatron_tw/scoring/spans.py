"""Which token spans a context-parallel rank must run through the short-context model.

Conventions (megatron's frame): position p of a sequence holds input token ``tokens[p]`` and is
trained to predict ``labels[p]``; its long context is ``tokens[0..p]`` (p + 1 tokens). With short
context W its short context is at most the last W of those tokens:

- ``sliding``: exactly ``tokens[max(0, p-W+1) .. p]`` (one pass with sliding-window attention of
  W keys over the span that ends at the chunk's end).
- ``windows`` (the reference code): windows ``tokens[kS : kS+W]``, k = 0..K with K*S + W = s;
  window 0 supplies positions 0..W-1 and window k >= 1 its last S positions, so a position sees
  between W-S+1 and W tokens.

Positions p < W have identical long and short contexts in the sliding mode (and window 0 covers
them in the windows mode); the self scorer skips them (``skip_below=W``): their short loss is the
long loss, d = 0, as in the reference code.

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


def sliding_spans(chunks, window: int, skip_below: int = 0) -> list[Span]:
    spans = []
    for a, b in chunks:
        keep_from = max(a, skip_below)
        if keep_from >= b:
            continue
        spans.append(Span(max(0, keep_from - window + 1), b, keep_from, b))
    return spans


def window_spans(chunks, seq_length: int, window: int, stride: int,
                 skip_below: int = 0) -> list[Span]:
    if (seq_length - window) % stride:
        raise ValueError(f"windows of {window} with stride {stride} do not tile {seq_length}")
    spans = []
    for k in range((seq_length - window) // stride + 1):
        start = k * stride
        supplies = (0, window) if k == 0 else (start + window - stride, start + window)
        for a, b in chunks:
            lo, hi = max(supplies[0], a, skip_below), min(supplies[1], b)
            if lo < hi:
                spans.append(Span(start, start + window, lo, hi))
    return spans


def plan_spans(mode: str, *, seq_length: int, window: int, stride: int | None, cp_size: int,
               cp_rank: int, skip_below: int = 0) -> list[Span]:
    chunks = owned_chunks(seq_length, cp_size, cp_rank)
    if mode == "sliding":
        return sliding_spans(chunks, window, skip_below)
    if mode == "windows":
        return window_spans(chunks, seq_length, window, stride, skip_below)
    raise ValueError(f"unknown short-context mode {mode!r}")
