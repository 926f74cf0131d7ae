"""Transformer Engine's context-parallel attention (p2p ring, load-balanced chunks) trains the
same model as one rank holding the whole sequence: CP2 reproduces CP1's losses step by step,
with token weighting off and on (the weights' per-sequence sums and top-k thresholds are reduced
over the CP group).

bf16, since TE's CP attention runs only in its flash/fused kernels; tolerance accordingly.
Needs two GPUs (NCCL does not put two ranks on one device).
"""

from __future__ import annotations

import pytest
import torch

from tests.launch import TINY_MODEL, TINY_TRAINING, assert_same_run, train

pytestmark = pytest.mark.gpu

STEPS = 4
BASE = [*TINY_MODEL, *TINY_TRAINING, "--train-iters", str(STEPS),
        "--transformer-impl", "transformer_engine", "--bf16"]
WEIGHTING = {"uniform": ["--tw-preset", "uniform"],
             "dense": ["--tw-preset", "dense", "--tw-short-context", "16"],
             "sparse": ["--tw-preset", "sparse", "--tw-sparsity", "0.25",
                        "--tw-short-context", "16"]}


@pytest.fixture(autouse=True)
def two_gpus(monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    # megatron requires it for CP > 1 before Blackwell (stream ordering of CP communication)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")


@pytest.mark.parametrize("cp_comm_type", ["p2p", "a2a"])
@pytest.mark.parametrize("weighting", sorted(WEIGHTING))
def test_cp2_matches_cp1(tmp_path, weighting, cp_comm_type):
    flags = [*BASE, *WEIGHTING[weighting]]
    one = train(1, flags, tmp_path / "cp1")
    two = train(2, [*flags, "--context-parallel-size", "2", "--cp-comm-type", cp_comm_type],
                tmp_path / "cp2")
    assert_same_run(two, one, tags=("lm loss",), rel=1e-2)
