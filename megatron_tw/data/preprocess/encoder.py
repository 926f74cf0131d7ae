"""Record -> token ids, run in the worker processes (Megatron-LM's ``Encoder``).

Per record and per ``--json-keys`` key: decode the bytes (UTF-8, under the invalid-UTF-8
rule), parse the JSON line, take the key's string, ``tokenizer.tokenize(text)`` (megatron's
tokenizer, as training builds it), append EOD when asked. One document is one sequence
(document-level output, as Megatron-LM without ``--split-sentences``). With
``--split-sentences`` (Megatron-LM's ``Encoder.split`` + ``encode``): punkt splits the text,
each sentence is tokenized on its own and is one sequence of the document; sentences with no
token are dropped, EOD is appended to the last sentence (``sentences.py``).

Invalid UTF-8 rule (``--invalid-utf8``):
- ``error`` (default): the record is bad: its file, line and byte offset are reported.
- ``replace``: each invalid byte sequence becomes U+FFFD; the record is kept and counted
  as "documents with replaced bytes" in the summary.
A bad record stops the run with its file and line, unless ``--skip-bad-lines`` is given;
then it is skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy

from megatron_tw.data.preprocess.inputs import Record

INVALID_UTF8_RULES = ("error", "replace")


@dataclass
class EncodedRecord:
    """What a worker sends back for one record.

    ``documents[key]``: token ids, shape [n] (dtype of the output), n == 0 for an empty
    document. ``lengths[key]``: the sequence lengths (sum n): one per sentence with
    ``--split-sentences``, else None (one sequence). ``error``: the message for a bad record
    (``documents`` is None then).
    """

    nbytes: int
    documents: dict[str, numpy.ndarray] | None = None
    lengths: dict[str, list[int]] | None = None
    error: str | None = None
    replaced_utf8: bool = False
    blank: bool = False


class Encoder:
    """Holds the per-process tokenizer; ``encode(record)`` is what the pool maps."""

    tokenizer = None  # one per worker process, built by initializer()

    splitter = None  # punkt, with --split-sentences

    def __init__(self, tokenizer_args, json_keys: list[str], append_eod: bool,
                 invalid_utf8: str, dtype, split_sentences: bool = False,
                 lang: str = "english", keep_newlines: bool = False):
        if invalid_utf8 not in INVALID_UTF8_RULES:
            raise ValueError(f"--invalid-utf8 must be one of {INVALID_UTF8_RULES}")
        self.tokenizer_args = tokenizer_args
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.invalid_utf8 = invalid_utf8
        self.dtype = dtype
        self.split_sentences = split_sentences
        self.lang = lang
        self.keep_newlines = keep_newlines

    def initializer(self, tokenizer=None) -> None:
        from megatron_tw.data.preprocess.tokenizer import build_tokenizer

        Encoder.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(
            self.tokenizer_args)
        Encoder.eod = Encoder.tokenizer.eod if self.append_eod else None
        if self.split_sentences:
            from megatron_tw.data.preprocess.sentences import load_splitter

            Encoder.splitter = load_splitter(self.lang, self.keep_newlines)

    def encode(self, record: Record) -> EncodedRecord:
        nbytes = len(record.payload)
        text, replaced, error = self._decode(record)
        if error is not None:
            return EncodedRecord(nbytes, error=error)

        if record.is_json:
            if not text.strip():
                return EncodedRecord(nbytes, documents=None, blank=True)
            fields, error = self._parse_json(record, text)
            if error is not None:
                return EncodedRecord(nbytes, error=error)
        else:
            fields = {self.json_keys[0]: text}
        del text  # the decoded line: only the parsed strings are needed (long lines: memory)

        documents = {}
        lengths = {} if self.split_sentences else None
        for key in self.json_keys:
            if self.split_sentences:
                ids, lengths[key] = self._encode_sentences(fields[key])
            else:
                ids = Encoder.tokenizer.tokenize(fields[key])
            if ids and Encoder.eod is not None:
                ids.append(Encoder.eod)
                if lengths is not None:
                    lengths[key][-1] += 1
            documents[key] = numpy.asarray(ids, dtype=self.dtype)
        return EncodedRecord(nbytes, documents=documents, lengths=lengths,
                             replaced_utf8=replaced)

    def _encode_sentences(self, text: str) -> tuple[list[int], list[int]]:
        from megatron_tw.data.preprocess.sentences import split_sentences

        ids, lengths = [], []
        for sentence in split_sentences(Encoder.splitter, text):
            sentence_ids = Encoder.tokenizer.tokenize(sentence)
            if sentence_ids:  # Megatron-LM drops sentences with no token
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        return ids, lengths

    def _decode(self, record: Record) -> tuple[str | None, bool, str | None]:
        try:
            return record.payload.decode("utf-8"), False, None
        except UnicodeDecodeError as exc:
            if self.invalid_utf8 == "replace":
                return record.payload.decode("utf-8", errors="replace"), True, None
            offset = f"byte {exc.start} of the line" if record.is_json else f"byte {exc.start}"
            return None, False, (
                f"{record.where}: invalid UTF-8 at {offset} ({exc.reason}); fix the input, "
                "or pass --invalid-utf8 replace (substitutes U+FFFD, counted) or "
                "--skip-bad-lines (skips it, counted)")

    def _parse_json(self, record: Record, text: str) -> tuple[dict | None, str | None]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, (f"{record.where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                          "fix the line or pass --skip-bad-lines")
        if not isinstance(obj, dict):
            return None, (f"{record.where}: expected a JSON object, got "
                          f"{type(obj).__name__}; fix the line or pass --skip-bad-lines")
        for key in self.json_keys:
            if key not in obj:
                return None, (f"{record.where}: missing key {key!r} (keys: "
                              f"{sorted(obj)[:8]}); check --json-keys or pass "
                              "--skip-bad-lines")
            if not isinstance(obj[key], str):
                return None, (f"{record.where}: key {key!r} holds "
                              f"{type(obj[key]).__name__}, not a string; fix the line or "
                              "pass --skip-bad-lines")
            if not obj[key].isascii():
                try:  # a "\ud800" escape parses into a lone surrogate no tokenizer takes
                    obj[key].encode("utf-8")
                except UnicodeEncodeError as exc:
                    return None, (f"{record.where}: key {key!r} is not valid Unicode "
                                  f"({exc.reason} at character {exc.start}); fix the line "
                                  "or pass --skip-bad-lines")
        return obj, None
