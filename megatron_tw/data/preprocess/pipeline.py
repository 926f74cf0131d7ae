"""The preprocessing run: records -> worker pool (tokenize) -> IndexedDataset files.

Same structure as Megatron-LM's ``tools/preprocess_data.py``: the main process reads the
input, ``multiprocessing.Pool.imap`` (ordered) tokenizes in ``workers`` processes, and the
main process appends each document to one builder per JSON key. ``imap`` keeps input order,
so any ``--workers`` gives byte-identical output. With ``workers == 1`` the encoder runs in
the main process (no pool, same code path per record).

``--partitions N`` (Megatron-LM's): the input is cut into N contiguous runs of records
(ceil(records / N) each, Megatron-LM's ``--keep-sequential-samples`` split), each run is
processed by its own process with ``workers / N`` tokenizer processes into a temporary dataset,
and the parts are merged in order with ``IndexedDatasetBuilder.add_index`` (as Megatron-LM
merges them). The merged files are byte-identical to ``--partitions 1``; no partition file is
left behind.
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
    estimated_content_bytes,
    is_json_lines,
    iter_records,
    list_input_files,
    split_records,
    total_input_bytes,
)
from megatron_tw.data.preprocess.progress import Progress
from megatron_tw.data.preprocess.tokenizer import build_tokenizer
from megatron_tw.data.preprocess.writer import (
    AtomicDatasetWriter,
    output_prefix,
    remove_stale_temporaries,
    remove_temporaries_of,
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
    split_sentences: bool = False  # one sequence per sentence (nltk punkt), Megatron-LM's
    lang: str | None = None  # the punkt language (None: english); only with split_sentences
    keep_newlines: bool = False  # only with split_sentences
    partitions: int = 1  # Megatron-LM's --partitions: same output, N processes

    @property
    def level(self) -> str:
        """Megatron-LM's output level: ``<prefix>_<key>_<level>.bin/.idx``."""
        return "sentence" if self.split_sentences else "document"


