"""Offline scoring for ``tools/score_data.py``: chunks, shards, resumption and the atomic merge.

The rows of a split are cut into chunks of ``chunk_rows`` samples; chunk k belongs to rank
``k mod world_size`` (an even static split; it does not depend on which chunks are already done,
so a rerun with another process count reuses every finished chunk). Each chunk is written as its
own IndexedDataset shard under ``PREFIX_<split>.parts-<record hash>/`` and marked done by a
``.done`` file written after the shard is complete; a rerun skips done chunks. The parts folder
is named by a hash of everything the rows depend on, so shards of another scorer or other data
are never mixed in. Rank 0 waits for every marker (by polling the folder, not a collective: ranks
may finish hours apart), concatenates the shards into ``PREFIX_<split>.bin/.idx`` under temporary
names, renames them into place and writes ``PREFIX_<split>.json`` last: a reader never sees a
half-written sidecar with a valid JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy
import torch

from megatron_tw.data.short_loss import (
    FORMAT,
    Sidecar,
    SidecarError,
    file_identity,
    open_sidecar,
    read_index,
    split_paths,
)

# samples (list of dataset samples) -> short-context losses, float32 [len(samples), seq_length]
ScoreFn = Callable[[list], torch.Tensor]


def record_hash(record: dict) -> str:
    """Hash of what the rows depend on (fingerprint, scorer, rows), not of provenance."""
    key = {k: record[k] for k in ("fingerprint", "scorer", "rows", "seq_length")}
    text = json.dumps(key, sort_keys=True).encode()
    return hashlib.md5(text, usedforsecurity=False).hexdigest()[:12]


def chunk_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def parts_dir(prefix: str, split: str, record: dict) -> str:
    return f"{prefix}_{split}.parts-{record_hash(record)}"


def _chunk(parts: str, k: int) -> str:
    return os.path.join(parts, f"chunk_{k:06d}")


def chunk_done(parts: str, k: int) -> bool:
    return os.path.exists(_chunk(parts, k) + ".done")


def write_chunk(parts: str, k: int, losses: numpy.ndarray) -> None:
    """Write chunk k ([rows, seq_length] float32) as an IndexedDataset shard, then its marker."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(parts, exist_ok=True)
    base, tmp = _chunk(parts, k), _chunk(parts, k) + ".tmp"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=numpy.float32)
    for row in numpy.ascontiguousarray(losses, dtype=numpy.float32):
        builder.add_document(row, [row.shape[0]])
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", base + ".bin")
    os.replace(tmp + ".idx", base + ".idx")
    with open(base + ".done.tmp", "w") as f:
        f.write(f"{len(losses)}\n")
    os.replace(base + ".done.tmp", base + ".done")


def score_rows(dataset, start: int, stop: int, score_fn: ScoreFn, batch: int,
               progress: Optional[Callable[[int], None]] = None) -> numpy.ndarray:
    """Losses of samples [start, stop) of ``dataset``, ``batch`` samples per call of score_fn."""
    out = []
    for lo in range(start, stop, batch):
        samples = [dataset[i] for i in range(lo, min(lo + batch, stop))]
        losses = score_fn(samples)
        out.append(losses.detach().to("cpu", torch.float32).numpy())
        if progress is not None:
            progress(len(samples))
    return numpy.concatenate(out)


class _Bar:
    """Rank 0's tqdm bar over the split's rows: its own rows as they are scored, everyone's
    finished chunks as their markers appear (re-counted at most every 2 s)."""

    def __init__(self, enabled: bool, total: int, desc: str, count_done: Callable[[], int]):
        self.bar, self.count_done, self.own, self.last = None, count_done, 0, 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="sample", file=sys.stderr,
                            mininterval=1.0, dynamic_ncols=True)
            self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        if self.bar is None or (not force and time.monotonic() - self.last < 2.0):
            return
        self.last = time.monotonic()
        self.bar.n = min(self.bar.total, self.count_done() + self.own)
        self.bar.refresh()

    def add(self, n: int) -> None:
        self.own += n
        self.refresh()

    def chunk_finished(self, n: int) -> None:
        self.own -= n  # now counted by its marker
        self.refresh(force=True)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh(force=True)
            self.bar.close()


