"""Planted key-value records (megatron_tw/data/planted.py) and their held-out metrics
(megatron_tw/eval/planted.py), against hand-checked layouts and an exact copying model."""

from __future__ import annotations

import dataclasses

import numpy
import pytest
import torch

from megatron_tw.data.planted import (
    PlantLayout,
    PlantTable,
    choose_alphabet,
    natural_chunks,
    plant_documents,
)
from megatron_tw.eval.planted import label_scores, record_metrics

pytestmark = pytest.mark.unit

MARKER = 50
ALPHABET = list(range(100, 140))


def _natural(n_docs: int, length: int, seed: int = 0):
    text = numpy.random.default_rng(seed).integers(3, 40, size=n_docs * length)
    return natural_chunks(text, [(0, len(text))], length)


def _build(layout: PlantLayout, n: int = 40, seed: int = 7):
    return plant_documents(_natural(n, layout.length), n, layout, marker=MARKER,
                           alphabet=ALPHABET, seed=seed)


def test_records_recur_verbatim_at_their_distance():
    layout = PlantLayout(length=128, records=3, value_length=5, min_distance=20, max_distance=90)
    docs, table = _build(layout)
    assert len(table.doc) == 3 * 40
    span = layout.record_length
    for doc, key, first, recur, values in zip(table.doc, table.key, table.first, table.recur,
                                              table.values):
        record = [MARKER, key, *values]
        assert docs[doc, first:first + span].tolist() == record
        assert docs[doc, recur:recur + span].tolist() == record
        assert 20 <= recur - first <= 90
    for doc in range(40):  # keys of one document are distinct, so each recurrence has one source
        keys = table.key[table.doc == doc]
        assert len(set(keys.tolist())) == len(keys)
    # the marker appears exactly at the records' two occurrences
    assert (docs == MARKER).sum() == 2 * len(table.doc)


def test_same_seed_same_documents_other_seed_fresh_values():
    layout = PlantLayout(length=128, records=2, value_length=6, min_distance=10, max_distance=60)
    a_docs, a = _build(layout, seed=3)
    b_docs, b = _build(layout, seed=3)
    _, c = _build(layout, seed=4)
    numpy.testing.assert_array_equal(a_docs, b_docs)
    numpy.testing.assert_array_equal(a.values, b.values)
    assert (a.values != c.values).mean() > 0.9


def test_planted_share_leaves_natural_documents():
    layout = PlantLayout(length=64, records=1, value_length=4, min_distance=8, max_distance=40,
                         planted_share=0.5)
    docs, table = _build(layout, n=200)
    planted = set(table.doc.tolist())
    assert 60 < len(planted) < 140
    natural = numpy.stack(list(_natural(200, 64)))
    for doc in set(range(200)) - planted:
        numpy.testing.assert_array_equal(docs[doc], natural[doc])


def test_masks_partition_the_positions():
    layout = PlantLayout(length=96, records=2, value_length=4, min_distance=12, max_distance=70)
    docs, table = _build(layout, n=10)
    masks = table.masks(10, 96)
    total = masks["dependent"].astype(int) + masks["record"] + masks["natural"]
    assert (total == 1).all()
    assert masks["dependent"].sum() == len(table.doc) * 4
    assert masks["record"].sum() == len(table.doc) * (6 + 2)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="min_distance"):
        PlantLayout(length=64, records=1, value_length=8, min_distance=5,
                    max_distance=20).validate()
    with pytest.raises(ValueError, match="does not fit"):
        PlantLayout(length=64, records=1, value_length=8, min_distance=20,
                    max_distance=60).validate()
    layout = PlantLayout(length=64, records=1, value_length=4, min_distance=8, max_distance=40)
    with pytest.raises(ValueError, match="chunks"):
        plant_documents(_natural(3, 64), 5, layout, marker=MARKER, alphabet=ALPHABET, seed=0)
    with pytest.raises(ValueError, match="marker"):
        plant_documents(_natural(3, 64), 3, layout, marker=ALPHABET[0], alphabet=ALPHABET,
                        seed=0)


def test_alphabet_is_lowercase_words_in_score_order():
    pieces = ["<unk>", "\u2581the", "\u2581Alpha", "\u2581house", "ing", "\u2581garden",
              "\u2581river", "\u2581a1bc", "\u2581stone"]
    scores = [0, -1, -2, -3, -4, -5, -6, -7, -8]
    marker, alphabet = choose_alphabet(pieces, scores, size=2, skip=1)
    assert [pieces[i] for i in alphabet] == ["\u2581garden", "\u2581river"]
    assert pieces[marker] == "\u2581stone"
    with pytest.raises(ValueError, match="whole-word"):
        choose_alphabet(pieces, scores, size=5, skip=1)


