"""RULER's scoring: ``string_match_all`` (x100) on post-processed predictions.

For each sample, the fraction of its reference answers that occur in the prediction
(case-insensitive substring), averaged over samples and multiplied by 100. Predictions are
post-processed as RULER does: control characters become newlines and the ends are stripped.
"""

from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_fraction(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (case-insensitive)."""
    if not references:
        raise ValueError("a sample needs at least one reference answer")
    pred = postprocess(prediction).lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric over a set of samples, in [0, 100]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return float("nan")
    return 100.0 * sum(match_fraction(p, r) for p, r in zip(predictions, references)) / len(
        predictions)
