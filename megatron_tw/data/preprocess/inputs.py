"""Input records for preprocessing: JSON lines, plain text files, or folders of them.

- ``*.jsonl`` / ``*.json``: one JSON object per line (Megatron-LM's input format).
- any other file: plain text, the whole file is ONE document (read as bytes, decoded by the
  encoder under the ``--invalid-utf8`` rule, stored under the single ``--json-keys`` key).
- a folder: every ``*.jsonl``, ``*.json`` and ``*.txt`` file below it, recursively, in sorted
  path order (so the output does not depend on the file system's listing order); hidden
  files and folders are ignored.

Records are read as raw bytes in the main process and decoded in the workers, so the main
process only moves bytes and a bad line is reported by the worker with its file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSON_SUFFIXES = (".jsonl", ".json")
FOLDER_SUFFIXES = (".jsonl", ".json", ".txt")


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


def list_input_files(inputs: list[str]) -> list[Path]:
    """Expand ``--input`` values (files or folders) into a list of files, in order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in FOLDER_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise FileNotFoundError(
                    f"--input {item}: the folder holds no {', '.join(FOLDER_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    return files


def iter_records(files: list[Path]) -> Iterator[Record]:
    """Yield the records of every file, in order (line numbers start at 1)."""
    for path in files:
        name = os.fspath(path)
        if path.suffix in JSON_SUFFIXES:
            with open(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                        line = line[3:]  # a UTF-8 byte order mark is not part of the JSON
                    yield Record(name, number, line, True)
        else:
            payload = path.read_bytes()
            if payload.startswith(b"\xef\xbb\xbf"):
                payload = payload[3:]
            yield Record(name, 0, payload, False)


def total_input_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)
