"""The frozen scorer co-located on the first pipeline stage gives the last stage the same
short-context losses as without pipelining (same weighted losses and gradients, step by step),
and it is never trained nor saved: the checkpoint holds exactly the trainee's tensors."""

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, assert_same_run, train
from tests.distributed.test_scorers import hf_scorer  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed

COMMON = TINY_MODEL + TINY_TRAINING + ["--train-iters", "2", "--ckpt-format", "torch_dist"]
BASE = COMMON + ["--tw-preset", "dense", "--tw-short-context", "16"]


def _tensor_keys(ckpt):
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(ckpt / "iter_0000002")))


def test_frozen_scorer_on_first_stage_matches_pp1(hf_scorer, tmp_path):  # noqa: F811
    frozen = BASE + ["--tw-scorer", "frozen", "--tw-scorer-load", hf_scorer]
    pp1 = train(1, frozen + ["--save", str(tmp_path / "pp1"), "--save-interval", "2"],
                tmp_path / "tb1")
    pp2 = train(2, frozen + ["--pipeline-model-parallel-size", "2", "--tw-scorer-stage", "0"],
                tmp_path / "tb2")
    assert_same_run(pp2, pp1, tags=("lm loss", "weighted loss", "grad-norm", "long-context gain"))

    uniform = train(1, COMMON + ["--save", str(tmp_path / "uni"), "--save-interval", "2"],
                    tmp_path / "tb3")
    assert uniform["lm loss"][1] == pytest.approx(pp1["lm loss"][1], rel=1e-6)
    keys = _tensor_keys(tmp_path / "pp1")
    assert keys == _tensor_keys(tmp_path / "uni"), "the frozen scorer leaked into the checkpoint"
