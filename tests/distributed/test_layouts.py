"""Every parallel layout reproduces the single-process run (loss and grad norm, step by step)."""

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, assert_same_run, train

pytestmark = pytest.mark.distributed

STEPS = 4
ARGS = TINY_MODEL + TINY_TRAINING + ["--train-iters", str(STEPS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(1, ARGS, tmp_path_factory.mktemp("ref"))


def test_loss_falls_in_one_process(reference):
    loss = reference["lm loss"]
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.05


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, []),  # data parallel 2
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
], ids=["tp2", "pp2", "dp2", "tp2pp2", "dp2-distopt"])
def test_layout_matches_single_process(reference, tmp_path, nproc, layout):
    assert_same_run(train(nproc, ARGS + layout, tmp_path), reference)
