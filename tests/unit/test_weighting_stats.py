"""weight_statistics against float64 formulas, one process (the CP sum is checked in
tests/distributed/test_weighting_cp.py)."""

import math

import pytest
import torch

from megatron_tw.weighting import build_weighting_config, compute_token_weights, weight_statistics

pytestmark = pytest.mark.unit


def reference_statistics(w, long, short, mask, positions, short_context):
    """{key: value} as logged (numerator / denominator), from per-sequence Python loops."""
    token_w, zeros, beyond, gains = [], 0, 0.0, []
    stds, maxes, effs = [], [], []
    for i in range(w.shape[0]):
        idx = [j for j in range(w.shape[1]) if mask[i, j] != 0]
        if not idx:
            continue
        ws = [float(w[i, j]) for j in idx]
        n = len(ws)
        mean = sum(ws) / n
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in ws) / n))
        maxes.append(max(ws))
        sq = sum(x * x for x in ws)
        effs.append(sum(ws) ** 2 / sq / n if sq > 0 else 0.0)
        token_w += ws
        zeros += sum(1 for x in ws if x == 0)
        beyond += sum(float(w[i, j]) for j in idx if positions[i, j] >= short_context)
        gains += [float(short[i, j]) - float(long[i, j]) for j in idx]
    return {
        "weight mean": sum(token_w) / len(token_w),
        "weight std": sum(stds) / len(stds),
        "weight max": sum(maxes) / len(maxes),
        "effective tokens frac": sum(effs) / len(effs),
        "zero weight frac": zeros / len(token_w),
        "weight share beyond short ctx": beyond / sum(token_w),
        "long-context gain": sum(gains) / len(gains),
    }


@pytest.mark.parametrize("preset", ["uniform", "dense", "sparse", "longce", "ppmi", "npmi"])
def test_statistics_match_formulas(preset):
    g = torch.Generator().manual_seed(1)
    b, s = 3, 48
    long, short = torch.rand(b, s, generator=g) * 6, torch.rand(b, s, generator=g) * 6
    mask = (torch.rand(b, s, generator=g) < 0.8).float()
    mask[2] = 0  # a row without tokens is skipped, not counted as a sequence
    positions = torch.arange(s).repeat(b, 1)
    cfg = build_weighting_config(preset)
    w = compute_token_weights(long, short, mask, positions, torch.arange(b), config=cfg, seed=3,
                              iteration=4)
    stats = weight_statistics(w, long, short, mask, positions, short_context=20)
    want = reference_statistics(w, long, short, mask, positions, 20)
    assert set(stats) == set(want)
    for key, value in stats.items():
        assert value.shape == (2,) and value.dtype == torch.float32, key
        assert value[1] > 0, key
        assert float(value[0] / value[1]) == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if preset == "uniform":
        assert float(stats["effective tokens frac"][0] / stats["effective tokens frac"][1]) == 1.0
    if preset == "sparse":
        # A binary top-quarter mask keeps (about) a quarter of the tokens effective.
        eff = float(stats["effective tokens frac"][0] / stats["effective tokens frac"][1])
        assert 0.2 <= eff <= 0.26


def test_statistics_without_short_loss_leave_out_the_gain():
    mask = torch.ones(1, 8)
    stats = weight_statistics(mask, torch.rand(1, 8), None, mask, torch.arange(8)[None],
                              short_context=4)
    assert "long-context gain" not in stats
    assert stats["weight share beyond short ctx"].tolist() == [4.0, 8.0]
