"""The synthetic-task registry: task specs, generator families and their shared helpers.

Families (task_niah.py, task_aggregation.py, task_tracing.py) register with ``register_family``;
``megatron_tw.eval.tasks`` imports each of them explicitly and samples from the registry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_tw.registry import registrar


@dataclass(frozen=True)
class TaskSpec:
    """name: RULER's task name; family: the generator; params: its options;
    tokens_to_generate: RULER's generation budget (counted inside ``length``)."""

    name: str
    family: str
    tokens_to_generate: int
    params: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One prompt. ``meta['needles']``: [{text, key, value, start, end}] character offsets of each
    inserted needle (or chain statement) in ``prompt``; ``meta['depth']`` the requested depth(s)
    in percent of the context."""

    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    prompt_tokens: int = 0
    meta: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}
FAMILIES: dict[str, Callable] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


register_family = registrar(FAMILIES, "task family")


def _niah(name, haystack, key, value, k=1, v=1, q=1):
    register_task(TaskSpec(name, "niah", 128, dict(type_haystack=haystack, type_needle_k=key,
                                                   type_needle_v=value, num_needle_k=k,
                                                   num_needle_v=v, num_needle_q=q)))


# RULER's synthetic.yaml (the 13-task suite without the two QA tasks).
_niah("niah_single_1", "noise", "words", "numbers")
_niah("niah_single_2", "essay", "words", "numbers")
_niah("niah_single_3", "essay", "words", "uuids")
_niah("niah_multikey_1", "essay", "words", "numbers", k=4)
_niah("niah_multikey_2", "needle", "words", "numbers")
_niah("niah_multikey_3", "needle", "uuids", "uuids")
_niah("niah_multivalue", "essay", "words", "numbers", v=4)
_niah("niah_multiquery", "essay", "words", "numbers", k=4, q=4)
register_task(TaskSpec("vt", "variable_tracking", 30, dict(num_chains=1, num_hops=4, icl=True)))
register_task(TaskSpec("cwe", "common_words", 120, dict(freq_cw=30, freq_ucw=3, num_cw=10)))
register_task(TaskSpec("fwe", "freq_words", 50, dict(alpha=2.0, coded_wordlen=6,
                                                     vocab_size=2000)))

DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                 "vt", "cwe", "fwe")
# RULER's needle depths: 40 values from 0 to 100 percent.
DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))


def sample_rng(seed: int, task: str, length: int, index: int, depth=None) -> random.Random:
    """The generator of one sample: a function of its coordinates only (str seeds are hashed with
    SHA-512 by ``random``, stable across processes and Python versions)."""
    return random.Random(f"{seed}:{task}:{length}:{index}:{depth}")


def fit_haystack(build: Callable[[int], tuple], tokenizer, budget: int, minimum: int,
                 task: str, length: int) -> tuple[int, tuple]:
    """Largest haystack size n >= minimum whose prompt ``build(n)[0]`` has <= ``budget`` tokens.

    ``build`` must be deterministic in n (the caller seeds it); the token count grows with n.
    Exponential search for an upper bound, then binary search: O(log n) tokenizations.
    """
    def tokens(n):
        return tokenizer.count(build(n)[0])

    if tokens(minimum) > budget:
        raise ValueError(f"task {task}: length {length} is too short; even the smallest haystack "
                         f"gives a {tokens(minimum)}-token prompt and {length - budget} tokens are "
                         f"reserved for the answer. Use a longer --lengths value or a smaller "
                         "--max-new-tokens")
    lo, hi = minimum, max(minimum + 1, 2 * minimum)
    while tokens(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: tokens(lo) <= budget < tokens(hi)
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def needle_spans(prompt: str, needles: list[dict], search_from: int = 0) -> list[dict]:
    """Add the character span of each needle's text in ``prompt`` (searching after
    ``search_from``, the start of the task's context)."""
    out = []
    for needle in needles:
        start = prompt.find(needle["text"], search_from)
        if start < 0:
            raise AssertionError(f"needle {needle['text']!r} missing from the prompt")
        out.append({**needle, "start": start, "end": start + len(needle["text"])})
    return out
