"""Train a SentencePiece BPE tokenizer (byte fallback) on JSON-lines documents.

Choices, and why:
- ``model_type=bpe``, ``byte_fallback=True``: every byte sequence is encodable (no <unk>),
  ~1 s per 10 MB (unigram is ~10x slower).
- ``normalization_rule_name=identity``, ``remove_extra_whitespaces=False``: encoding is
  lossless, ``decode(encode(text)) == text`` for whole documents (newlines and runs of
  spaces included: newlines become byte tokens). Long-document training keeps its
  paragraph structure, and megatron's SentencePieceTokenizer then takes its plain
  ``encode_as_ids`` path (it only rewrites whitespace for models that drop extra spaces).
- Fed sentences/short lines, not whole documents (SentencePiece drops inputs longer than
  ``max_sentence_length`` bytes): each document is cut at newlines, long lines at sentence
  ends, and anything still too long into fixed-size pieces.
- ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS = megatron's EOD), no pad (megatron's default).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MAX_SENTENCE_BYTES = 4000
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def iter_training_sentences(texts: Iterable[str], max_chars: int = 1000) -> Iterator[str]:
    """Cut documents into lines, long lines into sentences, long sentences into pieces."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            parts = [line] if len(line) <= max_chars else _SENTENCE_END.split(line)
            for part in parts:
                for start in range(0, len(part), max_chars):
                    piece = part[start:start + max_chars]
                    if piece.strip():
                        yield piece


def iter_jsonl_texts(paths: Iterable[str], key: str = "text") -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)[key]
                    except (json.JSONDecodeError, KeyError) as exc:
                        raise ValueError(f"{path}:{number}: no {key!r} string ({exc})") from exc


def training_options(vocab_size: int, model_type: str = "bpe", seed: int = 1234,
                     num_threads: int = 2, input_sentence_size: int = 2_000_000) -> dict:
    return dict(
        model_type=model_type, vocab_size=vocab_size, byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=num_threads, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=True, minloglevel=2, _seed=seed,
    )


def fingerprint(paths: list[str], options: dict) -> str:
    """Hash of the input files' contents and the options: equal hash, equal model."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def train_sentencepiece(inputs: list[str], out_dir: str | os.PathLike, vocab_size: int = 8000,
                        model_type: str = "bpe", key: str = "text", seed: int = 1234,
                        num_threads: int = 2, force: bool = False) -> tuple[Path, bool]:
    """Train ``out_dir/tokenizer.model`` (+ ``.vocab``) from JSON-lines ``inputs``.

    Returns (model path, trained): ``trained`` is False when an up-to-date model (same inputs
    and options, recorded in ``tokenizer.stamp``) was already there.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    model_path, stamp_path = out / "tokenizer.model", out / "tokenizer.stamp"
    options = training_options(vocab_size, model_type, seed, num_threads)
    stamp = fingerprint(inputs, options)
    if not force and model_path.exists() and stamp_path.exists() \
            and stamp_path.read_text().strip() == stamp:
        return model_path, False
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(options.pop("_seed"))
    # SentencePiece reads a text file fastest; it is written next to the model and removed.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        corpus = Path(tmp) / "sentences.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for sentence in iter_training_sentences(iter_jsonl_texts(inputs, key)):
                f.write(sentence + "\n")
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), **options)
        os.replace(f"{prefix}.model", model_path)
        os.replace(f"{prefix}.vocab", out / "tokenizer.vocab")
    stamp_path.write_text(stamp + "\n")
    return model_path, True
