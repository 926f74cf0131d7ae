"""The logs of benchmarks/gpu_check.py's child processes: the figures of one pretrain row's
console output (lm loss and step time per iteration, host syncs, parameter count, padded
vocabulary, peak memory) and the one line that says why a process failed.
"""

from __future__ import annotations

import re
import statistics

SYNC_MESSAGE = "called a synchronizing CUDA operation"

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_FIELD = re.compile(r"([a-zA-Z][a-zA-Z0-9 ._/()-]*?):\s+([-+0-9.eEnaifNAIF]+)\s*\|")
_STEP_MS = re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.]+)")
_PARAMS = re.compile(r"number of parameters on \([^)]*\) model parallel rank \([0, ]*\):\s*(\d+)")
_PADDED_VOCAB = re.compile(r"padded vocab \(size: \d+\) with \d+ dummy tokens \(new size: (\d+)\)")
_MAX_ALLOC = re.compile(r"max allocated:\s*([0-9.]+)")


def parse_log(text: str, warmup: int) -> dict:
    """From one run's console output: per-iteration lm loss and step time, the median step
    time after ``warmup`` iterations, NaN iterations, host syncs per step, parameter count,
    padded vocabulary and peak allocated memory (MB)."""
    losses, steps, nan_iters = {}, {}, 0
    syncs, pending, sync_on = {}, 0, False
    for line in text.splitlines():
        if SYNC_MESSAGE in line:
            pending += 1
            continue
        if "sync debug mode: warn" in line:
            sync_on, pending = True, 0
            continue
        m = _ITERATION.search(line)
        if not m:
            continue
        it = int(m.group(1))
        fields = {k.strip(): v for k, v in _FIELD.findall(m.group(2) + "|")}
        if (t := _STEP_MS.search(m.group(2))):
            steps[it] = float(t.group(1))
        if "lm loss" in fields:
            losses[it] = float(fields["lm loss"])
        nan_iters = max(nan_iters, int(float(fields.get("number of nan iterations", 0))))
        if sync_on:
            syncs[it] = pending
        pending = 0
    kept = [ms for it, ms in sorted(steps.items()) if it > warmup]
    found = lambda rx, cast: cast(m.group(1)) if (m := rx.search(text)) else None  # noqa: E731
    timed_syncs = [n for it, n in sorted(syncs.items()) if it > 1]
    return {"step_ms": statistics.median(kept) if kept else None, "steps": len(kept),
            "step_times": [steps[i] for i in sorted(steps)],
            "losses": [losses[i] for i in sorted(losses)], "nan_iterations": nan_iters,
            "syncs": timed_syncs if sync_on else None,
            "syncs_per_step": statistics.median(timed_syncs) if timed_syncs else
            (0.0 if sync_on and syncs else None),
            "params": found(_PARAMS, int), "padded_vocab": found(_PADDED_VOCAB, int),
            "max_alloc_mb": max((float(x) for x in _MAX_ALLOC.findall(text)), default=None) or None}


# The exception a failed process raised, or the start-up error a tool printed.
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]*(?:Error|Exception)|[\w_]+\.py: error): ")


def error_line(output: str) -> str:
    lines = [x.strip() for x in output.splitlines()
             if _ERROR_LINE.match(x.strip()) and "ChildFailedError" not in x]
    if lines:
        return lines[-1]
    tail = [x for x in output.strip().splitlines() if x.strip()]
    return tail[-1].strip() if tail else "no output"
