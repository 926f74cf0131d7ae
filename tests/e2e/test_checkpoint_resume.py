"""Save at step N and resume: the resumed run continues exactly; a TP2 checkpoint loads into one
process; TensorBoard receives the loss scalar."""

import glob

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, assert_same_run, train

pytestmark = pytest.mark.e2e

STEPS = 6
ARGS = TINY_MODEL + TINY_TRAINING + ["--train-iters", str(STEPS), "--ckpt-format", "torch_dist"]
STOP = ["--save-interval", "3", "--exit-interval", "3"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(1, ARGS, tmp_path / "full")
    assert glob.glob(str(tmp_path / "full" / "events.out.tfevents.*")), "no TensorBoard event file"
    assert sorted(full["lm loss"]) == list(range(1, STEPS + 1))

    ckpt = str(tmp_path / "ckpt")
    first = train(1, ARGS + ["--save", ckpt] + STOP, tmp_path / "first")
    resumed = train(1, ARGS + ["--load", ckpt], tmp_path / "resumed")
    assert_same_run(first, full, steps=[1, 2, 3])
    assert_same_run(resumed, full, steps=[4, 5, 6])


@pytest.mark.distributed
def test_tp2_checkpoint_continues_in_one_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    tp2 = ["--tensor-model-parallel-size", "2"]
    full = train(2, ARGS + tp2, tmp_path / "full")
    train(2, ARGS + tp2 + ["--save", ckpt] + STOP, tmp_path / "first")
    resumed = train(1, ARGS + ["--load", ckpt], tmp_path / "resumed")
    assert_same_run(resumed, full, steps=[4, 5, 6], rel=1e-4)
