"""The weighting glue of the training step (megatron_tw/step.py ``build_weight_fn``) on small
tensors, with a stand-in scorer that returns known short losses: the component under test is the
glue (which losses, positions, sample ids, seed and iteration reach the weighting), not the
scorer or the weighting formulas (tests/unit/test_weighting.py).

One process: megatron's model-parallel state initialised over gloo (world size 1, CP size 1),
megatron's global args set to a namespace holding what the glue reads.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_tw.reliability import NonFiniteError
from megatron_tw.reliability import guard
from megatron_tw.step import build_weight_fn
from megatron_tw.weighting import build_weighting_config, compute_token_weights

pytestmark = pytest.mark.unit

B, S, W, SEED = 2, 16, 4, 1234


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    from megatron_tw.checkpoint.megatron_io import single_process_megatron

    with single_process_megatron():
        yield


@pytest.fixture
def args(monkeypatch):
    import megatron.training.global_vars as gv

    ns = argparse.Namespace(
        tw_weighting=build_weighting_config("dense"), tw_scorer="self",
        pipeline_model_parallel_size=1, tw_scorer_stage=0, tw_short_context=W, seed=SEED,
        curr_iteration=5, tw_check_nonfinite=True, tw_nonfinite="stop",
        tw_nonfinite_max_skips=10, check_for_nan_in_loss_and_grad=True)
    monkeypatch.setattr(gv, "_GLOBAL_ARGS", ns, raising=False)
    guard.reset_step_record()
    yield ns
    guard.reset_step_record()


class StandInScorer:
    """Returns the given (short, same_as_long) and records the batches it was asked about."""

    def __init__(self, short, same):
        self.short, self.same, self.calls = short, same, []

    def short_losses(self, batch):
        self.calls.append(batch)
        return self.short, self.same


def _batch(mask=None, positions=None, sample_ids=(3, 9)):
    return {"loss_mask": torch.ones(B, S) if mask is None else mask,
            "position_ids": (torch.arange(S).expand(B, S) if positions is None
                             else positions).clone(),
            "sample_id": torch.tensor(sample_ids)}


def _losses(seed=0):
    g = torch.Generator().manual_seed(seed)
    long = torch.rand(B, S, generator=g) * 4 + 0.5
    short = long + torch.randn(B, S, generator=g)
    return long, short


def _weights(args, batch, long, short, same):
    fn = build_weight_fn(args, batch, StandInScorer(short, same))
    return fn(long)


def test_uniform_builds_no_hook_and_never_scores(args):
    class Refuses:
        def short_losses(self, batch):
            raise AssertionError("the uniform preset asked for short losses")

    args.tw_weighting = build_weighting_config("uniform")
    assert build_weight_fn(args, _batch(), Refuses()) is None


def test_same_as_long_positions_take_the_long_loss(args):
    """Where the scorer says the short context is the whole prefix, d = 0 whatever it returned
    there (NaN included: not checked, since it is never used); weights and the long-context gain
    against a float64 dense formula."""
    long, short = _losses()
    same = torch.zeros(B, S, dtype=torch.bool)
    same[:, :W] = True  # what the self scorer reports for positions < W
    short[:, :W] = float("nan")
    mask = torch.ones(B, S)
    mask[1, 10:] = 0  # a shorter second sequence: its masked tail may hold garbage too
    short[1, 12] = float("inf")
    scorer = StandInScorer(short, same)
    batch = _batch(mask)
    fn = build_weight_fn(args, batch, scorer)
    assert scorer.calls == [batch]  # scored once, when the hook is built
    weights, stats = fn(long)

    d = torch.where(same | (mask == 0), 0.0, long.double() - short.double())
    a = d.abs()
    n = mask.double().sum(1, keepdim=True)
    want = (0.75 + 0.25 * n * a / a.sum(1, keepdim=True)) * mask
    torch.testing.assert_close(weights.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(weights[:, :W], torch.full((B, W), 0.75))  # |d| = 0 there
    gain = torch.where(same | (mask == 0), 0.0, short.double() - long.double()).sum() / mask.sum()
    num, den = stats["long-context gain"]
    assert float(num / den) == pytest.approx(float(gain), rel=1e-5)
    # a NaN short loss where it IS used stops the step, naming it
    short[0, W] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite short-context losses at iteration 6"):
        _weights(args, _batch(mask), long, short, same)


def test_inputs_reach_the_weighting_unchanged(args):
    """The glue's weights equal compute_token_weights called directly with the batch's global
    positions and sample ids, the run's seed and the iteration, for a preset using all of them
    (sparse: the tie-break key hashes seed, iteration, sample id and global position)."""
    args.tw_weighting = build_weighting_config("sparse", sparsity=0.25)
    long, short = _losses(1)
    same = torch.zeros(B, S, dtype=torch.bool)
    short[:, 8:] = long[:, 8:] - 1.0  # |d| = 1 on 8 tokens per row: 4 picked among 8 tied
    # the positions a CP rank holds (chunks 0 and 3 of 4 of a 32-token sequence), not 0..S-1
    positions = torch.cat([torch.arange(0, 8), torch.arange(24, 32)]).expand(B, S)
    mask = torch.ones(B, S)
    batch = _batch(mask, positions, sample_ids=(11, 4))
    weights, stats = _weights(args, batch, long, short, same)
    want = compute_token_weights(long, short, mask, positions, torch.tensor([11, 4]),
                                 config=args.tw_weighting, seed=SEED, iteration=5)
    assert torch.equal(weights, want)
    assert ((weights == 4.0).sum(1) == 4).all() and ((weights == 0).sum(1) == 12).all()
    # "weight share beyond short ctx" reads the global positions (>= W: all but 0..3)
    num, den = stats["weight share beyond short ctx"]
    share = (weights * (positions >= W)).sum() / weights.sum()
    assert float(num / den) == pytest.approx(float(share))


def _tied_selection(args, *, sample_ids=(3, 9), iteration=5, seed=SEED, positions=None):
    """Weights of a batch in which all 16 tokens of each row tie (|d| = 1): sparse keeps 4,
    chosen by the tie-break alone."""
    args.tw_weighting = build_weighting_config("sparse", sparsity=0.25)
    args.curr_iteration, args.seed = iteration, seed
    long = torch.full((B, S), 2.0)
    short = torch.full((B, S), 1.0)
    same = torch.zeros(B, S, dtype=torch.bool)
    weights, _ = _weights(args, _batch(positions=positions, sample_ids=sample_ids), long,
                          short, same)
    assert ((weights == 4.0).sum(1) == 4).all() and ((weights == 0).sum(1) == 12).all()
    return weights


def test_tie_break_is_seeded_by_seed_iteration_sample_and_position(args):
    base = _tied_selection(args)
    assert torch.equal(_tied_selection(args), base)  # same inputs, same weights
    # another iteration, another seed: the ties fall elsewhere
    assert not torch.equal(_tied_selection(args, iteration=6), base)
    assert not torch.equal(_tied_selection(args, seed=SEED + 1), base)
    # the two rows (same losses) differ by their sample ids only ...
    assert not torch.equal(base[0], base[1])
    # ... and a row's choice follows its sample id, not its row in the micro-batch
    swapped = _tied_selection(args, sample_ids=(9, 3))
    assert torch.equal(swapped, base.flip(0))
    # a token's weight follows its global position, not its index in this rank's tensors
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))
    moved = _tied_selection(args, positions=torch.arange(S)[perm].expand(B, S))
    assert torch.equal(moved, base[:, perm])
