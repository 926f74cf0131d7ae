"""The statistics of the score-fidelity measurement (megatron_tw/eval/fidelity.py), all on plain
lists of per-target values: how well one variant's abs(d) ranks the targets like the exact
variant's (Spearman's rank correlation, overlap of the top quarter), and which targets are
long-range repeats of a word, read from the text each token adds (token_texts).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

TOP_SHARE = 0.25  # the "top quarter" by |d| (the sparse preset's default kappa)


# -- statistics --------------------------------------------------------------------------------
# Written here rather than imported: scipy is not a dependency of the project (nor installed in
# its environment), and the two functions below are all the measurement needs.

def rankdata(x: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (tie-averaged) ranks."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = torch.tensor(rankdata(a), dtype=torch.float64), torch.tensor(rankdata(b),
                                                                         dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def top_indices(score: Sequence[float], share: float = TOP_SHARE) -> set[int]:
    """The floor(share x n) (at least 1) highest scores; ties broken by the lower index."""
    k = max(1, int(share * len(score)))
    return set(sorted(range(len(score)), key=lambda i: (-score[i], i))[:k])


def top_overlap(a: Sequence[float], b: Sequence[float], share: float = TOP_SHARE) -> float:
    ta, tb = top_indices(a, share), top_indices(b, share)
    return len(ta & tb) / len(ta)


# -- long-range repeats ------------------------------------------------------------------------

def token_texts(tokenizer, ids: Sequence[int], context: int = 8) -> list[str]:
    """The text each token adds when decoding left to right (decoded with a few tokens before it,
    so SentencePiece's leading spaces and multi-byte characters come out right)."""
    out = []
    for i in range(len(ids)):
        a = max(0, i - context)
        before, upto = tokenizer.decode(ids[a:i]), tokenizer.decode(ids[a:i + 1])
        out.append(upto[len(before):] if upto.startswith(before) else tokenizer.decode([ids[i]]))
    return out


_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def long_range_repeats(texts: Sequence[str], window: int) -> list[bool]:
    """Per token t of a sequence (``texts``: what each token adds to the text), whether its word
    is a long-range repeat: the same word occurred earlier in the sequence, but only outside the
    target's short context.

    Precisely: words are maximal runs of non-whitespace characters of the decoded sequence,
    compared lowercased with punctuation stripped from both ends ("Elliot," = "elliot"; a word of
    punctuation only is no word). Token t belongs to the word holding its first non-whitespace
    character (a token of whitespace only belongs to none: False). The short context of target t
    is tokens t - W + 1 .. t - 1 (and the sink, token 0, the lead token, which has no word). The
    word is a long-range repeat when an earlier occurrence of it ends before token t - W + 1 and
    no earlier occurrence has a token within t - W + 1 .. t - 1.
    """
    starts, text = [], []
    n = 0
    for piece in texts:
        starts.append(n)
        text.append(piece)
        n += len(piece)
    text = "".join(text)
    char_token = [0] * len(text)
    for t, piece in enumerate(texts):
        for c in range(starts[t], starts[t] + len(piece)):
            char_token[c] = t
    words = [(m.start(), m.end(), _EDGE_PUNCT.sub("", m.group()).lower())
             for m in re.finditer(r"\S+", text)]
    word_at = [-1] * len(text)
    for j, (a, b, _) in enumerate(words):
        for c in range(a, b):
            word_at[c] = j
    last_token = [char_token[b - 1] for a, b, _ in words]
    earlier: dict[str, list[int]] = {}
    prev_occurrences = []  # per word j: indices of earlier words of the same form
    for j, (_, _, form) in enumerate(words):
        prev_occurrences.append(list(earlier.get(form, ())) if form else [])
        if form:
            earlier.setdefault(form, []).append(j)
    flags = []
    for t, piece in enumerate(texts):
        offset = len(piece) - len(piece.lstrip())
        if offset == len(piece):
            flags.append(False)
            continue
        j = word_at[starts[t] + offset]
        window_start = t - window + 1
        prev = prev_occurrences[j]
        far = any(last_token[i] < window_start for i in prev)
        near = any(last_token[i] >= window_start for i in prev)
        flags.append(far and not near)
    return flags

