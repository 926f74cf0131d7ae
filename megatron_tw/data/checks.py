"""Start-up checks of the training data itself (run where the datasets are built, before step 1).

Token ids at or above the model's (padded) vocabulary would otherwise surface as an IndexError
deep in the embedding at some step. (The padded size is the limit, not the tokenizer's: some
tokenizers, as megatron's NullTokenizer, give the EOD an id equal to their reported size.) A memory-mapped maximum over each ``.bin`` costs one sequential read of the file.
"""

from __future__ import annotations

import os

import numpy

_CHUNK = 1 << 26  # tokens per read: bounded memory for any file size


def max_token_id(prefix: str) -> int:
    """The largest token id in the indexed dataset ``prefix`` (.bin/.idx); -1 when empty."""
    from megatron.core.datasets.indexed_dataset import DType

    with open(f"{prefix}.idx", "rb") as f:
        header = f.read(18)  # magic (9 bytes), version (8), dtype code (1)
    dtype = DType.dtype_from_code(header[17])
    path = f"{prefix}.bin"
    if os.path.getsize(path) == 0:
        return -1
    tokens = numpy.memmap(path, dtype=dtype, mode="r")
    return max(int(tokens[i:i + _CHUNK].max()) for i in range(0, len(tokens), _CHUNK))


def data_prefixes(blend, blend_per_split) -> list[str]:
    """Every dataset prefix of megatron's (blend, blend_per_split)."""
    prefixes = []
    for entry in [blend, *(blend_per_split or [])]:
        if entry is not None:
            prefixes += list(entry[0])
    return list(dict.fromkeys(prefixes))


def check_token_ids(prefixes: list[str], vocab_size: int) -> None:
    """Raise ValueError naming the file when a token id is outside [0, vocab_size), the rows of
    the model's (padded) embedding."""
    for prefix in prefixes:
        if not os.path.isfile(f"{prefix}.bin"):
            continue  # megatron reports missing files itself
        top = max_token_id(prefix)
        if top >= vocab_size:
            raise ValueError(f"{prefix}.bin holds token id {top}, but the model's vocabulary "
                             f"has {vocab_size} entries (ids 0..{vocab_size - 1}, the tokenizer's "
                             "padded): the data was tokenized with another tokenizer; rerun "
                             "tools/preprocess_data.py with this run's --tokenizer-* flags, or "
                             "train with the tokenizer the data was made with")
