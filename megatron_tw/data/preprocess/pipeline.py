"""The preprocessing run: records -> worker pool (tokenize) -> IndexedDataset files.

Same structure as Megatron-LM's ``tools/preprocess_data.py``: the main process reads the
input, ``multiprocessing.Pool.imap`` (ordered) tokenizes in ``workers`` processes, and the
main process appends each document to one builder per JSON key. ``imap`` keeps input order,
so any ``--workers`` gives byte-identical output. With ``workers == 1`` the encoder runs in
the main process (no pool, same code path per record).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing
import os
import time
from dataclasses import dataclass, field

from megatron_tw.data.preprocess.encoder import EncodedRecord, Encoder
from megatron_tw.data.preprocess.inputs import (
    JSON_SUFFIXES,
    iter_records,
    list_input_files,
    total_input_bytes,
)
from megatron_tw.data.preprocess.progress import Progress
from megatron_tw.data.preprocess.tokenizer import build_tokenizer
from megatron_tw.data.preprocess.writer import (
    AtomicDatasetWriter,
    output_prefix,
    remove_stale_temporaries,
    token_dtype,
)

MAX_REPORTED_BAD_LINES = 5


class PreprocessError(RuntimeError):
    """Bad input or configuration; the message names the file/line or flag and the fix."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_args: argparse.Namespace
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False
    invalid_utf8: str = "error"
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise
    chunksize: int = 32


@dataclass
class PreprocessSummary:
    """Counts of one run. ``documents``/``tokens``/``empty`` are per JSON key."""

    records: int = 0
    input_bytes: int = 0
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    empty: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    replaced_utf8: int = 0
    seconds: float = 0.0
    outputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    stale_removed: list[str] = field(default_factory=list)  # an interrupted run's temp files

    def format(self) -> str:
        mb = self.input_bytes / 1e6
        rate = f"{self.records / self.seconds:.0f} docs/s, {mb / self.seconds:.2f} MB/s" \
            if self.seconds > 0 else "n/a"
        lines = [f"Processed {self.records} records ({mb:.2f} MB) in {self.seconds:.1f} s "
                 f"({rate})"]
        for key in self.documents:
            lines.append(f"  [{key}] documents written: {self.documents[key]}, tokens: "
                         f"{self.tokens[key]}, empty documents (not written): "
                         f"{self.empty[key]}")
        lines.append(f"  skipped bad lines: {self.skipped_bad}, blank lines: "
                     f"{self.blank_lines}, documents with invalid UTF-8 replaced: "
                     f"{self.replaced_utf8}")
        lines += [f"    skipped: {message}" for message in self.bad_examples]
        if self.skipped_bad > len(self.bad_examples):
            lines.append(f"    ... and {self.skipped_bad - len(self.bad_examples)} more")
        if self.stale_removed:
            n = len(self.stale_removed)
            lines.append(f"  removed {n} temporary file{'s' if n > 1 else ''} of an interrupted "
                         f"earlier run: {', '.join(self.stale_removed)}")
        for key, (bin_path, idx_path) in self.outputs.items():
            lines.append(f"  [{key}] -> {bin_path}, {idx_path}")
        return "\n".join(lines)


def _validate(cfg: PreprocessConfig, files) -> None:
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    if not cfg.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    has_text_files = any(p.suffix not in JSON_SUFFIXES for p in files)
    if has_text_files and len(cfg.json_keys) != 1:
        raise PreprocessError(
            f"plain text inputs are one document per file under a single key, but "
            f"--json-keys is {cfg.json_keys}: pass one key (e.g. --json-keys text)")
    if total_input_bytes(files) == 0:
        raise PreprocessError(
            f"--input {' '.join(map(str, cfg.inputs))}: the input is empty (0 bytes); a dataset "
            "needs at least one document: check the path or the step that wrote it")


def _check_output_prefix(prefix: str) -> list[str]:
    """The folders ``--output-prefix`` needs that do not exist yet (outermost first); raises if a
    path component is a file."""
    folder = os.path.dirname(os.path.abspath(prefix))
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise PreprocessError(
            f"--output-prefix {prefix}: {folder} is a file, not a folder; choose a prefix "
            "inside a folder (missing folders are created)")
    return missing[::-1]


def _unwritable(prefix: str, path: str, exc: OSError) -> PreprocessError:
    fix = ("free space or choose a folder on another disk" if exc.errno == errno.ENOSPC else
           "choose a folder you can write to")
    return PreprocessError(
        f"--output-prefix {prefix}: cannot write {path} ({exc.strerror or exc}); {fix}")


@contextlib.contextmanager
def _writing(prefix: str, path: str):
    """Turn an OSError while creating or writing the output into the one-line error."""
    try:
        yield
    except OSError as exc:
        raise _unwritable(prefix, path, exc) from exc