class _CopyModel:
    """An exact reference: predicts a recurrence value by copying the first occurrence (prob
    0.9), everything else uniformly over V tokens."""

    def __init__(self, docs, table, vocab):
        self.docs, self.table, self.vocab = docs, table, vocab

    def __call__(self, ids):
        b, s = ids.shape
        logits = torch.zeros(b, s, self.vocab + 3)  # padded rows are cut by label_scores
        logits[..., self.vocab:] = 50.0
        for row in range(b):
            doc = [d for d in range(len(self.docs))
                   if numpy.array_equal(self.docs[d, :-1], ids[row, 1:].numpy())][0]
            for t_doc, recur, values in zip(self.table.doc, self.table.recur, self.table.values):
                if t_doc != doc:
                    continue
                for j, v in enumerate(values):  # label recur+2+j is predicted at that position
                    logits[row, recur + 2 + j, v] = numpy.log(0.9 * (self.vocab - 1) / 0.1)
        return logits


def test_metrics_of_an_exact_copier():
    layout = PlantLayout(length=80, records=2, value_length=5, min_distance=10, max_distance=60)
    docs, table = _build(layout, n=6)
    vocab = 160
    loss, hit = label_scores(_CopyModel(docs, table, vocab), docs, bos_id=1, vocab_size=vocab,
                             batch_size=4)
    m = record_metrics(loss, hit, table)
    assert m["dependent"] == pytest.approx(-numpy.log(0.9), abs=1e-5)
    assert m["first"] == pytest.approx(numpy.log(vocab), abs=1e-5)
    assert m["natural"] == pytest.approx(numpy.log(vocab), abs=1e-5)
    assert m["copy_gap"] == pytest.approx(numpy.log(vocab) + numpy.log(0.9), abs=1e-5)
    assert m["retrieval"] == 1.0
    assert m["tokens"]["dependent"] == len(table.doc) * 5


def test_retrieval_needs_every_value():
    layout = PlantLayout(length=80, records=1, value_length=3, min_distance=10, max_distance=60)
    docs, table = _build(layout, n=4)
    loss = numpy.zeros(docs.shape)
    hit = numpy.zeros(docs.shape, dtype=bool)
    for i, (doc, recur) in enumerate(zip(table.doc, table.recur)):
        hit[doc, recur + 2:recur + 5] = True
        if i == 0:
            hit[doc, recur + 4] = False  # the last value of record 0 is wrong
    assert record_metrics(loss, hit, table)["retrieval"] == pytest.approx(3 / 4)


def test_table_round_trips(tmp_path):
    layout = PlantLayout(length=64, records=2, value_length=4, min_distance=8, max_distance=40)
    _, table = _build(layout, n=5)
    table.save(str(tmp_path / "p.npz"), marker=MARKER)
    back = PlantTable.load(str(tmp_path / "p.npz"))
    for name in ("doc", "key", "first", "recur", "values"):
        numpy.testing.assert_array_equal(getattr(back, name), getattr(table, name))


def test_metrics_split_by_distance():
    layout = PlantLayout(length=120, records=2, value_length=3, min_distance=10, max_distance=100)
    docs, table = _build(layout, n=30)
    far = (table.recur - table.first) >= 50
    assert 0 < far.sum() < len(far)
    loss = numpy.zeros(docs.shape)
    hit = numpy.zeros(docs.shape, dtype=bool)
    for is_far, doc, recur in zip(far, table.doc, table.recur):
        loss[doc, recur + 2:recur + 5] = 3.0 if is_far else 1.0
        hit[doc, recur + 2:recur + 5] = not is_far
    m = record_metrics(loss, hit, table, far_from=50)
    assert m["dependent_far"] == pytest.approx(3.0)
    assert m["dependent_near"] == pytest.approx(1.0)
    assert m["retrieval_far"] == 0.0 and m["retrieval_near"] == 1.0
    assert m["tokens"]["records_far"] == far.sum()
    assert m["dependent"] == pytest.approx((3.0 * far.sum() + (~far).sum()) / len(far))


def _write_dump(folder, dp, cp, mb, sample_ids, positions, weights):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dp{dp}_cp{cp}_mb{mb}.npz"
    numpy.savez(path, sample_id=numpy.asarray(sample_ids), position_ids=positions,
                weights=weights, long_loss=numpy.zeros_like(weights),
                loss_mask=numpy.ones_like(weights))
    return str(path)


