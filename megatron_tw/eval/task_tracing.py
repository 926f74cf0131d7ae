"""Variable tracking (RULER's ``vt``): follow a chain of assignments through noise.

A chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (num_hops + 1 variables) is scattered,
in order, between repetitions of the noise sentence; the model must list every variable that ends
up holding the value. As in RULER, a short worked example (3-letter names, little noise) precedes
the question when ``icl`` is on.
"""

from __future__ import annotations

import random
import string

from megatron_tw.eval import haystack as hs
from megatron_tw.eval.task_registry import fit_haystack, needle_spans, register_family

TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text."
            "\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in "
            "the text above.")
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
                 "{num_v} variables are assigned the value {query}, they are: ")
NOISE_LINE = hs.NOISE + "\n"
ICL_NOISE = 5  # noise sentences in the worked example (RULER fits it into ~500 tokens)


def make_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int,
                exclude: set = frozenset()):
    """Variables [[names of chain c]] and statements [[statements of chain c]]."""
    names: list[str] = []
    seen = set(exclude)
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in seen:
            seen.add(name)
            names.append(name)
    variables, chains = [], []
    for c in range(num_chains):
        chain_vars = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        statements = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99999)}"]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)]
        variables.append(chain_vars)
        chains.append(statements)
    return variables, chains


def _context(chains, n_noise: int, positions_seed: int) -> str:
    """Noise lines with each chain's statements inserted in order at random places."""
    prng = random.Random(positions_seed)
    sentences = [NOISE_LINE] * n_noise
    for chain in chains:
        positions = sorted(prng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    return " ".join(sentences).replace(". \n", ".\n")


def _prompt(chains, variables, n_noise, positions_seed) -> str:
    query = chains[0][0].split("=")[-1].strip()
    text = TEMPLATE + ANSWER_PREFIX
    return text.format(context=_context(chains, n_noise, positions_seed), query=query,
                       num_v=len(variables[0]))


@register_family("variable_tracking")
def generate(spec, *, tokenizer, length, budget, rng: random.Random, depth=None,
             essay_source=None):
    p = spec.params
    if depth is not None:
        raise ValueError("vt has no single needle depth; --needle-depths applies to niah tasks")
    num_chains, num_hops = p["num_chains"], p["num_hops"]
    prefix = ""
    exclude: set = set()
    if p.get("icl", True):
        icl_hops = min(10, num_hops)
        icl_vars, icl_chains = make_chains(rng, num_chains, icl_hops, letters=3)
        exclude = {v for chain in icl_vars for v in chain}
        icl_noise = max(ICL_NOISE, num_chains * (icl_hops + 1))
        prefix = (_prompt(icl_chains, icl_vars, icl_noise, rng.getrandbits(64)) + " "
                  + " ".join(icl_vars[0]) + "\n\n")
    variables, chains = make_chains(rng, num_chains, num_hops, letters=5, exclude=exclude)
    positions_seed = rng.getrandbits(64)

    def build(n: int):
        return (prefix + _prompt(chains, variables, n, positions_seed),)

    minimum = num_chains * (num_hops + 1)
    size, (prompt,) = fit_haystack(build, tokenizer, budget, minimum, spec.name, length)
    start = len(prefix)
    statements = [{"text": s.strip(), "chain": c, "hop": j}
                  for c, chain in enumerate(chains) for j, s in enumerate(chain)]
    meta = {"haystack_units": size, "context_start": start, "icl": bool(prefix),
            "query": chains[0][0].split("=")[-1].strip(),
            "needles": needle_spans(prompt, statements, start)}
    return prompt, list(variables[0]), meta
