"""Run the synthetic tasks with a model backend: greedy decoding, ``string_match_all`` scoring.

    run_tasks(backend, tokenizer, ["niah_single_1", "vt"], lengths=[1024, 2048], samples=10)
    needle_grid(backend, tokenizer, "niah_single_1", lengths=[...], depths=[0, 25, 50, 75, 100])

Samples are generated from (seed, task, length, index[, depth]) only, so two models evaluated
with the same seed see the same prompts. Decoding stops at the tokenizer's EOD or after the
task's generation budget.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from megatron_tw.eval.scoring import match_fraction, string_match_all
from megatron_tw.eval.tasks import generate_sample


def _decode_sample(backend, tokenizer, sample) -> str:
    ids = tokenizer.encode(sample.prompt)
    stop = () if tokenizer.eod_id is None else (tokenizer.eod_id,)
    return tokenizer.decode(backend.greedy(ids, sample.max_new_tokens, stop))


def run_tasks(backend, tokenizer, tasks: Sequence[str], lengths: Sequence[int], samples: int,
              *, seed: int = 42, max_new_tokens: Optional[int] = None,
              essay_source: Optional[str] = None, keep_predictions: int = 3,
              log: Callable[[str], None] = print) -> dict:
    """Score every task at every length on ``samples`` prompts.

    Returns {task: {length: {"score", "samples", "prompt_tokens", "examples": [...]}}}; a
    (task, length) whose prompt cannot fit holds {"error": message} instead.
    """
    out: dict = {}
    for task in tasks:
        out[task] = {}
        for length in lengths:
            start = time.perf_counter()
            preds, refs, examples, n_tokens = [], [], [], []
            try:
                for i in range(samples):
                    sample = generate_sample(task, tokenizer, length, seed=seed, index=i,
                                             max_new_tokens=max_new_tokens,
                                             essay_source=essay_source)
                    pred = _decode_sample(backend, tokenizer, sample)
                    preds.append(pred)
                    refs.append(sample.answers)
                    n_tokens.append(sample.prompt_tokens)
                    if i < keep_predictions:
                        examples.append({"answers": sample.answers, "prediction": pred,
                                         "match": match_fraction(pred, sample.answers)})
            except ValueError as err:  # the length cannot hold this task
                out[task][str(length)] = {"error": str(err)}
                log(f"  {task} @ {length}: skipped ({err})")
                continue
            score = string_match_all(preds, refs)
            out[task][str(length)] = {"score": score, "samples": samples,
                                      "prompt_tokens": sum(n_tokens) / len(n_tokens),
                                      "examples": examples}
            log(f"  {task} @ {length}: {score:.1f} ({samples} samples, "
                f"{time.perf_counter() - start:.1f} s)")
    return out


def needle_grid(backend, tokenizer, task: str, lengths: Sequence[int], depths: Sequence[float],
                samples: int, *, seed: int = 42, max_new_tokens: Optional[int] = None,
                essay_source: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict:
    """Single-needle retrieval score for every (length, depth): the needle heatmap's data.

    Returns {"task", "lengths", "depths", "scores": [[score at depths[j] for j] for lengths],
    "errors"}; a length too short for the task has a row of None and its message in "errors".
    """
    scores, errors = [], {}
    for length in lengths:
        row = []
        try:
            for depth in depths:
                preds, refs = [], []
                for i in range(samples):
                    sample = generate_sample(task, tokenizer, length, seed=seed, index=i,
                                             depth=depth, max_new_tokens=max_new_tokens,
                                             essay_source=essay_source)
                    preds.append(_decode_sample(backend, tokenizer, sample))
                    refs.append(sample.answers)
                row.append(string_match_all(preds, refs))
        except ValueError as err:  # the length cannot hold this task: an empty row
            errors[str(length)] = str(err)
            row = [None] * len(depths)
            log(f"  {task} grid @ {length}: skipped ({err})")
        else:
            log(f"  {task} grid @ {length}: " + " ".join(f"{d:g}%={s:.0f}" for d, s in
                                                         zip(depths, row)))
        scores.append(row)
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "samples": samples,
            "scores": scores, "errors": errors}
