"""Long-document sampling: every training sequence is a window of ONE document, BOS first.

The paper's set-up for context extension (PG19 books cut into non-overlapping
"BOS + 32,767-token" windows), as an alternative to Megatron's GPTDataset, which packs
documents end to end so a sequence may span several documents.

Windows, exactly. For ``seq_length`` s and a document d[0..L-1] (its tokens as
preprocessed, EOD included if ``--append-eod`` was used; a leading BOS written by the
tokenizer itself is dropped, so it is never doubled), window j covers

    tokens = [BOS] + d[j*(s-1) : j*(s-1) + s-1]         (s tokens)
    labels =         d[j*(s-1) : j*(s-1) + s]           (s tokens = tokens shifted by one)

so the inputs of consecutive windows do not overlap and every document token is an input
exactly once (after the document's first). A document has ``(L - 1) // (s - 1)`` windows;
the tail after the last full window (< s tokens) is not used: no padding, no crossing into
the next document. Only documents with ``L >= max(min_document_length, s)`` are used.

Splits are by document, as Megatron's ``--split``: "98,2,0" gives contiguous document
ranges ``[round(lo*D), round(hi*D))`` of the D documents of the prefix (every document,
so the split does not move when ``seq_length`` or ``min_document_length`` change).

``sample_id`` is the window's global index: windows of all used documents, in document
order, then window order. It depends only on the data, s and the minimum length; not on
the split, the seed or the number of samples (offline scores can be keyed by it).

Sampling: ``num_samples`` draws from the split's windows; each epoch is a fresh seeded
permutation of all its windows (every window once per epoch), epochs repeat as needed and
the last one is cut.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, get_bin_path

logger = logging.getLogger(__name__)

NumSamples = Union[None, int, Sequence[Optional[int]]]


class LongDocumentWindows:
    """The window table of one IndexedDataset prefix (index arrays only; tokens via mmap).

    Attributes (numpy, over the D documents): ``doc_length`` [D] usable tokens,
    ``doc_start`` [D] token offset of the first usable token in the .bin,
    ``num_windows`` [D], ``window_offset`` [D+1] global id of each document's first window.
    """

    def __init__(self, data_prefix: str, seq_length: int, min_document_length: int,
                 bos_id: int):
        if seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2 for windows, got {seq_length}")
        if bos_id is None or bos_id < 0:
            raise ValueError(f"a BOS token id is needed for long-document sampling, got "
                             f"{bos_id}: the tokenizer must define BOS, or pass --tw-lead-token-id")
        self.data_prefix = data_prefix
        self.seq_length = seq_length
        self.min_document_length = min_document_length
        indexed = IndexedDataset(data_prefix, mmap=True)
        self.dtype = indexed.index.dtype
        itemsize = DType.size(self.dtype)
        seq_lengths = indexed.sequence_lengths.astype(numpy.int64)
        pointers = indexed.index.sequence_pointers.astype(numpy.int64)
        doc_seq = indexed.document_indices.astype(numpy.int64)
        ends = numpy.concatenate([[0], numpy.cumsum(seq_lengths)])
        # A document's sequences are read as one run of tokens: check they are contiguous.
        if len(pointers) and not numpy.array_equal(pointers, ends[:-1] * itemsize):
            raise ValueError(f"{data_prefix}: sequences are not stored contiguously; rebuild "
                             "it with tools/preprocess_data.py")
        del indexed
        self.doc_start = ends[doc_seq[:-1]]
        self.doc_length = ends[doc_seq[1:]] - self.doc_start
        self._tokens = None
        # A BOS the tokenizer already put at a document's start would be doubled: skip it.
        nonempty = self.doc_length > 0
        first = numpy.zeros_like(self.doc_length)
        if nonempty.any():  # an all-empty .bin cannot be memory-mapped
            first[nonempty] = self.tokens[self.doc_start[nonempty]]
        leading_bos = nonempty & (first == bos_id)
        self.doc_start = self.doc_start + leading_bos
        self.doc_length = self.doc_length - leading_bos
        usable = self.doc_length >= max(min_document_length, seq_length)
        self.num_windows = numpy.where(usable, (self.doc_length - 1) // (seq_length - 1), 0)
        self.window_offset = numpy.concatenate([[0], numpy.cumsum(self.num_windows)])

    @property
    def tokens(self) -> numpy.ndarray:
        """The whole .bin as a read-only memmap, opened lazily (and per DataLoader worker)."""
        if self._tokens is None:
            self._tokens = numpy.memmap(get_bin_path(self.data_prefix), dtype=self.dtype,
                                        mode="r")
        return self._tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None  # do not pickle the data, reopen it in the worker
        return state

    @property
    def num_documents(self) -> int:
        return len(self.doc_length)

    def locate(self, window_id: int) -> tuple[int, int]:
        """Global window id -> (document index, token offset of the window in the document)."""
        doc = int(numpy.searchsorted(self.window_offset, window_id, side="right") - 1)
        return doc, int(window_id - self.window_offset[doc]) * (self.seq_length - 1)

    def window_ids(self, documents: numpy.ndarray) -> numpy.ndarray:
        """Global ids of every window of ``documents`` (in order), int64."""
        counts = self.num_windows[documents]
        if counts.sum() == 0:
            return numpy.zeros(0, dtype=numpy.int64)
        starts = numpy.repeat(self.window_offset[documents], counts)
        within = numpy.arange(counts.sum()) - numpy.repeat(numpy.cumsum(counts) - counts, counts)
        return (starts + within).astype(numpy.int64)

    def read(self, window_id: int) -> numpy.ndarray:
        """The s document tokens d[j*(s-1) : j*(s-1)+s] of a window, int64 [s]."""
        doc, offset = self.locate(window_id)
        start = int(self.doc_start[doc]) + offset
        return numpy.asarray(self.tokens[start:start + self.seq_length], dtype=numpy.int64)


class LongDocumentDataset(torch.utils.data.Dataset):
    """One split: ``num_samples`` windows drawn from its documents (see module docstring).

    ``__getitem__`` returns GPTDataset's keys and dtypes: ``tokens`` [s] int64, ``labels``
    [s] int64, ``attention_mask`` [1, s, s] bool (True = masked; only when
    ``create_attention_mask``, as GPTDataset), ``loss_mask`` [s] float32, ``position_ids``
    [s] int64, plus ``sample_id`` (0-dim int64, the window's global id).
    """

    def __init__(self, windows: LongDocumentWindows, documents: numpy.ndarray,
                 num_samples: Optional[int], seed: int, split_index: int, bos_id: int,
                 create_attention_mask: bool = True):
        self.windows = windows
        self.documents = documents
        self.bos_id = int(bos_id)
        self.create_attention_mask = create_attention_mask
        self.split_window_ids = windows.window_ids(documents)
        n = len(self.split_window_ids)
        num_samples = n if num_samples is None else int(num_samples)
        rng = numpy.random.default_rng([seed, split_index])
        epochs = -(-num_samples // n) if n else 0
        order = [rng.permutation(n) for _ in range(epochs)]
        picks = numpy.concatenate(order)[:num_samples] if order else numpy.zeros(0, numpy.int64)
        self.sample_window = self.split_window_ids[picks]
        s = windows.seq_length
        self._position_ids = torch.arange(s, dtype=torch.long)
        self._attention_mask = (torch.tril(torch.ones((s, s))).unsqueeze(0) < 0.5
                                if create_attention_mask else None)

    def __len__(self) -> int:
        return len(self.sample_window)

    def __getitem__(self, idx: Optional[int]) -> dict[str, torch.Tensor]:
        # idx None: a padding sample (as GPTDataset): real tokens, zero loss mask.
        window_id = int(self.sample_window[0 if idx is None else idx])
        text = torch.from_numpy(self.windows.read(window_id))
        tokens = torch.cat([torch.tensor([self.bos_id], dtype=torch.long), text[:-1]])
        loss_mask = torch.ones(len(text), dtype=torch.float)
        if idx is None:
            loss_mask.zero_()
        sample = {"tokens": tokens, "labels": text}
        if self._attention_mask is not None:
            sample["attention_mask"] = self._attention_mask
        sample.update(loss_mask=loss_mask, position_ids=self._position_ids.clone(),
                      sample_id=torch.tensor(window_id, dtype=torch.long))
        return sample


def _per_split(num_samples: NumSamples) -> list[Optional[int]]:
    if num_samples is None or isinstance(num_samples, (int, numpy.integer)):
        return [num_samples] * 3
    values = list(num_samples)
    if len(values) != 3:
        raise ValueError(f"num_samples: one int or three (train, valid, test), got {values}")
    return values


def build_long_document_datasets(
    data_prefix: Union[str, Sequence[str]], *, seq_length: int, bos_id: int,
    min_document_length: int, split: str, num_samples: NumSamples, seed: int,
    create_attention_mask: bool = True,
) -> tuple[Optional[LongDocumentDataset], ...]:
    """(train, valid, test) long-document datasets; None for an empty split.

    Args:
        data_prefix: an IndexedDataset prefix (``<prefix>.bin/.idx``), or a one-item list.
        seq_length: s, tokens per sample (BOS included).
        bos_id: the tokenizer's BOS id (``tokenizer.bos``).
        min_document_length: documents shorter than this many tokens are not used.
        split: Megatron's split string, e.g. "98,2,0" (by document).
        num_samples: samples per split: an int for each split, or (train, valid, test)
            as Megatron's ``train_val_test_num_samples``; None = one pass over the windows.
        seed: shuffling seed (``--seed``).
        create_attention_mask: add GPTDataset's ``attention_mask`` (pass
            ``args.create_attention_mask_in_dataloader``).
    """
    if not isinstance(data_prefix, str):
        prefixes = list(data_prefix)
        if len(prefixes) != 1:
            raise ValueError("long-document sampling takes one --data-path prefix (no blend); "
                             f"got {prefixes}")
        data_prefix = prefixes[0]
    windows = LongDocumentWindows(data_prefix, seq_length, min_document_length, bos_id)
    counts = _per_split(num_samples)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    total = windows.num_documents
    datasets = []
    for index, (bounds, count) in enumerate(zip(matrix, counts)):
        if bounds is None or count == 0:
            datasets.append(None)
            continue
        begin, end = int(round(bounds[0] * total)), int(round(bounds[1] * total))
        documents = numpy.arange(begin, end, dtype=numpy.int64)
        if windows.num_windows[documents].sum() == 0:
            logger.warning("long-document split %d (documents %d-%d) has no document of at "
                           "least max(min length %d, seq length %d) tokens: no dataset",
                           index, begin, end, min_document_length, seq_length)
            datasets.append(None)
            continue
        datasets.append(LongDocumentDataset(windows, documents, count, seed, index, bos_id,
                                            create_attention_mask))
    if matrix[0] is not None and counts[0] != 0 and datasets[0] is None:
        usable = int((windows.num_windows > 0).sum())
        raise ValueError(
            f"{data_prefix}: no training windows: {usable} of {total} documents have at least "
            f"max(--tw-min-document-length {min_document_length}, --seq-length {seq_length}) "
            f"tokens, none in the training split {split!r}; lower the minimum or use longer "
            "documents")
    return tuple(datasets)
