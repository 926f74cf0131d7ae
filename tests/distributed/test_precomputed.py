"""Precomputed short-context losses under parallelism: tools/score_data.py in two processes
(chunks split between them) writes a sidecar with which a context-parallel (CP2) training run
gives the same losses and gradient norms at every step as the same CP2 run with the online frozen
scorer (sliding mode: the online pass is sharded over CP, the offline one runs on whole rows)."""

import pytest

from tests.e2e.test_score_data import tiny_hf_scorer
from tests.launch import (
    TINY_MODEL,
    TINY_TRAINING,
    assert_same_run,
    torchrun,
    train,
    write_random_corpus,
)

pytestmark = pytest.mark.distributed

TAGS = ("lm loss", "weighted loss", "grad-norm", "long-context gain", "weight max")


def test_two_process_sidecar_trains_like_online_frozen_under_cp2(tmp_path):
    scorer = tiny_hf_scorer(tmp_path / "scorer", seed=1)
    data = write_random_corpus(tmp_path / "corpus", n_docs=150, min_len=3, max_len=50)
    training = [a for a in TINY_TRAINING if a != "--mock-data"]
    flags = TINY_MODEL + training + ["--train-iters", "3", "--data-path", data,
                                     "--split", "100,0,0", "--eod-mask-loss",
                                     "--tw-preset", "sparse", "--tw-sparsity", "0.5",
                                     "--tw-short-context", "16", "--tw-short-mode", "sliding"]
    cp2 = ["--context-parallel-size", "2"]
    out = torchrun(2, "tools/score_data.py",
                   flags + cp2 + ["--tw-scorer-load", scorer, "--score-chunk-rows", "5"]).stdout
    assert f"wrote {data}_short_loss_train.{{bin,idx,json}}: 24 x 64 float32" in out

    frozen = train(2, flags + cp2 + ["--tw-scorer", "frozen", "--tw-scorer-load", scorer],
                   tmp_path / "frozen")
    pre = train(2, flags + cp2 + ["--tw-scorer", "precomputed"], tmp_path / "pre")
    assert sorted(pre["lm loss"]) == [1, 2, 3]
    assert_same_run(pre, frozen, tags=TAGS, rel=2e-5)
    assert any(abs(frozen["weighted loss"][s] - frozen["lm loss"][s]) > 1e-4
               for s in frozen["lm loss"])
