"""RULER-style synthetic long-context tasks: the registry, the shared sample type, length fitting.

A task is a family generator plus parameters, registered by name with RULER's names:

    niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery   (retrieval)
    vt                                                                      (multi-hop tracing)
    cwe, fwe                                                                (aggregation)

``generate_sample(task, tokenizer, length, seed, index)`` returns a :class:`Sample`: the prompt (the
task template with RULER's answer prefix appended, as RULER prompts base models), the reference
answers for ``string_match_all`` and metadata (where each needle sits in the prompt). The haystack
is grown by binary search to the largest size whose prompt, in the *target tokenizer*, leaves room
for the task's generation budget within ``length`` tokens (RULER's rule). Every random choice comes
from ``random.Random`` seeded by (seed, task, length, index, depth), so runs are comparable
across models and machines. The question-answering tasks (SQuAD, HotpotQA) need downloads and are
not included; lm-evaluation-harness runs them on an exported HF checkpoint.
"""

from __future__ import annotations

# Every family, imported explicitly: each registers its generators with the registry.
from megatron_tw.eval import task_aggregation, task_niah, task_tracing  # noqa: F401
from megatron_tw.eval.task_registry import (  # noqa: F401  (the public names)
    DEFAULT_TASKS,
    DEPTHS,
    FAMILIES,
    TASKS,
    Sample,
    TaskSpec,
    register_family,
    register_task,
    sample_rng,
)


def generate_sample(task: str, tokenizer, length: int, *, seed: int = 42, index: int = 0,
                    depth: Optional[float] = None, max_new_tokens: Optional[int] = None,
                    essay_source: Optional[str] = None) -> Sample:
    """One sample of ``task`` that fits ``length`` tokens (prompt + generation budget).

    depth: needle depth in percent (single-needle tasks; default: RULER's random depth).
    max_new_tokens: cap on the task's generation budget (default RULER's).
    """
    if task not in TASKS:
        raise ValueError(f"--tasks: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    spec = TASKS[task]
    gen = spec.tokens_to_generate if max_new_tokens is None else min(max_new_tokens,
                                                                       spec.tokens_to_generate)
    rng = sample_rng(seed, task, length, index, depth)
    prompt, answers, meta = FAMILIES[spec.family](
        spec, tokenizer=tokenizer, length=length, budget=length - gen, rng=rng, depth=depth,
        essay_source=essay_source)
    return Sample(task=task, length=length, index=index, prompt=prompt, answers=answers,
                  max_new_tokens=gen, prompt_tokens=tokenizer.count(prompt), meta=meta)