def merge_chunks(parts: str, ranges: Sequence[tuple[int, int]], prefix: str, split: str,
                 record: dict) -> None:
    """Concatenate the shards into the split's sidecar; replace any old one atomically."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    paths = split_paths(prefix, split)
    tmp = {key: f"{path}.tmp" for key, path in paths.items()}
    builder = IndexedDatasetBuilder(tmp["bin"], dtype=numpy.float32)
    seq_length = record["seq_length"]
    for k, (start, stop) in enumerate(ranges):
        # Row by row (document i = row i); megatron's add_index would run gc.collect per shard.
        base = _chunk(parts, k)
        n = read_index(base + ".idx", seq_length)
        rows = numpy.fromfile(base + ".bin", dtype=numpy.float32)
        if n != stop - start or rows.size != n * seq_length:
            raise SidecarError(f"{base}: {n} rows ({rows.size} values), expected {stop - start} "
                               f"of {seq_length}; delete {parts} and rescore")
        for row in rows.reshape(n, seq_length):
            builder.add_document(row, [seq_length])
    builder.finalize(tmp["idx"])
    record = dict(record, files={"bin": file_identity(tmp["bin"]),
                                 "idx": file_identity(tmp["idx"])})
    with open(tmp["json"], "w") as f:
        json.dump(record, f, indent=1)
    # The JSON goes last: without it (or with an old one whose sizes no longer match) a reader
    # rejects the files, so a crash between the renames never passes for a complete sidecar.
    if os.path.exists(paths["json"]):
        os.remove(paths["json"])
    os.replace(tmp["bin"], paths["bin"])
    os.replace(tmp["idx"], paths["idx"])
    os.replace(tmp["json"], paths["json"])
    shutil.rmtree(parts)


def _stale_parts(prefix: str, split: str, keep: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(prefix))
    stem = os.path.basename(f"{prefix}_{split}.parts-")
    return [os.path.join(folder, name) for name in os.listdir(folder)
            if name.startswith(stem) and os.path.join(folder, name) != os.path.abspath(keep)]


def is_complete(prefix: str, split: str, record: dict) -> bool:
    """Whether the split's sidecar already holds exactly these rows."""
    try:
        sidecar = open_sidecar(prefix, split, fingerprint=record["fingerprint"],
                               rows=record["rows"], seq_length=record["seq_length"])
    except SidecarError:
        return False
    stored = sidecar.record
    return all(stored.get(k) == record[k] for k in ("scorer", "rows", "seq_length"))


@dataclass
class SplitPlan:
    """One split's work for one rank, decided before any rank writes (see ``plan_split``)."""

    prefix: str
    split: str
    record: dict
    ranges: list[tuple[int, int]]
    parts: str
    pending: list[int]  # this rank's chunks without a done marker
    complete: bool      # the split's sidecar already holds exactly these rows


def plan_split(record: dict, *, prefix: str, split: str, chunk_rows: int, rank: int,
               world_size: int) -> SplitPlan:
    """Decide what this rank does for one split. Every rank plans every split *before* any rank
    scores (the tool puts a barrier in between): once rank 0 merges a split it deletes the
    shards, and a rank that looked only then would score its chunks again."""
    ranges = chunk_ranges(record["rows"], chunk_rows)
    parts = parts_dir(prefix, split, record)
    complete = is_complete(prefix, split, record)
    pending = [] if complete else [k for k in range(rank, len(ranges), world_size)
                                   if not chunk_done(parts, k)]
    return SplitPlan(prefix, split, record, ranges, parts, pending, complete)


def run_split(plan: SplitPlan, dataset, score_fn: ScoreFn, *, batch: int, rank: int,
              world_size: int, progress: bool = True, poll_s: float = 1.0) -> Optional[Sidecar]:
    """Score this rank's pending chunks; rank 0 then waits for every chunk and merges.

    Returns the opened sidecar on rank 0 (None on other ranks, which do not wait).
    """
    if plan.complete:
        return None
    ranges, parts = plan.ranges, plan.parts

    def done_rows() -> int:
        return sum(stop - start for k, (start, stop) in enumerate(ranges) if chunk_done(parts, k))

    bar = _Bar(progress and rank == 0, plan.record["rows"],
               f"{plan.split} ({world_size} proc)", done_rows)
    for k in plan.pending:
        start, stop = ranges[k]
        write_chunk(parts, k, score_rows(dataset, start, stop, score_fn, batch, bar.add))
        bar.chunk_finished(stop - start)
    if rank != 0:
        return None
    while not all(chunk_done(parts, k) for k in range(len(ranges))):
        bar.refresh()
        time.sleep(poll_s)
    bar.close()
    merge_chunks(parts, ranges, plan.prefix, plan.split, plan.record)
    for stale in _stale_parts(plan.prefix, plan.split, parts):
        shutil.rmtree(stale, ignore_errors=True)  # shards of an earlier, different scoring run
    return open_sidecar(plan.prefix, plan.split, fingerprint=plan.record["fingerprint"],
                        rows=plan.record["rows"], seq_length=plan.record["seq_length"])


def new_record(split: str, rows: int, seq_length: int, fingerprint: dict, scorer: dict,
               command: Sequence[str]) -> dict:
    return {"format": FORMAT, "split": split, "rows": rows, "seq_length": seq_length,
            "dtype": "float32", "fingerprint": fingerprint, "scorer": scorer,
            "command": shlex.join(command)}
