"""The Transformer Engine layer spec computes what the local spec computes: same weights, same
per-token losses and gradients (fp32, one GPU, within TF32-level tolerance).

The local spec is the path every CPU test pins (layouts, weighting, conversion); this ties the TE
path used on GPUs to it.
"""

from __future__ import annotations

import pytest
import torch

from tests.launch import TINY_MODEL

pytestmark = pytest.mark.gpu

# TE fuses the pre-attention and pre-MLP norms into the following linear layer.
FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
VOCAB = 128


def local_name(te_name: str) -> str:
    for fused, plain in FUSED_NORMS.items():
        if te_name.endswith(fused):
            return te_name[: -len(fused)] + plain
    return te_name


def build(impl: str):
    from megatron_tw.checkpoint.megatron_io import build_model, parse_model_args

    args = parse_model_args(TINY_MODEL, ["--transformer-impl", impl])
    return build_model(args, VOCAB, dtype=torch.float32).cuda()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def test_te_spec_matches_local_spec_forward_and_backward():
    from megatron_tw.checkpoint.megatron_io import single_process_megatron

    with single_process_megatron(seed=1234):
        local, te = build("local"), build("transformer_engine")
        local_params = dict(local.named_parameters())
        te_params = dict(te.named_parameters())
        used = set()
        with torch.no_grad():
            for name, p in te_params.items():
                src = local_name(name)
                assert src in local_params, f"TE parameter {name} has no local counterpart"
                assert p.shape == local_params[src].shape, name
                p.copy_(local_params[src])
                used.add(src)
        assert used == set(local_params), f"local parameters left unused: {set(local_params) - used}"

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (2, 64), generator=g).cuda()
        labels = torch.roll(tokens, -1, dims=1)
        positions = torch.arange(64, device="cuda").expand(2, -1)

        losses = {}
        for name, model in (("local", local), ("te", te)):
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, None, labels=labels)  # [b, s] per-token losses
            loss.float().sum().backward()
            losses[name] = loss.detach().float()
        assert torch.isfinite(losses["te"]).all()
        torch.testing.assert_close(losses["te"], losses["local"], rtol=1e-3, atol=5e-3)

        for name, p in te_params.items():
            want = local_params[local_name(name)].grad
            assert p.grad is not None, name
            assert relative_error(p.grad, want) < 2e-2, name
