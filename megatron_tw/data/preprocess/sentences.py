"""``--split-sentences``: nltk's punkt sentence splitter, as Megatron-LM's tool uses it.

Megatron-LM (``tools/preprocess_data.py``): per JSON key, the text is cut into pieces of
1,000,000 characters, each piece split into sentences by punkt (``--lang`` names the punkt
model, default ``english``), each sentence tokenized on its own; sentences with no token are
dropped and EOD (``--append-eod``) is appended to the last one. The document is written as one
document of several sequences, one per sentence (``<prefix>_<key>_sentence.bin/.idx``).
``--keep-newlines`` builds punkt with Megatron-LM's ``CustomLanguageVars``: the whitespace after
a sentence end (newlines included) stays at the end of that sentence instead of being dropped.

The punkt data is nltk's ``punkt_tab`` (``python -m nltk.downloader punkt_tab``); the legacy
``punkt`` pickle Megatron-LM loads is used when only that one is installed (through nltk's
restricted unpickler). Nothing is downloaded at run time (Megatron-LM calls
``nltk.download("punkt")``): a missing model is a one-line error that says how to install it.
"""

from __future__ import annotations

import re

MAX_PIECE_CHARS = 1_000_000  # Megatron-LM's max_len: punkt gets the text in pieces of this size
DEFAULT_LANG = "english"
INSTALL_DATA = ("python -m nltk.downloader punkt_tab (offline: unzip nltk_data's "
                "tokenizers/punkt_tab.zip into <folder>/tokenizers/ and set NLTK_DATA=<folder>)")


class SentenceSplitError(ValueError):
    """nltk or its punkt data is missing, or ``--lang`` names no punkt model (one line)."""


_KEEP_NEWLINES_VARS = None


def _keep_newlines_vars():
    """Megatron-LM's ``CustomLanguageVars`` (its ``--keep-newlines``), built once nltk is there."""
    global _KEEP_NEWLINES_VARS
    if _KEEP_NEWLINES_VARS is None:
        from nltk.tokenize.punkt import PunktLanguageVars

        class CustomLanguageVars(PunktLanguageVars):
            _period_context_fmt = r"""
                \S*                          # some word material
                %(SentEndChars)s             # a potential sentence ending
                \s*                          # the whitespace after it stays in the sentence
                (?=(?P<after_tok>
                    %(NonWord)s              # either other punctuation
                    |
                    (?P<next_tok>\S+)        # or the next token (punkt: whitespace, token)
                ))"""

        _KEEP_NEWLINES_VARS = CustomLanguageVars
    return _KEEP_NEWLINES_VARS


def installed_languages() -> list[str]:
    """Punkt models found in nltk's data folders (``punkt_tab`` folders, ``punkt`` pickles)."""
    import os

    import nltk

    found = set()
    for root in nltk.data.path:
        tab = os.path.join(root, "tokenizers", "punkt_tab")
        if os.path.isdir(tab):
            found.update(n for n in os.listdir(tab) if os.path.isdir(os.path.join(tab, n)))
        legacy = os.path.join(root, "tokenizers", "punkt")
        if os.path.isdir(legacy):
            found.update(n[:-7] for n in os.listdir(legacy) if n.endswith(".pickle"))
    return sorted(found)


def load_splitter(lang: str = DEFAULT_LANG, keep_newlines: bool = False):
    """The punkt sentence tokenizer Megatron-LM's tool builds for ``--lang``/``--keep-newlines``.

    Raises SentenceSplitError (one line: what is missing and how to install it).
    """
    try:
        import nltk
        from nltk.tokenize import punkt
    except ImportError as exc:
        raise SentenceSplitError(
            f"--split-sentences needs nltk, which is not installed ({exc}): pip install nltk, "
            f"then {INSTALL_DATA}") from exc
    if not re.fullmatch(r"[A-Za-z0-9_-]+", lang or ""):
        raise SentenceSplitError(
            f"--lang {lang!r}: not a punkt language name (one word of letters, digits, - or _, "
            "e.g. english, german, french)")
    splitter = None
    if hasattr(punkt, "PunktTokenizer"):  # nltk >= 3.8.2: the punkt_tab data
        try:
            splitter = punkt.PunktTokenizer(lang)
        except LookupError:
            pass
    if splitter is None:
        try:  # the legacy pickle, as Megatron-LM loads it
            pointer = nltk.data.find(f"tokenizers/punkt/{lang}.pickle")
        except LookupError:
            pointer = None
        if pointer is not None:
            with pointer.open() as f:
                splitter = (punkt.punkt_pickle_load(f) if hasattr(punkt, "punkt_pickle_load")
                            else __import__("pickle").load(f))
    if splitter is None:
        others = installed_languages()
        if others:
            raise SentenceSplitError(
                f"--lang {lang}: no punkt model for this language in nltk's data folders "
                f"(installed: {', '.join(others)}); pick one of those, or install all of them: "
                f"{INSTALL_DATA}")
        raise SentenceSplitError(
            f"--split-sentences needs nltk's punkt data, which is not installed (searched "
            f"tokenizers/punkt_tab/{lang}/ in {', '.join(nltk.data.path)}): {INSTALL_DATA}")
    if keep_newlines:
        splitter = punkt.PunktSentenceTokenizer(train_text=splitter._params,
                                                lang_vars=_keep_newlines_vars()())
    return splitter


def split_sentences(splitter, text: str) -> list[str]:
    """Megatron-LM's ``Encoder.split``: punkt on each 1,000,000-character piece, in order."""
    return [sentence for i in range(0, len(text), MAX_PIECE_CHARS)
            for sentence in splitter.tokenize(text[i:i + MAX_PIECE_CHARS])]
