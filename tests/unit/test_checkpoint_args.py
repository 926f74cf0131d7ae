"""A checkpoint's saved args load back under megatron's own loader.

megatron saves ``args`` in every checkpoint; with ``--ckpt-format torch`` it loads the file with
``torch.load`` at torch's default ``weights_only=True``, allowing only the classes megatron-core
registers (megatron/core/safe_globals.py). pretrain_tw.py's args hold ``tw_weighting``, a
megatron_tw WeightingConfig; unregistered, the load failed, megatron printed "could not load the
checkpoint" and exited with status 0 having trained nothing (measured: a one-process dense run
saved at iteration 2 and resumed with --load). megatron_tw/weighting/config.py registers it.
torch_dist checkpoints are not affected (their common state loads differently).
"""

from __future__ import annotations

import argparse
import io

import pytest
import torch

pytestmark = pytest.mark.unit


def test_saved_args_load_weights_only():
    import megatron.core  # noqa: F401  (registers megatron's safe globals, as in a run)

    # what pretrain_tw.py imports before it trains
    import megatron_tw.arguments  # noqa: F401
    import megatron_tw.data.provider  # noqa: F401
    import megatron_tw.model.provider  # noqa: F401
    import megatron_tw.reliability  # noqa: F401
    import megatron_tw.scoring.scorers  # noqa: F401
    import megatron_tw.step  # noqa: F401
    from megatron_tw.weighting import build_weighting_config

    buffer = io.BytesIO()
    torch.save({"args": argparse.Namespace(tw_weighting=build_weighting_config("dense"))}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu")  # megatron's call: weights_only by default
    assert loaded["args"].tw_weighting == build_weighting_config("dense")
