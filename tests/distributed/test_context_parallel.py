"""Context parallelism (CP2, CP4, TP2xCP2, PP2xCP2) reproduces the single-process run, on data
whose loss masks differ between the CP chunks of a sequence (EOD tokens masked)."""

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, assert_same_run, train, write_random_corpus

pytestmark = pytest.mark.distributed

STEPS = 3


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    prefix = write_random_corpus(tmp_path_factory.mktemp("data") / "corpus", min_len=3, max_len=40)
    data = [a for a in TINY_TRAINING if a != "--mock-data"]
    return TINY_MODEL + data + ["--train-iters", str(STEPS), "--data-path", prefix,
                                "--split", "100,0,0", "--eod-mask-loss"]


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    return train(1, args, tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "4"]),
    (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
], ids=["cp2", "cp4", "tp2cp2", "pp2cp2"])
def test_cp_layout_matches_single_process(args, reference, tmp_path, nproc, layout):
    assert_same_run(train(nproc, args + layout, tmp_path), reference)
