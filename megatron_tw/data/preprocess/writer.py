"""Write ``<prefix>.bin/.idx`` with megatron.core's IndexedDatasetBuilder, atomically.

The builder writes to temporary names (``<prefix>.tmp-<pid>.bin/.idx``) in the output
folder; only ``commit()`` renames them to the final names. An interrupted or failed run
leaves no file under the final name (a previous dataset there stays intact until the new
one is complete), and ``abort()`` removes the temporary files. The rename order is .bin
then .idx, after removing any old .idx: megatron reads a dataset only when both exist, so
there is never a final .idx next to a .bin of another run. A run killed before it could
clean up (SIGKILL, out of memory) leaves ``<prefix>.tmp-<pid>.*``; the next run with the same
prefix removes them (``remove_stale_temporaries``) unless that process is still running.
"""

from __future__ import annotations

import logging
import os
import re

import numpy
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)


def output_prefix(prefix: str, key: str, level: str = "document") -> str:
    """Megatron-LM's naming: ``<output-prefix>_<json-key>_<level>``."""
    return f"{prefix}_{key}_{level}"


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Remove ``<prefix>.tmp-<pid>.bin/.idx`` left by runs that no longer exist; returns them."""
    from megatron_tw.leftovers import remove_stale

    folder = os.path.dirname(os.path.abspath(prefix))
    pattern = re.escape(os.path.basename(prefix)) + r"\.tmp-(?P<pid>[0-9]+)\.(?:bin|idx)"
    return remove_stale(folder, pattern)


def remove_temporaries_of(prefix: str, pid: int) -> None:
    """Remove ``<prefix>.tmp-<pid>.bin/.idx`` of one (finished) process, if there."""
    for path in (f"{prefix}.tmp-{pid}.bin", f"{prefix}.tmp-{pid}.idx"):
        if os.path.exists(path):
            os.remove(path)


def token_dtype(vocab_size: int):
    """Megatron-LM's choice: uint16 when the vocabulary fits, else int32."""
    return DType.optimal_dtype(vocab_size)


class AtomicDatasetWriter:
    """One IndexedDataset being written under a temporary name.

    ``add(ids, lengths)`` appends one document: ids shape [n], n > 0, as sequences of
    ``lengths`` (sum n; default one sequence of n: document-level output).
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self.builder = IndexedDatasetBuilder(get_bin_path(self.tmp_prefix), dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self._open = True

    def add(self, ids: numpy.ndarray, lengths: list[int] | None = None) -> None:
        self.builder.add_document(ids, [ids.size] if lengths is None else lengths)
        self.documents += 1
        self.tokens += int(ids.size)

    def add_index(self, prefix: str) -> None:
        """Append a whole dataset written by another writer (``--partitions``; megatron's
        ``IndexedDatasetBuilder.add_index``, as Megatron-LM merges its partitions)."""
        reader_log = logging.getLogger("megatron.core.datasets.indexed_dataset")
        level = reader_log.level
        reader_log.setLevel(logging.WARNING)  # not 5 INFO lines per partition
        try:
            self.builder.add_index(prefix)
        finally:
            reader_log.setLevel(level)

    def finish_part(self) -> str:
        """Write the index next to the temporary .bin and keep both (a partition, to be merged
        with ``add_index`` then removed with ``abort``); returns the temporary prefix."""
        self.builder.finalize(get_idx_path(self.tmp_prefix))
        self._open = False
        return self.tmp_prefix

    def commit(self) -> tuple[str, str]:
        """Finish the index and move both files to their final names."""
        self.builder.finalize(get_idx_path(self.tmp_prefix))
        self._open = False
        final_bin, final_idx = get_bin_path(self.prefix), get_idx_path(self.prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(get_bin_path(self.tmp_prefix), final_bin)
        os.replace(get_idx_path(self.tmp_prefix), final_idx)
        return final_bin, final_idx

    def abort(self) -> None:
        """Drop the temporary files (safe to call more than once)."""
        if self._open:
            self.builder.data_file.close()
            self._open = False
        for path in (get_bin_path(self.tmp_prefix), get_idx_path(self.tmp_prefix)):
            if os.path.exists(path):
                os.remove(path)