def test_dumped_weight_stats_reassembles_cp_shards(tmp_path):
    from megatron_tw.eval.planted import dumped_weight_stats

    layout = PlantLayout(length=64, records=1, value_length=4, min_distance=8, max_distance=50)
    docs, table = _build(layout, n=4)
    far = (table.recur - table.first) >= 30
    # weights: 5 on every recurrence value, 1 elsewhere; doc 0 split over two CP ranks
    w = numpy.ones((4, 64))
    for doc, recur in zip(table.doc, table.recur):
        w[doc, recur + 2:recur + 6] = 5.0
    pos = numpy.arange(64)
    files = [_write_dump(tmp_path / "iter_0000000", 0, 0, 0, [0, 1], numpy.stack([pos[:32]] * 2),
                         w[[0, 1], :32]),
             _write_dump(tmp_path / "iter_0000000", 0, 1, 0, [0, 1], numpy.stack([pos[32:]] * 2),
                         w[[0, 1], 32:]),
             _write_dump(tmp_path / "iter_0000000", 1, 0, 0, [2, 3], numpy.stack([pos] * 2),
                         w[[2, 3]])]
    stats = dumped_weight_stats(files, table, 4, 64, far_from=30)
    assert stats["sequences"] == 4
    total = w.sum()
    assert stats["share_far"] == pytest.approx(5.0 * 4 * far.sum() / total)
    assert stats["share_near"] == pytest.approx(5.0 * 4 * (~far).sum() / total)
    assert stats["tokens_far"] == pytest.approx(4 * far.sum() / (4 * 64))
    expected_eff = numpy.mean([row.sum() ** 2 / (64 * (row * row).sum()) for row in w])
    assert stats["effective"] == pytest.approx(expected_eff)
    if far.any():
        assert stats["mean_far"] == pytest.approx(5.0 / (total / w.size))


def test_drill_documents_are_one_long_record_at_varying_distances():
    from megatron_tw.data.planted import drill_layout, mix_documents

    layout = drill_layout(64)
    docs, table = plant_documents(_natural(20, 64), 20, layout, marker=MARKER, alphabet=ALPHABET,
                                  seed=1)
    assert layout.record_length == 16
    for doc, first, recur in zip(table.doc, table.first, table.recur):
        numpy.testing.assert_array_equal(docs[doc, first:first + 16], docs[doc, recur:recur + 16])
    distance = table.recur - table.first
    assert distance.min() >= 16 and distance.max() <= 48 and len(set(distance.tolist())) > 3
    extra = numpy.zeros((3, 64), dtype=numpy.int64)
    mixed = mix_documents([docs, extra], seed=0)
    assert mixed.shape == (23, 64)
    assert sorted(map(tuple, mixed.tolist())) == sorted(
        map(tuple, numpy.concatenate([docs, extra]).tolist()))


def test_mixed_table_points_at_every_record_of_the_mixed_documents():
    from megatron_tw.data.planted import mix_documents, mix_tables, random_chunks

    natural = PlantLayout(length=64, records=2, value_length=4, min_distance=8, max_distance=40)
    drill = PlantLayout(length=64, records=3, value_length=4, min_distance=6, max_distance=30)
    docs, table = plant_documents(_natural(15, 64), 15, natural, marker=MARKER,
                                  alphabet=ALPHABET, seed=1)
    drills, drill_table = plant_documents(random_chunks(ALPHABET, 64, [2]), 7, drill,
                                          marker=MARKER, alphabet=ALPHABET, seed=2)
    mixed = mix_documents([docs, drills], seed=5)
    both = mix_tables([table, drill_table], [15, 7], seed=5)
    assert len(both.doc) == 15 * 2 + 7 * 3
    assert numpy.all(numpy.diff(both.doc) >= 0)
    for doc, key, first, recur, values in zip(both.doc, both.key, both.first, both.recur,
                                              both.values):
        record = [MARKER, key, *values]
        assert mixed[doc, first:first + 6].tolist() == record
        assert mixed[doc, recur:recur + 6].tolist() == record
    # each mixed document is one of the sources, with that source's record count
    per_doc = numpy.bincount(both.doc, minlength=22)
    sources = {tuple(d): 2 for d in docs.tolist()} | {tuple(d): 3 for d in drills.tolist()}
    assert [sources[tuple(d)] for d in mixed.tolist()] == per_doc.tolist()
    _, longer = plant_documents(random_chunks(ALPHABET, 64, [3]), 2,
                                dataclasses.replace(drill, value_length=5, min_distance=8), marker=MARKER,
                                alphabet=ALPHABET, seed=3)
    with pytest.raises(ValueError, match="value lengths differ"):
        mix_tables([table, longer], [15, 2], seed=5)


