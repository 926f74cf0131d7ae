"""--tw-dump-weights (megatron_tw/weight_dump.py) under context parallelism: the dumped weights
and long-context losses reproduce the weighted loss megatron logged for that step, and the CP
ranks' rows of each sample cover its sequence exactly once."""

import glob

import numpy
import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, train

pytestmark = pytest.mark.distributed


def test_dump_reproduces_logged_weighted_loss(tmp_path):
    dump = tmp_path / "weights"
    scalars = train(2, TINY_MODEL + TINY_TRAINING + [
        "--train-iters", "3", "--tw-preset", "dense", "--tw-short-context", "16",
        "--context-parallel-size", "2", "--tw-dump-weights", str(dump),
        "--tw-dump-weights-interval", "2"], tmp_path / "tb")
    assert sorted(p.name for p in dump.iterdir()) == ["iter_0000000", "iter_0000002"]
    for iteration, step in ((0, 1), (2, 3)):
        files = sorted(glob.glob(str(dump / f"iter_{iteration:07d}" / "*.npz")))
        assert len(files) == 8  # 4 micro-batches x 2 CP ranks (global batch 8, micro 2, DP 1)
        weighted, tokens, cover = 0.0, 0.0, {}
        for path in files:
            with numpy.load(path) as z:
                assert z["weights"].shape == (2, 32) and "short_loss" in z
                weighted += float((z["weights"] * z["long_loss"] * z["loss_mask"]).sum())
                tokens += float(z["loss_mask"].sum())
                mb = path.rsplit("_mb", 1)[1]
                for row, sample in enumerate(z["sample_id"]):
                    cover.setdefault((mb, row, int(sample)), []).extend(z["position_ids"][row])
        assert len(cover) == 8
        for positions in cover.values():
            assert sorted(positions) == list(range(64))
        assert weighted / tokens == pytest.approx(scalars["weighted loss"][step], rel=1e-5)
