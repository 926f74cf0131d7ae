"""Planted long-range dependencies in natural text: key-value records that recur at a set distance.

A *record* is ``[marker, key, v_1 .. v_L]`` (L + 2 tokens): a fixed marker token, a key token
and L value tokens, all drawn from an alphabet of ordinary word tokens. Each planted document
holds R records with distinct keys; every record appears twice, at its *first* occurrence and
at its *recurrence* ``distance`` tokens later, and the rest of the document is natural text.
At the recurrence the values are fully predictable from the first occurrence (given the key,
copy what followed it there) and unpredictable without it (``ln |alphabet|`` nats each), so
the L recurrence values are the tokens whose dependency lies ``distance`` tokens back.
Records overwrite natural tokens in place: the document keeps its length.

Documents have exactly ``length`` tokens, so with ``--tw-long-document-sampling`` at
``--seq-length length`` each is one training window whose label ``i`` is document token ``i``
(the window's inputs are BOS + tokens 0..length-2): a plant's positions are label positions.

Everything is a function of the seed: the natural chunks are read in order from a token
stream, and records, positions and distances come from ``numpy.random.default_rng(seed)``.
Held-out sets use another seed (and other text), so their values are fresh.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy


@dataclasses.dataclass(frozen=True)
class PlantLayout:
    """How records are planted in one set of documents.

    length: tokens per document. records: R, records per planted document. value_length: L.
    min_distance, max_distance: the recurrence starts this many tokens after the first
    occurrence (inclusive range; first-occurrence value i and recurrence value i are exactly
    ``distance`` apart). planted_share: the fraction of documents with records (the others are
    natural text only). near_share, near_max_distance: with a share above 0, each record recurs
    within [min_distance, near_max_distance] with that probability and within
    [near_max_distance + 1, max_distance] otherwise (e.g. most records within a short context
    and the rest beyond it); with 0 (the default) the distance is uniform over the whole range.
    """

    length: int
    records: int
    value_length: int
    min_distance: int
    max_distance: int
    planted_share: float = 1.0
    near_share: float = 0.0
    near_max_distance: int = 0

    @property
    def record_length(self) -> int:
        return self.value_length + 2

    def validate(self) -> None:
        if self.records < 1 or self.value_length < 1:
            raise ValueError(f"records and value_length must be >= 1, got {self.records}, "
                             f"{self.value_length}")
        if not self.record_length <= self.min_distance <= self.max_distance:
            raise ValueError(f"need record length {self.record_length} <= min_distance "
                             f"{self.min_distance} <= max_distance {self.max_distance}")
        if self.max_distance + self.record_length > self.length:
            raise ValueError(f"max_distance {self.max_distance} + a record "
                             f"({self.record_length}) does not fit in {self.length} tokens")
        if not 0.0 <= self.planted_share <= 1.0:
            raise ValueError(f"planted_share must be in [0, 1], got {self.planted_share}")
        if not 0.0 <= self.near_share <= 1.0:
            raise ValueError(f"near_share must be in [0, 1], got {self.near_share}")
        if self.near_share > 0 and not (self.min_distance <= self.near_max_distance
                                         < self.max_distance):
            raise ValueError(f"need min_distance {self.min_distance} <= near_max_distance "
                             f"{self.near_max_distance} < max_distance {self.max_distance}")

    def draw_distance(self, rng: numpy.random.Generator) -> int:
        """One record's recurrence distance (the class docstring). With near_share 0 the draw is
        one integer over the whole range, so such sets are what they were before the split."""
        low, high = self.min_distance, self.max_distance
        if self.near_share > 0:
            if rng.random() < self.near_share:
                high = self.near_max_distance
            else:
                low = self.near_max_distance + 1
        return int(rng.integers(low, high + 1))


@dataclasses.dataclass
class PlantTable:
    """Where the records of a document set are (one row per record, int64 arrays [P]).

    doc: document index; key: the key token; first, recur: the position of the record's
    marker at its first occurrence and at its recurrence (its values are at
    ``first + 2 + j`` and ``recur + 2 + j``, j < L); values [P, L]: the value tokens.
    """

    doc: numpy.ndarray
    key: numpy.ndarray
    first: numpy.ndarray
    recur: numpy.ndarray
    values: numpy.ndarray

    @property
    def value_length(self) -> int:
        return int(self.values.shape[1])

    def save(self, path: str, **meta) -> None:
        numpy.savez(path, doc=self.doc, key=self.key, first=self.first, recur=self.recur,
                    values=self.values, **{k: numpy.asarray(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str) -> "PlantTable":
        with numpy.load(path) as z:
            return cls(doc=z["doc"], key=z["key"], first=z["first"], recur=z["recur"],
                       values=z["values"])

    def masks(self, num_docs: int, length: int) -> dict[str, numpy.ndarray]:
        """Token classes over ``[num_docs, length]`` label positions (bool arrays).

        ``dependent``: the recurrence values (predictable only from the first occurrence);
        ``record``: every other record token (markers, keys, first-occurrence values: random,
        or predictable only from the planting scheme); ``natural``: everything else.
        """
        dependent = numpy.zeros((num_docs, length), dtype=bool)
        record = numpy.zeros((num_docs, length), dtype=bool)
        span = numpy.arange(self.value_length + 2)
        for doc, first, recur in zip(self.doc, self.first, self.recur):
            record[doc, first + span] = True
            record[doc, recur + span[:2]] = True
            dependent[doc, recur + span[2:]] = True
        return {"dependent": dependent, "record": record, "natural": ~(dependent | record)}


def document_bounds(sequence_lengths: numpy.ndarray,
                    document_indices: numpy.ndarray) -> list[tuple[int, int]]:
    """(start, end) token offsets of every document of an IndexedDataset, from its index
    (``sequence_lengths`` [n sequences], ``document_indices`` [D + 1])."""
    starts = numpy.concatenate([[0], numpy.cumsum(numpy.asarray(sequence_lengths, numpy.int64))])
    docs = numpy.asarray(document_indices, dtype=numpy.int64)
    return [(int(starts[a]), int(starts[b])) for a, b in zip(docs[:-1], docs[1:])]


def natural_chunks(tokens: numpy.ndarray, doc_bounds: Sequence[tuple[int, int]],
                   length: int) -> Iterator[numpy.ndarray]:
    """Non-overlapping ``length``-token chunks of each document (in order), never crossing one."""
    for start, end in doc_bounds:
        for offset in range(start, end - length + 1, length):
            yield numpy.asarray(tokens[offset:offset + length], dtype=numpy.int64)


def _place(rng: numpy.random.Generator, layout: PlantLayout,
           tries: int = 100) -> list[tuple[int, int]]:
    """(first, recur) marker positions of R records that do not overlap each other: each record
    draws a distance, then its first occurrence uniformly among the starts where both of its
    occurrences fit beside the records before it (another distance when none does)."""
    n, span = layout.length, layout.record_length
    for _ in range(tries):
        taken = numpy.zeros(n, dtype=bool)
        placed = []
        for _ in range(layout.records):
            busy = numpy.concatenate([[0], numpy.cumsum(taken)])  # busy[b] - busy[a]: taken in [a, b)
            for _ in range(tries):
                distance = layout.draw_distance(rng)
                starts = numpy.arange(0, n - span - distance + 1)
                free = ((busy[starts + span] - busy[starts] == 0)
                        & (busy[starts + distance + span] - busy[starts + distance] == 0))
                if free.any():
                    first = int(rng.choice(starts[free]))
                    break
            else:
                break
            recur = first + distance
            taken[first:first + span] = taken[recur:recur + span] = True
            placed.append((first, recur))
        if len(placed) == layout.records:
            return placed
    raise ValueError(f"cannot place {layout.records} records of {span} tokens at distances "
                     f"{layout.min_distance}-{layout.max_distance} in {n} tokens: fewer records")


def plant_documents(chunks: Iterator[numpy.ndarray], num_docs: int, layout: PlantLayout, *,
                    marker: int, alphabet: Sequence[int], seed: int
                    ) -> tuple[numpy.ndarray, PlantTable]:
    """``num_docs`` documents [num_docs, length] int64 and their plant table.

    chunks: natural-text chunks of ``layout.length`` tokens (e.g. ``natural_chunks``); the
    marker must not be in the alphabet, and the alphabet needs more than R tokens (keys of a
    document are distinct).
    """
    layout.validate()
    alphabet = numpy.asarray(alphabet, dtype=numpy.int64)
    if marker in set(alphabet.tolist()):
        raise ValueError(f"the marker token {marker} is also in the alphabet")
    if len(alphabet) <= layout.records:
        raise ValueError(f"an alphabet of {len(alphabet)} tokens cannot give {layout.records} "
                         "distinct keys")
    rng = numpy.random.default_rng(seed)
    docs = numpy.zeros((num_docs, layout.length), dtype=numpy.int64)
    rows: dict[str, list] = {"doc": [], "key": [], "first": [], "recur": [], "values": []}
    for i in range(num_docs):
        chunk = next(chunks, None)
        if chunk is None:
            raise ValueError(f"the natural text has only {i} chunks of {layout.length} tokens; "
                             f"{num_docs} documents were asked for")
        docs[i] = chunk
        if rng.random() >= layout.planted_share:
            continue
        keys = rng.choice(alphabet, size=layout.records, replace=False)
        for key, (first, recur) in zip(keys, _place(rng, layout)):
            values = rng.choice(alphabet, size=layout.value_length, replace=True)
            record = numpy.concatenate([[marker, key], values])
            docs[i, first:first + layout.record_length] = record
            docs[i, recur:recur + layout.record_length] = record
            for name, value in (("doc", i), ("key", key), ("first", first), ("recur", recur),
                                ("values", values)):
                rows[name].append(value)
    table = PlantTable(
        doc=numpy.asarray(rows["doc"], dtype=numpy.int64),
        key=numpy.asarray(rows["key"], dtype=numpy.int64),
        first=numpy.asarray(rows["first"], dtype=numpy.int64),
        recur=numpy.asarray(rows["recur"], dtype=numpy.int64),
        values=numpy.asarray(rows["values"], dtype=numpy.int64).reshape(-1, layout.value_length))
    return docs, table


def choose_alphabet(pieces: Sequence[str], scores: Sequence[float], size: int,
                    skip: int = 200) -> tuple[int, list[int]]:
    """(marker, alphabet) from the tokenizer alone: ``size`` whole-word lowercase tokens
    (SentencePiece pieces "▁word", 4+ letters) in the order of the pieces' scores (for BPE the
    merge order, which follows frequency), the ``skip`` first such words left out (they fill
    natural text, so a copy mechanism keyed on them would be confused), and as marker the next
    such word. Frequent enough to have trained embeddings, rare enough to be distinctive; the
    same for every document set built with the tokenizer."""
    order = numpy.argsort(-numpy.asarray(scores, dtype=numpy.float64), kind="stable")
    words = [int(i) for i in order
             if pieces[i].startswith("\u2581") and pieces[i][1:].isalpha()
             and pieces[i][1:].islower() and len(pieces[i]) >= 5]
    if len(words) < skip + size + 1:
        raise ValueError(f"the tokenizer has {len(words)} whole-word tokens; {skip + size + 1} "
                         "are needed for the alphabet")
    chosen = words[skip:skip + size + 1]
    return chosen[-1], chosen[:-1]


def random_chunks(alphabet: Sequence[int], length: int, seed) -> Iterator[numpy.ndarray]:
    """Endless filler of ``length`` tokens drawn uniformly from ``alphabet`` (the synthetic
    copying task: nothing around a record is predictable, so only copying lowers its loss)."""
    rng = numpy.random.default_rng(seed)
    words = numpy.asarray(alphabet)
    while True:
        yield rng.choice(words, size=length)


def drill_layout(length: int) -> PlantLayout:
    """One long record per document: L = length/4 - 2 values, recurring length/4 to 3 length/4
    tokens later (a different distance in every document, so only copying by content, not by
    a fixed offset, predicts it), natural text around it."""
    quarter = length // 4
    return PlantLayout(length=length, records=1, value_length=quarter - 2,
                       min_distance=quarter, max_distance=3 * quarter)


def mix_order(total: int, seed: int) -> numpy.ndarray:
    """The seeded shuffle of ``mix_documents``: mixed document j is concatenated document
    ``order[j]`` (int64 [total])."""
    return numpy.random.default_rng(seed).permutation(total)


def mix_documents(parts: Sequence[numpy.ndarray], seed: int) -> numpy.ndarray:
    """Document sets of one length [n_i, s] shuffled into one [sum n_i, s] (seeded)."""
    docs = numpy.concatenate(list(parts))
    return docs[mix_order(len(docs), seed)]


def mix_tables(tables: Sequence[PlantTable], sizes: Sequence[int], seed: int) -> PlantTable:
    """The plant table of ``mix_documents(parts, seed)``, where part ``i`` has ``sizes[i]``
    documents and table ``tables[i]``: every record, its document renumbered to the mixed
    order (rows sorted by document, then position). The tables must share a value length."""
    lengths = {t.value_length for t in tables if len(t.doc)}
    if len(lengths) > 1:
        raise ValueError(f"the tables' value lengths differ ({sorted(lengths)}): one table "
                         "holds one value length")
    order = mix_order(int(sum(sizes)), seed)
    new_index = numpy.empty_like(order)
    new_index[order] = numpy.arange(len(order))
    offsets = numpy.concatenate([[0], numpy.cumsum(sizes)])[:-1]
    doc = numpy.concatenate([new_index[t.doc + o] for t, o in zip(tables, offsets)])
    first = numpy.concatenate([t.first for t in tables])
    rows = numpy.lexsort((first, doc))
    width = lengths.pop() if lengths else 0
    return PlantTable(
        doc=doc[rows], key=numpy.concatenate([t.key for t in tables])[rows],
        first=first[rows], recur=numpy.concatenate([t.recur for t in tables])[rows],
        values=numpy.concatenate([t.values.reshape(-1, width) for t in tables])[rows])
