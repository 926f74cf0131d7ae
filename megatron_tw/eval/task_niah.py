"""Needle in a haystack (RULER's ``niah``): single, multi-key, multi-value and multi-query.

Needles are "One of the special magic {numbers} for {key} is: {value}." sentences hidden in a
haystack of RULER's noise sentence, of Paul Graham essays (inserted between sentences) or of other
needles with different keys (``needle`` haystack: distractors). The model is asked for the values
of one or more keys; the answers are all values of the queried keys.
"""

from __future__ import annotations

import random

from megatron_tw.eval import haystack as hs
from megatron_tw.eval.task_registry import DEPTHS, fit_haystack, needle_spans, register_family

TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided "
            "text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


def prompt_template(type_needle_v: str, single_answer: bool) -> tuple[str, str]:
    """Template + answer prefix and the value noun; singular wording for one answer (RULER)."""
    template = TEMPLATE + ANSWER_PREFIX
    if single_answer:
        template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        type_needle_v = type_needle_v[:-1]  # numbers -> number
    return template, type_needle_v


def _insert_by_depth(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert needle i before unit floor(len(units) * depth_i / 100) (needles in depth order)."""
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    out, prev = [], 0
    for i in order:
        pos = int(len(units) * depths[i] / 100)
        out += units[prev:pos]
        out.append(needles[i])
        prev = pos
    return out + units[prev:]


@register_family("niah")
def generate(spec, *, tokenizer, length, budget, rng: random.Random, depth=None,
             essay_source=None):
    p = spec.params
    k, v, q = p["num_needle_k"], p["num_needle_v"], p["num_needle_q"]
    kind_k, kind_v, type_v = p["type_needle_k"], p["type_needle_v"], p["type_needle_v"]
    keys = hs.distinct(rng, kind_k, k)
    values = [hs.distinct(rng, kind_v, v) for _ in range(k)]
    needles = [{"text": NEEDLE.format(type_needle_v=type_v, key=key, value=val), "key": key,
                "value": val} for key, vals in zip(keys, values) for val in vals]
    rng.shuffle(needles)
    if depth is not None and len(needles) != 1:
        raise ValueError(f"task {spec.name}: a fixed --needle-depths applies to single-needle "
                         "tasks only")
    depths = [float(depth)] if depth is not None else rng.sample(DEPTHS, len(needles))
    queried = rng.sample(range(k), q)
    query_keys = [keys[i] for i in queried]
    answers = [a for i in queried for a in values[i]]
    query = (", ".join(query_keys[:-1]) + ", and " + query_keys[-1]) if q > 1 else query_keys[0]
    template, type_v_text = prompt_template(type_v, q * v == 1)
    distractor_seed = rng.getrandbits(64)

    if p["type_haystack"] == "essay":
        words = hs.essay_words(hs.load_essays(essay_source))
    texts = [n["text"] for n in needles]

    def build(n: int):
        if p["type_haystack"] == "essay":
            reps = -(-n // len(words))
            sentences = hs.split_sentences(" ".join((words * reps)[:n]))
            context = " ".join(_insert_by_depth(sentences, texts, depths))
        elif p["type_haystack"] == "noise":
            context = "\n".join(_insert_by_depth([hs.NOISE] * n, texts, depths))
        elif p["type_haystack"] == "needle":
            # n distractor needles with keys other than the real ones; the same stream for every n
            drng = random.Random(distractor_seed)
            dkeys = hs.distinct(drng, kind_k, n, exclude=set(keys))
            distractors = [NEEDLE.format(type_needle_v=type_v, key=dk,
                                         value=hs.VALUE_GENERATORS[kind_v](drng)) for dk in dkeys]
            context = "\n".join(_insert_by_depth(distractors, texts, depths))
        else:
            raise ValueError(f"task {spec.name}: unknown haystack {p['type_haystack']!r}")
        prompt = template.format(type_needle_v=type_v_text, context=context, query=query)
        return prompt, context

    size, (prompt, context) = fit_haystack(build, tokenizer, budget, 1, spec.name, length)
    context_start = prompt.index(context)
    meta = {"depth": depths, "haystack": p["type_haystack"], "haystack_units": size,
            "query_keys": query_keys, "context_start": context_start,
            "context_end": context_start + len(context),
            "needles": needle_spans(prompt, needles, context_start)}
    return prompt, answers, meta
