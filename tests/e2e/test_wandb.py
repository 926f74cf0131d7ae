"""Weights & Biases gets the token-weight statistics next to the losses.

``pretrain_tw.py ... --wandb-project P --wandb-exp-name E --wandb-save-dir D`` (WANDB_MODE=offline)
on a tiny dense self-scored run: megatron's training_log sends every key of the loss function's
report ("lm loss", "weighted loss", the weight statistics of weighting/statistics.py) to W&B where
it writes them to TensorBoard. It does so only with a TensorBoard writer, so without
--tensorboard-dir the run defaults it to D/tensorboard (megatron_tw/arguments.py,
``resolve_wandb_args``). The offline run's history, read back from its ``.wandb`` file, has those
keys with finite values at every step, equal to the TensorBoard scalars of the same run.

The ``.wandb`` file is wandb's transaction log: a 7-byte header (":W&B", 0xBEE1, version 0) then
LevelDB-log records (32 KiB blocks; each chunk: CRC-32 of type + data, length, type) holding
``wandb_internal_pb2.Record`` protobufs. wandb 0.31 ships no Python reader for it (the old
``wandb.sdk.internal.datastore`` went with the Python backend), so ``read_wandb_records`` below
is one, checking every CRC.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, pretrain, tensorboard_scalars

pytestmark = pytest.mark.e2e
pytest.importorskip("wandb", reason='needs wandb: pip install -e ".[wandb]"')

STEPS = 3
ARGS = TINY_MODEL + TINY_TRAINING + ["--train-iters", str(STEPS), "--tw-preset", "dense",
                                     "--tw-short-context", "16"]
KEYS = ("lm loss", "weighted loss", "weight mean", "weight std", "weight max",
        "effective tokens frac", "zero weight frac", "weight share beyond short ctx",
        "long-context gain")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path):
    """Every ``Record`` in a ``run-*.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending, records = 7, None, []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the block's end
            pos += _BLOCK - pos % _BLOCK
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, None
        else:
            raise AssertionError(f"{path}: chunk type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history(records) -> dict[int, dict[str, float]]:
    """{step: {key: value}} from the history records."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            out[int(items["_step"])] = items
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    save = tmp / "D"
    with pytest.MonkeyPatch.context() as mp:  # tests.launch.env() copies os.environ
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
            mp.setenv(var, str(tmp / sub))
        pretrain(1, [*ARGS, "--wandb-project", "P", "--wandb-exp-name", "E",
                     "--wandb-save-dir", str(save)], timeout=400)
    files = sorted(save.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    return {"records": read_wandb_records(files[0]),
            "tensorboard": tensorboard_scalars(save / "tensorboard")}


def test_wandb_run_is_the_named_offline_run(run):
    runs = [r.run for r in run["records"] if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1 and (runs[0].project, runs[0].display_name) == ("P", "E")


def test_wandb_history_has_losses_and_weight_statistics_equal_to_tensorboard(run):
    hist, tb = history(run["records"]), run["tensorboard"]
    assert sorted(hist) == list(range(1, STEPS + 1)), sorted(hist)
    worst = 0.0
    for step, row in hist.items():
        missing = [k for k in KEYS if k not in row]
        assert not missing, (step, missing, sorted(row))
        for key in (*KEYS, "grad-norm"):
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (step, key, value)
            assert value == pytest.approx(tb[key][step], rel=1e-6, abs=1e-9), (step, key)
            worst = max(worst, abs(value - tb[key][step]))
    print(f"W&B vs TensorBoard: {len(hist)} steps x {len(KEYS) + 1} keys, max |diff| {worst:.1e}")
    # the weighting is active: the weighted loss is not the plain one
    assert any(abs(row["weighted loss"] - row["lm loss"]) > 1e-4 for row in hist.values())