def test_random_filler_drills_hold_only_alphabet_words_and_one_copy():
    from megatron_tw.data.planted import random_chunks

    layout = PlantLayout(length=32, records=1, value_length=12, min_distance=14,
                         max_distance=18)
    docs, table = plant_documents(random_chunks(ALPHABET, 32, [3, 8]), 200, layout,
                                  marker=MARKER, alphabet=ALPHABET, seed=2)
    assert set(numpy.unique(docs).tolist()) <= set(ALPHABET) | {MARKER}
    distance = table.recur - table.first
    assert set(distance.tolist()) == set(range(14, 19))  # every allowed distance occurs
    for doc, first, recur in zip(table.doc, table.first, table.recur):
        numpy.testing.assert_array_equal(docs[doc, first:first + 14], docs[doc, recur:recur + 14])
    again = plant_documents(random_chunks(ALPHABET, 32, [3, 8]), 200, layout, marker=MARKER,
                            alphabet=ALPHABET, seed=2)[0]
    numpy.testing.assert_array_equal(docs, again)
    other = plant_documents(random_chunks(ALPHABET, 32, [4, 8]), 200, layout, marker=MARKER,
                            alphabet=ALPHABET, seed=2)[0]
    filler = numpy.ones_like(docs, dtype=bool)
    for doc, first, recur in zip(table.doc, table.first, table.recur):
        filler[doc, first:first + 14] = filler[doc, recur:recur + 14] = False
    assert filler.sum() >= 400
    assert (docs != other)[filler].mean() > 0.9  # another filler seed: other filler


def test_document_bounds_from_an_index():
    from megatron_tw.data.planted import document_bounds

    # 3 documents: sequences of lengths [2, 3], [4], [1, 1, 1]
    assert document_bounds(numpy.array([2, 3, 4, 1, 1, 1]), numpy.array([0, 2, 3, 6])) == [
        (0, 5), (5, 9), (9, 12)]


def test_near_share_splits_the_distances_at_near_max_distance():
    """With near_share p, about p of the records recur within [min, near_max] and the others in
    (near_max, max]; share 0 keeps the single uniform range (the same documents as before)."""
    base = PlantLayout(length=256, records=4, value_length=8, min_distance=10, max_distance=245)
    split = dataclasses.replace(base, near_share=0.75, near_max_distance=63)
    docs, table = _build(split, n=400)
    distance = table.recur - table.first
    assert distance.min() >= 10 and distance.max() <= 245
    near = distance <= 63
    assert abs(near.mean() - 0.75) < 0.05, near.mean()  # 1,600 records: std of the share 0.011
    assert distance[~near].min() >= 64
    # far records cover their whole range, not just its start
    assert distance[~near].max() > 200 and distance[near].min() < 20
    uniform = _build(base, n=400)[1]
    assert ((uniform.recur - uniform.first) <= 63).mean() < 0.35  # uniform: about 23% near
    numpy.testing.assert_array_equal(
        _build(dataclasses.replace(base, near_max_distance=63), n=40)[0], _build(base, n=40)[0])
    for bad in (dict(near_share=1.5, near_max_distance=63), dict(near_share=0.5),
                dict(near_share=0.5, near_max_distance=245)):
        with pytest.raises(ValueError, match="near"):
            dataclasses.replace(base, **bad).validate()


def test_study_summary_aggregates_seeds_and_shows_the_no_copy_reference():
    from megatron_tw.eval.study import aggregate, render_summary

    def final(far, first):
        return {"dependent_far": far, "dependent_near": 5.0, "first": first, "natural": 7.0,
                "short_ppl": 1000.0, "retrieval_far": 0.25}

    runs = {f"uniform_s{s}": {"preset": "uniform", "scorer": "", "seed": s,
                              "final": final(far, first)}
            for s, far, first in ((1, 6.0, 6.3), (2, 6.2, 6.1))}
    base = dict(final(8.7, 6.9), tokens={"records": 4, "dependent_far": 24,
                                        "dependent_near": 8, "natural": 100})
    results = {"base": base, "runs": runs, "long": 256}
    results["table"] = aggregate(results)
    mean, std, n = results["table"]["uniform"]["first"]
    # sample std of (6.3, 6.1): 0.1 * sqrt(2)
    assert (mean, n) == (pytest.approx(6.2), 2) and std == pytest.approx(0.1 * 2 ** 0.5)
    text = render_summary(results, short=64)
    header, _, base_row, row = [l for l in text.splitlines() if l.startswith("|")][:4]
    assert header.split("|")[4].strip() == "first occurrence"
    assert base_row.split("|")[4].strip() == "6.900"
    # mean ± sample std over the two seeds: far (6.0, 6.2), first (6.3, 6.1)
    assert row.split("|")[1:4] == [" uniform ", " 6.100 ± 0.141 ", " 5.000 ± 0.000 "]
    assert row.split("|")[4].strip() == "6.200 ± 0.141"
