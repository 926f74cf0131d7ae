"""Input records for preprocessing: JSON lines, plain text files, or folders of them.

- ``*.jsonl`` / ``*.json``: one JSON object per line (Megatron-LM's input format).
- any other file: plain text, the whole file is ONE document (read as bytes, decoded by the
  encoder under the ``--invalid-utf8`` rule, stored under the single ``--json-keys`` key).
- ``*.gz``: gzip-compressed, read through ``gzip``; the suffix before ``.gz`` decides as above
  (``a.jsonl.gz`` is JSON lines, ``a.txt.gz`` plain text). Same records as the uncompressed file.
- a folder: every ``*.jsonl``, ``*.json`` and ``*.txt`` file below it, and the same names with
  ``.gz``, recursively, in sorted path order (so the output does not depend on the file system's
  listing order); hidden files and folders are ignored.
- a glob pattern (``'data/*.jsonl'``, as Megatron-LM's ``--input`` with ``--partitions``): the
  matching files and folders, in sorted order.

Records are read as raw bytes in the main process and decoded in the workers, so the main
process only moves bytes and a bad line is reported by the worker with its file and line.
"""

from __future__ import annotations

import collections
import glob
import gzip
import itertools
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSON_SUFFIXES = (".jsonl", ".json")
FOLDER_SUFFIXES = (".jsonl", ".json", ".txt")
GZIP_SUFFIX = ".gz"
_CHUNK = 1 << 20


class InputError(ValueError):
    """An input that cannot be read as what its name says (e.g. a corrupt ``.gz``)."""


@dataclass(frozen=True)
class Record:
    """One unit of input: a JSON line, or a whole text file (``line`` is 0 then)."""

    path: str
    line: int
    payload: bytes
    is_json: bool

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.is_json else self.path


def is_gzip(path: Path) -> bool:
    return path.suffix == GZIP_SUFFIX


def content_suffix(path: Path) -> str:
    """The suffix that says what the file holds: ``a.jsonl.gz`` -> ``.jsonl``."""
    return Path(path.stem).suffix if is_gzip(path) else path.suffix


def is_json_lines(path: Path) -> bool:
    return content_suffix(path) in JSON_SUFFIXES


def _open(path: Path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _in_folder(path: Path, root: Path) -> bool:
    return (path.is_file() and content_suffix(path) in FOLDER_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(root).parts))


def list_input_files(inputs: list[str]) -> list[Path]:
    """Expand ``--input`` values (files, folders, glob patterns) into a list of files, in order."""
    files: list[Path] = []
    for item in inputs:
        if not os.path.exists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input {item}: no file or folder matches this pattern")
        else:
            matches = [item]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if _in_folder(p, path))
                if not found:
                    names = FOLDER_SUFFIXES + tuple(s + GZIP_SUFFIX for s in FOLDER_SUFFIXES)
                    raise FileNotFoundError(
                        f"--input {match}: the folder holds no {', '.join(names)} files")
                files.extend(found)
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"--input {match}: no such file or folder")
    return files


def _corrupt(path: Path, exc: BaseException) -> InputError:
    return InputError(f"{os.fspath(path)}: not a readable gzip file ({exc}); recompress it "
                      "(gzip) or pass the uncompressed file")


def _skip_lines(f, n: int) -> None:
    """Read past the first ``n`` lines of the binary file ``f`` (at its start)."""
    collections.deque(itertools.islice(f, n), maxlen=0)


def iter_records(files: list[Path], start: tuple[int, int] = (0, 1),
                 limit: int | None = None) -> Iterator[Record]:
    """Yield the records of every file, in order (line numbers start at 1).

    ``start`` = (index in ``files``, line number of the first record in that file; a plain text
    file is one record, any line number means the whole file) and ``limit`` (at most this many
    records) select one contiguous part of the input (``--partitions``).
    """
    left = limit
    first_file, first_line = start
    for index in range(first_file, len(files)):
        if left is not None and left <= 0:
            return
        path = files[index]
        name = os.fspath(path)
        skip = first_line - 1 if index == first_file else 0
        try:
            if is_json_lines(path):
                with _open(path) as f:
                    if skip:
                        _skip_lines(f, skip)
                    for number, line in enumerate(f, start=skip + 1):
                        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                            line = line[3:]  # a UTF-8 byte order mark is not part of the JSON
                        yield Record(name, number, line, True)
                        if left is not None:
                            left -= 1
                            if left <= 0:
                                return
            else:
                with _open(path) as f:
                    payload = f.read()
                if payload.startswith(b"\xef\xbb\xbf"):
                    payload = payload[3:]
                yield Record(name, 0, payload, False)
                if left is not None:
                    left -= 1
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _corrupt(path, exc) from exc


def count_records(path: Path) -> int:
    """How many records ``iter_records`` yields for this file (lines, or 1 for a text file)."""
    if not is_json_lines(path):
        return 1
    lines, last = 0, b"\n"
    try:
        with _open(path) as f:
            while chunk := f.read(_CHUNK):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _corrupt(path, exc) from exc
    return lines + (last != b"\n")


def split_records(files: list[Path], parts: int) -> list[tuple[tuple[int, int], int]]:
    """Cut the input into ``parts`` contiguous runs of records, in order.

    Returns (start, count) per non-empty part, for ``iter_records(files, start, count)``.
    Sizes as Megatron-LM's ``--keep-sequential-samples``: ceil(records / parts) each, the last
    part smaller.
    """
    counts = [count_records(p) for p in files]
    total = sum(counts)
    size = max(1, -(-total // parts))
    result = []
    first = 0  # global index of the next part's first record
    file_index, file_first = 0, 0  # the file holding record `first`, and its first record
    while first < total:
        while first >= file_first + counts[file_index]:
            file_first += counts[file_index]
            file_index += 1
        line = first - file_first + 1
        result.append(((file_index, line), min(size, total - first)))
        first += size
    return result


def total_input_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def estimated_content_bytes(files: list[Path]) -> int:
    """Uncompressed input size, for progress: a ``.gz`` file's size field (its last 4 bytes, the
    size modulo 4 GiB of its last member), the file size otherwise."""
    total = 0
    for path in files:
        size = path.stat().st_size
        if is_gzip(path) and size >= 18:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = int.from_bytes(f.read(4), "little")
        total += size
    return total
