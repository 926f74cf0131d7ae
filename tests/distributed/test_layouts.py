"""Every parallel layout reproduces the single-process run (loss and grad norm, step by step)."""

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, iteration_logs, pretrain

pytestmark = pytest.mark.distributed

STEPS = 4
ARGS = TINY_MODEL + TINY_TRAINING + ["--train-iters", str(STEPS)]


@pytest.fixture(scope="module")
def reference():
    logs = iteration_logs(pretrain(1, ARGS).stdout)
    assert sorted(logs) == list(range(1, STEPS + 1))
    return logs


def test_loss_falls_in_one_process(reference):
    assert reference[STEPS]["lm loss"] < reference[1]["lm loss"] - 0.05


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, []),  # data parallel 2
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
], ids=["tp2", "pp2", "dp2", "tp2pp2", "dp2-distopt"])
def test_layout_matches_single_process(reference, nproc, layout):
    logs = iteration_logs(pretrain(nproc, ARGS + layout).stdout)
    assert sorted(logs) == sorted(reference)
    for it, ref in reference.items():
        assert logs[it]["lm loss"] == pytest.approx(ref["lm loss"], rel=1e-5, abs=1e-6), it
        assert logs[it]["grad norm"] == pytest.approx(ref["grad norm"], rel=1e-4, abs=1e-6), it
