"""Aggregation tasks: common-words (``cwe``) and frequent-words (``fwe``) extraction (RULER).

cwe: a numbered list of words in which ``num_cw`` words repeat ``freq_cw`` times and the others
``freq_ucw`` times; the model names the 10 most common. Below 4096 tokens RULER uses 6 and 1
repeats and a smaller worked example; both cases are kept.
fwe: "coded" random words drawn with Zipf frequencies (count of rank k ~ N k^-alpha / zeta(alpha));
the rank-1 word is the noise '...', the answers are ranks 2-4.
"""

from __future__ import annotations

import math
import random
import string

from megatron_tw.eval import haystack as hs
from megatron_tw.eval.task_registry import fit_haystack, register_family

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                "the 10 most common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find "
                "the three most frequently appeared coded words. {context}\nQuestion: Do not "
                "provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = (" Answer: According to the coded text above, the three most frequently "
                     "appeared words are:")
SHORT_CONTEXT = 4096  # RULER's switch between the small and the full cwe configuration


def numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(words, num_cw: int, freq_cw: int, freq_ucw: int, shuffle_seed: int):
    """The shuffled word list (common words first in ``words``) and the common words."""
    common, uncommon = list(words[:num_cw]), list(words[num_cw:])
    items = common * freq_cw + uncommon * freq_ucw
    random.Random(shuffle_seed).shuffle(items)
    return items, common


@register_family("common_words")
def generate_cwe(spec, *, tokenizer, length, budget, rng: random.Random, depth=None,
                 essay_source=None):
    p = spec.params
    if depth is not None:
        raise ValueError("cwe has no needle depth; --needle-depths applies to niah tasks")
    num_cw = p["num_cw"]
    vocab = hs.english_words()
    if length < SHORT_CONTEXT:
        example_cfg, main_cfg = (20, 3, 1), (6, 1)
    else:
        example_cfg, main_cfg = (40, 10, 3), (p["freq_cw"], p["freq_ucw"])
    n_example, f_cw, f_ucw = example_cfg
    example_words = rng.sample(vocab, n_example)
    ex_items, ex_common = cwe_list(example_words, num_cw, f_cw, f_ucw, rng.getrandbits(64))
    template = CWE_TEMPLATE + CWE_ANSWER_PREFIX
    example = (template.format(context=numbered(ex_items)) + " " + numbered(ex_common))
    # The main list's words: a prefix of one seeded permutation, so the binary search over the
    # list size changes only how many uncommon words there are.
    taken = set(example_words)
    rest = [w for w in vocab if w not in taken]
    pool = rng.sample(rest, len(rest))
    shuffle_seed = rng.getrandbits(64)

    def build(n: int):
        items, common = cwe_list(pool[:n], num_cw, *main_cfg, shuffle_seed)
        return example + "\n" + template.format(context=numbered(items)), common

    size, (prompt, common) = fit_haystack(build, tokenizer, budget, num_cw + 1, spec.name, length)
    meta = {"haystack_units": size, "repeats": list(main_cfg),
            "context_start": len(example) + 1}
    return prompt, common, meta


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha), alpha > 1: a partial sum plus its Euler-Maclaurin tail."""
    if alpha <= 1:
        raise ValueError(f"fwe alpha must be > 1, got {alpha}")
    head = sum(k ** -alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


def coded_vocabulary(rng: random.Random, size: int, wordlen: int) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise (RULER)
    return words


@register_family("freq_words")
def generate_fwe(spec, *, tokenizer, length, budget, rng: random.Random, depth=None,
                 essay_source=None):
    p = spec.params
    if depth is not None:
        raise ValueError("fwe has no needle depth; --needle-depths applies to niah tasks")
    alpha = p["alpha"]
    vocab = coded_vocabulary(rng, p["vocab_size"], p["coded_wordlen"])
    z = zeta(alpha)
    shuffle_seed = rng.getrandbits(64)
    template = FWE_TEMPLATE + FWE_ANSWER_PREFIX

    def build(n: int):
        items = []
        for k, word in enumerate(vocab, start=1):
            count = int(n * k ** -alpha / z)
            if count == 0:
                break
            items += [word] * count
        random.Random(shuffle_seed).shuffle(items)
        return (template.format(context=" ".join(items)),)

    # The answers are ranks 2-4: they need distinct counts, i.e. int(n * 4^-alpha / z) >= 1 and
    # rank 4 above rank 5.
    minimum = max(8, math.ceil(z * 5 ** alpha))
    size, (prompt,) = fit_haystack(build, tokenizer, budget, minimum, spec.name, length)
    counts = [int(size * k ** -alpha / z) for k in (1, 2, 3, 4, 5)]
    meta = {"haystack_units": size, "counts_rank1_to_5": counts, "noise_word": vocab[0]}
    return prompt, vocab[1:4], meta
