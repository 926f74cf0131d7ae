"""The loss function: uniform is megatron's stock per-token loss bit for bit; a weighted loss is
sum(w * mask * loss) with megatron's (loss_sum, num_tokens, report) contract."""

import pytest
import torch

from megatron_tw.loss import token_weighted_loss

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _args(monkeypatch):
    import argparse

    import megatron.training.global_vars as gv

    monkeypatch.setattr(gv, "_GLOBAL_ARGS", argparse.Namespace(
        check_for_nan_in_loss_and_grad=False, curr_iteration=0), raising=False)


def _stock_pretrain_gpt_loss(loss_mask, output_tensor):
    """megatron's pretrain_gpt loss_func, as written upstream (per-token mode)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def test_uniform_is_the_stock_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    out = torch.rand(3, 17, generator=g, dtype=torch.float32) * 9
    mask = (torch.rand(3, 17, generator=g) > 0.3).float()
    ours = token_weighted_loss(mask, None, out)
    stock = _stock_pretrain_gpt_loss(mask, out)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    assert torch.equal(ours[2]["lm loss"], stock[2]["lm loss"])


def test_weighted_loss_is_weighted_sum_over_mask():
    g = torch.Generator().manual_seed(1)
    out = torch.rand(2, 9, generator=g, requires_grad=True)
    mask = (torch.rand(2, 9, generator=g) > 0.4).float()
    w = torch.rand(2, 9, generator=g) * 3
    loss, n, report = token_weighted_loss(mask, lambda long: (w, {"x": torch.tensor([1.0, 2.0])}),
                                          out)
    want = (w.double() * mask.double() * out.detach().double()).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert int(n) == int(mask.sum())
    assert report["weighted loss"][0].item() == pytest.approx(want.item(), rel=1e-6)
    assert report["lm loss"][0].item() == pytest.approx((mask * out.detach()).sum().item(), rel=1e-6)
    loss.backward()  # gradients flow through the losses, never through the weights
    assert torch.allclose(out.grad, w * mask)
