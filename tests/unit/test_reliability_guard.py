"""Non-finite checks and the optimizer-step guard, in one process.

The checks run on real tensors through the real loss function; the guard wraps megatron's own
FP32Optimizer around torch's AdamW, so "skip" is megatron's unsuccessful-update path: the test
compares parameters and optimizer state before and after, element for element.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from megatron_tw.reliability import guard as reliability
from megatron_tw.loss import token_weighted_loss
from megatron_tw.reliability import NonFiniteError, check_finite, count_loss_tokens

pytestmark = pytest.mark.unit


@pytest.fixture
def args(monkeypatch):
    import megatron.training.global_vars as gv

    ns = argparse.Namespace(tw_check_nonfinite=True, tw_nonfinite="stop",
                            tw_nonfinite_max_skips=2, curr_iteration=6,
                            check_for_nan_in_loss_and_grad=True)
    monkeypatch.setattr(gv, "_GLOBAL_ARGS", ns, raising=False)
    reliability.reset_step_record()
    yield ns
    reliability.reset_step_record()


def _bad(n=10, nan=(1, 4), inf=(7,)):
    t = torch.arange(n, dtype=torch.float32)
    t[list(nan)] = float("nan")
    t[list(inf)] = float("inf")
    return t


def test_stop_names_tensor_iteration_rank_and_counts(args):
    with pytest.raises(NonFiniteError) as err:
        check_finite("token weights", _bad())
    msg = str(err.value)
    # curr_iteration 6 = six steps done: megatron logs the step being computed as iteration 7
    assert "non-finite token weights at iteration 7: 2 NaN, 1 Inf of 10 values on rank 0" in msg
    assert "--tw-nonfinite stop" in msg and "--tw-temperature" in msg  # the policy and a cause


def test_finite_tensors_and_disabled_checks_pass(args):
    assert check_finite("loss", torch.randn(5, 3))
    args.tw_check_nonfinite = False
    assert check_finite("loss", _bad())
    assert reliability.reset_step_record() == {}


def test_skip_records_once_per_step_and_only_in_training(args, capsys):
    args.tw_nonfinite = "skip"
    with torch.no_grad():  # evaluation: there is no update to skip
        assert not check_finite("loss", _bad())
    assert reliability.reset_step_record() == {}
    for _ in range(3):  # three micro-batches
        assert not check_finite("short-context losses", _bad(nan=(2,), inf=(3,)))
    found = reliability.reset_step_record()
    assert found == {"short-context losses": "1 NaN, 1 Inf of 10 values on rank 0"}
    assert capsys.readouterr().err.count("non-finite short-context losses at iteration 7") == 1


@pytest.mark.parametrize("case,name", [
    ("long loss in the mask", "loss"),
    ("long loss outside the mask", "loss"),  # NaN * 0 = NaN: the sum is checked too
    ("weights in the mask", "token weights"),
])
def test_loss_function_catches_each_source(args, case, name):
    g = torch.Generator().manual_seed(0)
    out = torch.rand(2, 8, generator=g) * 5
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    weights = torch.rand(2, 8, generator=g)
    if case == "long loss in the mask":
        out[0, 3] = float("nan")
    elif case == "long loss outside the mask":
        out[1, 6] = float("inf")
    else:
        weights[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=f"non-finite {name} at iteration 7"):
        token_weighted_loss(mask, lambda long: (weights, {}), out.requires_grad_())


def test_loss_function_counts_loss_tokens(args):
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    token_weighted_loss(mask, None, torch.rand(2, 3, requires_grad=True))
    token_weighted_loss(mask, None, torch.rand(2, 3, requires_grad=True))
    assert float(reliability._STEP.tokens) == 6.0 and reliability._STEP.counted


# -- the guard on megatron's optimizer ----------------------------------------------------------

@pytest.fixture
def optimizer(args):
    from megatron_tw import runtime

    runtime.prepare()  # megatron's FP32Optimizer allocates on "cuda": redirected on a CPU machine
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    opt = reliability.guard_optimizer(
        FP32Optimizer(inner, OptimizerConfig(lr=0.1, clip_grad=0.0), init_state_fn=None))

    def step(grad_value=None):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5 if grad_value is None else grad_value)
        before = (copy.deepcopy(model.state_dict()), copy.deepcopy(inner.state_dict()))
        ok = opt.step()[0]
        after = (model.state_dict(), inner.state_dict())
        return ok, before, after

    return step


def _same_state(a, b) -> bool:
    (ma, oa), (mb, ob) = a, b
    same_model = all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = oa["state"], ob["state"]
    same_opt = sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) if torch.is_tensor(sa[i][k]) else sa[i][k] == sb[i][k]
        for i in sa for k in sa[i])
    return same_model and same_opt


def test_guard_lets_clean_steps_through(optimizer, args):
    count_loss_tokens(torch.tensor(5))
    ok, before, after = optimizer()
    assert ok and not _same_state(before, after)


@pytest.mark.parametrize("fault", ["recorded weights", "nan gradient", "empty batch"])
def test_guard_skips_the_update_on_any_fault(optimizer, args, fault, capsys):
    args.tw_nonfinite = "skip"
    optimizer()  # one clean step first, so AdamW has momentum that a bad step could apply
    if fault == "recorded weights":
        check_finite("token weights", _bad())
        count_loss_tokens(torch.tensor(5))
        ok, before, after = optimizer()
    elif fault == "nan gradient":
        count_loss_tokens(torch.tensor(5))
        ok, before, after = optimizer(grad_value=float("nan"))
    else:  # every label masked: zero gradients, loss 0/0
        count_loss_tokens(torch.tensor(0))
        ok, before, after = optimizer(grad_value=0.0)
    assert not ok and _same_state(before, after)
    err = capsys.readouterr().err
    assert "skipped iteration 7" in err, err
    count_loss_tokens(torch.tensor(5))
    ok, before, after = optimizer()  # the record was reset: the next clean step updates
    assert ok and not _same_state(before, after)


def test_guard_stops_under_stop_and_after_too_many_skips(optimizer, args):
    count_loss_tokens(torch.tensor(5))
    with pytest.raises(NonFiniteError, match="non-finite gradients at iteration 7"):
        optimizer(grad_value=float("inf"))
    args.tw_nonfinite = "skip"  # max 2 consecutive skips
    for _ in range(2):
        count_loss_tokens(torch.tensor(5))
        assert not optimizer(grad_value=float("nan"))[0]
    count_loss_tokens(torch.tensor(5))
    with pytest.raises(NonFiniteError, match="3 consecutive iterations skipped, more than "
                                             "--tw-nonfinite-max-skips 2"):
        optimizer(grad_value=float("nan"))