def _make_folders(prefix: str, missing: list[str]) -> list[str]:
    """Create the missing output folders; returns those created (to remove on failure)."""
    created = []
    try:
        for folder in missing:
            with _writing(prefix, folder):
                os.mkdir(folder)
            created.append(folder)
    except BaseException:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[str]) -> None:
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only while empty: never anything that another process put there
        except OSError:
            pass


def _check_documents(cfg: PreprocessConfig, summary: PreprocessSummary) -> None:
    """Refuse to write a dataset with no document (GPTDataset cannot sample from it)."""
    for key, count in summary.documents.items():
        if count == 0:
            raise PreprocessError(
                f"--input {' '.join(map(str, cfg.inputs))}: no non-empty document for key "
                f"{key!r} ({summary.records} records: {summary.blank_lines} blank lines, "
                f"{summary.empty[key]} empty documents, {summary.skipped_bad} skipped bad lines); "
                "a dataset needs at least one document: check the input and --json-keys")


_POOL_ENCODER: Encoder | None = None  # set in each worker process by its initializer


def _pool_initializer(encoder: Encoder) -> None:
    global _POOL_ENCODER
    _POOL_ENCODER = encoder
    encoder.initializer()


def _encode_in_pool(record):
    return _POOL_ENCODER.encode(record)


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Run preprocessing; returns the summary, raises PreprocessError on bad input.

    On any error (or interrupt) nothing is left under the final output names.
    """
    try:
        files = list_input_files(cfg.inputs)
    except FileNotFoundError as exc:
        raise PreprocessError(str(exc)) from exc
    _validate(cfg, files)
    missing_folders = _check_output_prefix(cfg.output_prefix)
    tokenizer = build_tokenizer(cfg.tokenizer_args)
    if cfg.append_eod and tokenizer.eod is None:
        raise PreprocessError("--append-eod: this tokenizer defines no EOD/EOS token")
    dtype = token_dtype(tokenizer.vocab_size)
    encoder = Encoder(cfg.tokenizer_args, cfg.json_keys, cfg.append_eod, cfg.invalid_utf8,
                      dtype)

    summary = PreprocessSummary(documents={k: 0 for k in cfg.json_keys},
                                tokens={k: 0 for k in cfg.json_keys},
                                empty={k: 0 for k in cfg.json_keys})
    created = _make_folders(cfg.output_prefix, missing_folders)
    writers: dict[str, AtomicDatasetWriter] = {}
    progress = None
    start = time.perf_counter()
    pool = None
    try:
        for key in cfg.json_keys:
            prefix = output_prefix(cfg.output_prefix, key)
            summary.stale_removed += remove_stale_temporaries(prefix)
            with _writing(cfg.output_prefix, os.path.dirname(os.path.abspath(prefix))):
                writers[key] = AtomicDatasetWriter(prefix, dtype)
        progress = Progress(total_input_bytes(files), cfg.log_interval, cfg.progress)
        records = iter_records(files)
        if cfg.workers == 1:
            encoder.initializer(tokenizer)
            results = map(encoder.encode, records)
        else:
            # fork: workers inherit the imported modules (megatron, torch) instead of
            # re-importing them for seconds each; each builds its own tokenizer.
            pool = multiprocessing.get_context("fork").Pool(
                cfg.workers, initializer=_pool_initializer, initargs=(encoder,))
            results = pool.imap(_encode_in_pool, records, cfg.chunksize)
        for result in results:
            _consume(result, cfg, writers, summary)
            progress.update(summary.records, result.nbytes)
        _check_documents(cfg, summary)
        for key, writer in writers.items():
            with _writing(cfg.output_prefix, writer.prefix + ".bin/.idx"):
                summary.outputs[key] = writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        _remove_folders(created)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if progress is not None:
            progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _consume(result: EncodedRecord, cfg: PreprocessConfig, writers, summary) -> None:
    summary.records += 1
    summary.input_bytes += result.nbytes
    if result.error is not None:
        if not cfg.skip_bad_lines:
            raise PreprocessError(result.error)
        summary.skipped_bad += 1
        if len(summary.bad_examples) < MAX_REPORTED_BAD_LINES:
            summary.bad_examples.append(result.error)
        return
    if result.blank:
        summary.blank_lines += 1
        return
    summary.replaced_utf8 += int(result.replaced_utf8)
    for key, ids in result.documents.items():
        if ids.size == 0:
            summary.empty[key] += 1  # a zero-length sequence would break GPTDataset
            continue
        with _writing(cfg.output_prefix, writers[key].tmp_prefix + ".bin"):
            writers[key].add(ids)
        summary.documents[key] += 1
        summary.tokens[key] += int(ids.size)