@dataclass
class PreprocessSummary:
    """Counts of one run. ``documents``/``tokens``/``empty`` are per JSON key."""

    records: int = 0
    input_bytes: int = 0
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    empty: dict[str, int] = field(default_factory=dict)
    sentences: dict[str, int] | None = None  # sequences written, with --split-sentences
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
            sentences = (f", sentences: {self.sentences[key]}" if self.sentences is not None
                         else "")
            lines.append(f"  [{key}] documents written: {self.documents[key]}{sentences}, "
                         f"tokens: {self.tokens[key]}, empty documents (not written): "
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

    @classmethod
    def empty_for(cls, cfg: "PreprocessConfig") -> "PreprocessSummary":
        keys = cfg.json_keys
        return cls(documents=dict.fromkeys(keys, 0), tokens=dict.fromkeys(keys, 0),
                   empty=dict.fromkeys(keys, 0),
                   sentences=dict.fromkeys(keys, 0) if cfg.split_sentences else None)

    def add(self, part: "PreprocessSummary") -> None:
        """Add the counts of one partition (partitions added in input order)."""
        for name in ("records", "input_bytes", "blank_lines", "skipped_bad", "replaced_utf8"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        for name in ("documents", "tokens", "empty", "sentences"):
            mine, theirs = getattr(self, name), getattr(part, name)
            if mine is not None:
                for key in mine:
                    mine[key] += theirs[key]
        self.bad_examples = (self.bad_examples + part.bad_examples)[:MAX_REPORTED_BAD_LINES]


def _validate_flags(cfg: PreprocessConfig) -> None:
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.partitions < 1:
        raise PreprocessError(f"--partitions must be >= 1, got {cfg.partitions}")
    if cfg.workers % cfg.partitions:
        raise PreprocessError(
            f"--workers {cfg.workers} is not a multiple of --partitions {cfg.partitions}: as in "
            "Megatron-LM each partition gets workers / partitions tokenizer processes; pass "
            f"e.g. --workers {cfg.partitions * max(1, cfg.workers // cfg.partitions)}")
    if not cfg.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    if not cfg.split_sentences:
        for flag, given in (("--keep-newlines", cfg.keep_newlines),
                            ("--lang", cfg.lang is not None)):
            if given:
                raise PreprocessError(
                    f"{flag} applies only with --split-sentences (it sets how punkt splits "
                    f"sentences; as in Megatron-LM it does nothing alone): add "
                    f"--split-sentences or drop {flag}")


def _validate(cfg: PreprocessConfig, files) -> None:
    has_text_files = any(not is_json_lines(p) for p in files)
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
    _validate_flags(cfg)
    try:
        files = list_input_files(cfg.inputs)
    except FileNotFoundError as exc:
        raise PreprocessError(str(exc)) from exc
    _validate(cfg, files)
    missing_folders = _check_output_prefix(cfg.output_prefix)
    lang = cfg.lang or "english"
    if cfg.split_sentences:  # nltk and its punkt data, before any tokenizer or input is read
        from megatron_tw.data.preprocess.sentences import load_splitter

        load_splitter(lang, cfg.keep_newlines)
    tokenizer = build_tokenizer(cfg.tokenizer_args)
    if cfg.append_eod and tokenizer.eod is None:
        raise PreprocessError("--append-eod: this tokenizer defines no EOD/EOS token")
    dtype = token_dtype(tokenizer.vocab_size)
    encoder = Encoder(cfg.tokenizer_args, cfg.json_keys, cfg.append_eod, cfg.invalid_utf8,
                      dtype, cfg.split_sentences, lang, cfg.keep_newlines)

    summary = PreprocessSummary.empty_for(cfg)
    created = _make_folders(cfg.output_prefix, missing_folders)
    writers: dict[str, AtomicDatasetWriter] = {}
    progress = None
    start = time.perf_counter()
    try:
        for key in cfg.json_keys:
            summary.stale_removed += remove_stale_temporaries(
                output_prefix(cfg.output_prefix, key, cfg.level))
        progress = Progress(estimated_content_bytes(files), cfg.log_interval, cfg.progress)
        if cfg.partitions == 1:
            _open_writers(cfg, dtype, writers)
            _encode(cfg, encoder, tokenizer, iter_records(files), writers, summary, cfg.workers,
                    lambda records, nbytes: progress.update(records, nbytes))
        else:
            _run_partitions(cfg, encoder, tokenizer, dtype, files, writers, summary, progress)
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
        if progress is not None:
            progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _open_writers(cfg: PreprocessConfig, dtype, writers: dict) -> None:
    """One temporary-named writer per key (filled into ``writers``, for abort on failure)."""
    for key in cfg.json_keys:
        prefix = output_prefix(cfg.output_prefix, key, cfg.level)
        with _writing(cfg.output_prefix, os.path.dirname(os.path.abspath(prefix))):
            writers[key] = AtomicDatasetWriter(prefix, dtype)


def _encode(cfg: PreprocessConfig, encoder: Encoder, tokenizer, records, writers, summary,
            workers: int, tick) -> None:
    """Tokenize ``records`` (in ``workers`` processes, or here if 1) into ``writers``."""
    pool = None
    try:
        if workers == 1:
            encoder.initializer(tokenizer)
            results = map(encoder.encode, records)
        else:
            # fork: workers inherit the imported modules (megatron, torch) instead of
            # re-importing them for seconds each; each builds its own tokenizer.
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_pool_initializer, initargs=(encoder,))
            results = pool.imap(_encode_in_pool, records, cfg.chunksize)
        for result in results:
            _consume(result, cfg, writers, summary)
            tick(summary.records, result.nbytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _partition_main(cfg, encoder, tokenizer, dtype, files, start, count, index, counters,
                    conn) -> None:
    """One partition, in its own (forked) process: its records into temporary datasets.

    Sends ("ok", summary, {key: temporary prefix}) or ("error", message) to the parent.
    """
    summary = PreprocessSummary.empty_for(cfg)
    writers: dict[str, AtomicDatasetWriter] = {}

    def tick(records, nbytes):
        counters[2 * index] = records
        counters[2 * index + 1] += nbytes

    try:
        _open_writers(cfg, dtype, writers)
        _encode(cfg, encoder, tokenizer, iter_records(files, start, count), writers, summary,
                cfg.workers // cfg.partitions, tick)
        parts = {}
        for key, writer in writers.items():
            with _writing(cfg.output_prefix, writer.tmp_prefix + ".idx"):
                parts[key] = writer.finish_part()
        conn.send(("ok", summary, parts))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        for writer in writers.values():
            writer.abort()
        with contextlib.suppress(OSError):
            conn.send(("error", _one_line(exc)))
    finally:
        conn.close()


def _run_partitions(cfg, encoder, tokenizer, dtype, files, writers, summary, progress) -> None:
    """``--partitions``: contiguous runs of records in parallel processes, merged in order."""
    from multiprocessing.connection import wait

    parts = split_records(files, cfg.partitions)
    context = multiprocessing.get_context("fork")
    counters = context.Array("q", 2 * max(1, len(parts)), lock=False)
    children = []
    try:
        for index, (start, count) in enumerate(parts):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(
                target=_partition_main, name=f"preprocess-partition-{index}",
                args=(cfg, encoder, tokenizer, dtype, files, start, count, index, counters,
                      send))
            child.start()
            send.close()
            children.append((child, receive))
        results = [None] * len(children)
        pending = {receive: index for index, (_, receive) in enumerate(children)}
        seen_bytes = 0
        while pending:
            for receive in wait(list(pending), timeout=0.5):
                index = pending.pop(receive)
                with contextlib.suppress(EOFError):
                    results[index] = receive.recv()
            done_bytes = sum(counters[1::2])
            progress.update(sum(counters[0::2]), done_bytes - seen_bytes)
            seen_bytes = done_bytes
        for child, _ in children:
            child.join()
        for index, result in enumerate(results):  # the first failing part: N=1's error
            if result is None:
                raise PreprocessError(
                    f"--partitions: the process of partition {index + 1} of {len(parts)} ended "
                    f"without a result (exit code {children[index][0].exitcode}; killed, e.g. "
                    "out of memory?); rerun, with fewer --workers/--partitions if memory is short")
            if result[0] == "error":
                raise PreprocessError(result[1])
        _open_writers(cfg, dtype, writers)
        for key, writer in writers.items():
            with _writing(cfg.output_prefix, writer.tmp_prefix + ".bin"):
                for _, _, part_prefixes in results:
                    writer.add_index(part_prefixes[key])
        for _, part, _ in results:
            summary.add(part)
    finally:
        for child, receive in children:
            if child.is_alive():
                child.terminate()
            child.join()
            receive.close()
            for key in cfg.json_keys:  # the parts' temporary files, however the child ended
                remove_temporaries_of(output_prefix(cfg.output_prefix, key, cfg.level),
                                      child.pid)


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
        lengths = result.lengths[key] if result.lengths is not None else None
        with _writing(cfg.output_prefix, writers[key].tmp_prefix + ".bin"):
            writers[key].add(ids, lengths)
        summary.documents[key] += 1
        summary.tokens[key] += int(ids.size)
        if summary.sentences is not None:
            summary.sentences[key] += len(lengths)
