"""FP8 training steps run end to end (pretrain_tw.py, Transformer Engine, one GPU) and train like
bf16: the same tiny model from the same initial weights on the same mock data, FP8 (hybrid
E4M3/E5M2) against bf16, with token weighting off and on.

FP8 GEMMs need dimensions divisible by 16: the tiny model's hidden 64, MLP 128, QKV 128 and
micro-batch 2 x 64 tokens all are.
"""

from __future__ import annotations

import math

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, train

pytestmark = pytest.mark.gpu

STEPS = 12
BASE = [*TINY_MODEL, *TINY_TRAINING, "--train-iters", str(STEPS),
        "--transformer-impl", "transformer_engine", "--bf16"]
WEIGHTING = {"uniform": ["--tw-preset", "uniform"],
             "dense": ["--tw-preset", "dense", "--tw-short-context", "16"]}
FP8 = {"delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                   "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max"],
       "tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    return {name: train(1, [*BASE, *flags], tmp_path_factory.mktemp(f"bf16-{name}"))
            for name, flags in WEIGHTING.items()}


@pytest.mark.parametrize("recipe", sorted(FP8))
@pytest.mark.parametrize("weighting", sorted(WEIGHTING))
def test_fp8_trains_like_bf16(tmp_path, bf16_runs, recipe, weighting):
    fp8 = train(1, [*BASE, *WEIGHTING[weighting], *FP8[recipe]], tmp_path)
    bf16 = bf16_runs[weighting]
    steps = list(range(1, STEPS + 1))
    assert sorted(fp8["lm loss"]) == steps
    assert all(math.isfinite(fp8["lm loss"][s]) for s in steps)
    # Same initial weights and data: the first loss differs only by FP8 rounding.
    assert fp8["lm loss"][1] == pytest.approx(bf16["lm loss"][1], rel=2e-2)
    # Both learn the mock data, and by about as much.
    drop_bf16 = bf16["lm loss"][1] - bf16["lm loss"][STEPS]
    drop_fp8 = fp8["lm loss"][1] - fp8["lm loss"][STEPS]
    assert drop_bf16 > 0.1, "the bf16 reference does not train; the comparison means nothing"
    assert drop_fp8 == pytest.approx(drop_bf16, rel=0.25)
