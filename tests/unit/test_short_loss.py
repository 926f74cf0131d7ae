"""The precomputed short-loss sidecar: sharded writing, resumption, the atomic merge, the reader's
checks (each bad-sidecar case has its own message) and the dataset wrapper.

The scores here come from a simple float64 function of each sample's tokens, so every row can be
checked exactly against that function recomputed in the test.
"""

import json
import os
import pickle
import shutil

import numpy
import pytest
import torch

from megatron_tw.scoring import offline
from megatron_tw.data.short_loss import (
    SidecarError,
    Sidecar,
    WithShortLoss,
    fingerprint_differences,
    open_sidecar,
    score_command,
    split_paths,
)

pytestmark = pytest.mark.unit

SEQ, ROWS = 16, 10
FINGERPRINT = {"dataset": {"class": "GPTDataset", "random_seed": 1234, "num_samples": ROWS},
               "tokenizer": {"type": "NullTokenizer", "vocab_size": 128},
               "short_context": {"window": 8, "mode": "sliding", "stride": None}}


class Samples(torch.utils.data.Dataset):
    """Deterministic samples: tokens of sample i are (i * 7 + p) % 97."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        tokens = (torch.arange(SEQ) + i * 7) % 97
        return {"tokens": tokens, "labels": torch.roll(tokens, -1)}


def reference_row(i: int) -> numpy.ndarray:
    tokens = ((numpy.arange(SEQ) + i * 7) % 97).astype(numpy.float64)
    return numpy.sin(tokens) + 0.01 * numpy.arange(SEQ)


class CountingScorer:
    """score_fn of the offline writer: counts the samples it scores, can fail after ``limit``."""

    def __init__(self, limit=None):
        self.scored, self.limit = 0, limit

    def __call__(self, samples):
        if self.limit is not None and self.scored + len(samples) > self.limit:
            raise KeyboardInterrupt("interrupted")
        self.scored += len(samples)
        rows = [numpy.sin(s["tokens"].double().numpy()) + 0.01 * numpy.arange(SEQ) for s in samples]
        return torch.tensor(numpy.stack(rows), dtype=torch.float32)


def record(rows=ROWS, scorer="a"):
    return offline.new_record("train", rows, SEQ, FINGERPRINT, {"path": scorer}, ["score_data.py"])


def score(prefix, *, world=1, chunk=3, scorer=None, rec=None, ranks=None):
    """Plan every rank first (as the tool does), then run them, rank 0 last (it merges)."""
    rec = rec or record()
    scorer = scorer or CountingScorer()
    plans = {r: offline.plan_split(rec, prefix=prefix, split="train", chunk_rows=chunk, rank=r,
                                   world_size=world) for r in range(world)}
    out = None
    for r in (ranks or sorted(plans, reverse=True)):
        out = offline.run_split(plans[r], Samples(), scorer, batch=2, rank=r, world_size=world,
                                progress=False, poll_s=0.01)
    return out, scorer, plans


def expected(rows=ROWS):
    return numpy.stack([reference_row(i) for i in range(rows)]).astype(numpy.float32)


def rows_of(sidecar: Sidecar) -> numpy.ndarray:
    return numpy.stack([sidecar.row(i).numpy() for i in range(sidecar.rows)])


# -- writing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("world,chunk", [(1, 3), (2, 3), (3, 4), (2, 20)])
def test_rows_equal_reference_for_any_process_count(tmp_path, world, chunk):
    prefix = str(tmp_path / "sl")
    sidecar, scorer, _ = score(prefix, world=world, chunk=chunk)
    assert scorer.scored == ROWS
    numpy.testing.assert_array_equal(rows_of(sidecar), expected())
    # the final files only: shards removed, no temporary names left
    assert sorted(os.listdir(tmp_path)) == ["sl_train.bin", "sl_train.idx", "sl_train.json"]
    # a megatron IndexedDataset: document i = row i
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix + "_train")
    assert len(indexed) == ROWS and indexed[3].dtype == numpy.float32
    numpy.testing.assert_array_equal(indexed[3], expected()[3])


def test_chunks_are_split_round_robin_between_ranks(tmp_path):
    _, _, plans = score(str(tmp_path / "sl"), world=2, chunk=3)
    assert plans[0].pending == [0, 2] and plans[1].pending == [1, 3]
    assert plans[0].ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_interrupted_run_resumes_done_chunks_even_with_another_process_count(tmp_path):
    prefix = str(tmp_path / "sl")
    with pytest.raises(KeyboardInterrupt):
        score(prefix, world=1, chunk=3, scorer=CountingScorer(limit=7))
    parts = offline.parts_dir(prefix, "train", record())
    done = sorted(n for n in os.listdir(parts) if n.endswith(".done"))
    assert done == ["chunk_000000.done", "chunk_000001.done"]  # chunk 2 was cut mid-way
    assert not os.path.exists(split_paths(prefix, "train")["json"])
    sidecar, scorer, plans = score(prefix, world=2, chunk=3)
    assert plans[0].pending == [2] and plans[1].pending == [3]
    assert scorer.scored == ROWS - 6
    numpy.testing.assert_array_equal(rows_of(sidecar), expected())


def test_complete_sidecar_is_not_rescored_but_a_different_scorer_is(tmp_path):
    prefix = str(tmp_path / "sl")
    score(prefix)
    _, scorer, plans = score(prefix)
    assert plans[0].complete and scorer.scored == 0
    # shards of an abandoned run with another scorer are removed by the next merge
    os.makedirs(offline.parts_dir(prefix, "train", record(scorer="old")))
    _, scorer, plans = score(prefix, rec=record(scorer="b"))
    assert not plans[0].complete and scorer.scored == ROWS
    assert json.loads(open(prefix + "_train.json").read())["scorer"] == {"path": "b"}
    assert not [n for n in os.listdir(tmp_path) if ".parts-" in n]


def test_rank_zero_waits_for_the_other_ranks_chunks(tmp_path):
    import threading

    prefix = str(tmp_path / "sl")
    rec = record()
    plans = [offline.plan_split(rec, prefix=prefix, split="train", chunk_rows=3, rank=r,
                                world_size=2) for r in range(2)]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("sidecar", offline.run_split(
        plans[0], Samples(), CountingScorer(), batch=2, rank=0, world_size=2, progress=False,
        poll_s=0.01)))
    t.start()
    t.join(0.5)
    assert t.is_alive()  # rank 1's chunks are missing: rank 0 must not merge
    assert offline.run_split(plans[1], Samples(), CountingScorer(), batch=2, rank=1,
                             world_size=2, progress=False) is None
    t.join(10)
    numpy.testing.assert_array_equal(rows_of(result["sidecar"]), expected())


# -- reading: each bad sidecar has its own message --------------------------------------------

@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "sl")
    score(prefix)
    return prefix


def open_good(prefix, fingerprint=FINGERPRINT, rows=ROWS, seq=SEQ):
    return open_sidecar(prefix, "train", fingerprint=fingerprint, rows=rows, seq_length=seq,
                        command="torchrun ... tools/score_data.py --seq-length 16 ...")


def test_missing_sidecar_names_the_flag_and_the_command(tmp_path):
    with pytest.raises(SidecarError, match=r"--tw-short-loss-path .*nowhere: no precomputed "
                                           r"short-context losses for the train split") as err:
        open_good(str(tmp_path / "nowhere"))
    assert "nowhere_train.json" in str(err.value)
    assert "create it with:\n  torchrun ... tools/score_data.py" in str(err.value)


@pytest.mark.parametrize("section,field,value,hint", [
    ("dataset", "random_seed", 99, "--seed"),
    ("dataset", "num_samples", 32, "--train-iters x --global-batch-size"),
    ("tokenizer", "vocab_size", 256, "--tokenizer-"),
    ("short_context", "window", 4, "--tw-short-context"),
])
def test_fingerprint_mismatch_names_the_field(good, section, field, value, hint):
    current = json.loads(json.dumps(FINGERPRINT))
    stored = current[section][field]
    current[section][field] = value
    with pytest.raises(SidecarError) as err:
        open_good(good, fingerprint=current)
    message = str(err.value)
    assert f"{section}.{field}: sidecar {stored!r}, this run {value!r}" in message
    assert hint in message and "Rescore with tools/score_data.py" in message
    assert message.count("sidecar ") == 1 + 1  # one differing field (and the opening sentence)


def test_too_few_samples(good):
    with pytest.raises(SidecarError, match=r"sl_train: holds 10 samples, this run reads 12 "
                                           r"\(--train-iters x --global-batch-size"):
        open_good(good, rows=12)
    assert open_good(good, rows=7).rows == ROWS  # more than needed is fine


def test_truncated_bin(good):
    path = good + "_train.bin"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(SidecarError, match=r"sl_train.bin: 636 bytes, expected 640 \(10 rows x "
                                           r"16 float32\); the sidecar is truncated or corrupt"):
        open_good(good)


@pytest.mark.parametrize("cut", [5, 60])
def test_truncated_idx(good, cut):
    path = good + "_train.idx"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])
    with pytest.raises(SidecarError, match=r"sl_train.idx: .*(truncated or corrupt)"):
        open_good(good)


def test_corrupt_json(good):
    open(good + "_train.json", "w").write('{"format": "megatron_tw short-loss sidecar v1", ')
    with pytest.raises(SidecarError, match=r"sl_train.json is not valid JSON .*corrupt"):
        open_good(good)


def test_bin_of_another_run(good, tmp_path):
    other = str(tmp_path / "other")
    score(other, scorer=CountingScorer(), rec=record())
    rows = numpy.memmap(other + "_train.bin", dtype=numpy.float32, mode="r+")
    rows[5] += 1.0  # same size, other losses
    rows.flush()
    shutil.copy(other + "_train.bin", good + "_train.bin")
    with pytest.raises(SidecarError, match=r"sl_train.bin is not the file .*sl_train.json "
                                           r"describes"):
        open_good(good)


def test_other_sequence_length(good):
    with pytest.raises(SidecarError, match=r"rows of 16 losses, but --seq-length is 32"):
        open_good(good, seq=32)


def test_not_float32(good):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(good + "_train.bin", dtype=numpy.int32)
    for i in range(ROWS):
        builder.add_document(numpy.zeros(SEQ, numpy.int32), [SEQ])
    builder.finalize(good + "_train.idx")
    with pytest.raises(SidecarError, match=r"dtype code 4.*expected version 1, float32"):
        open_good(good)


# -- the dataset wrapper ----------------------------------------------------------------------

def test_wrapper_adds_the_row_of_the_dataset_index(good):
    sidecar = open_good(good)
    data = WithShortLoss(Samples(), sidecar)
    for i in (0, 3, 9):
        sample = data[i]
        assert sample["short_loss"].dtype == torch.float32 and sample["short_loss"].shape == (SEQ,)
        numpy.testing.assert_array_equal(sample["short_loss"].numpy(), expected()[i])
        assert torch.equal(sample["tokens"], Samples()[i]["tokens"])
    clone = pickle.loads(pickle.dumps(data))  # DataLoader workers: reopened, not pickled data
    assert clone.sidecar._rows is None
    numpy.testing.assert_array_equal(clone[4]["short_loss"].numpy(), expected()[4])
    with pytest.raises(IndexError, match="sample 10 requested, the sidecar holds 10"):
        data[10]


def test_fingerprint_differences_lists_every_field():
    a = {"x": {"y": 1, "z": [1, 2]}, "w": None}
    b = {"x": {"y": 2, "z": [1, 2], "new": 3}, "w": None}
    assert fingerprint_differences(a, b) == ["x.new: sidecar '(absent)', this run 3",
                                             "x.y: sidecar 1, this run 2"]
    assert fingerprint_differences(a, json.loads(json.dumps(a))) == []


def test_score_command_keeps_the_training_flags_but_the_scorer_choice():
    cmd = score_command(["--seq-length", "64", "--tw-scorer", "precomputed", "--data-path", "d",
                         "--tw-scorer=precomputed"])
    assert "tools/score_data.py --seq-length 64 --data-path d --tw-scorer-load" in cmd
    assert "precomputed" not in cmd
