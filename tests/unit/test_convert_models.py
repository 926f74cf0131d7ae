"""HF model -> megatron GPTModel in one process: logits equal HF's and a float64 reference written
here from the Llama formulas; HF -> megatron -> HF is exact; bad inputs are named errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tw.checkpoint import megatron_io
from megatron_tw.checkpoint.families import (
    ConversionError,
    megatron_args_from_hf_config,
    padded_vocab_size,
    spec_from_hf_config,
)
from megatron_tw.checkpoint.hf import load_hf_into_megatron, megatron_state_to_hf, unsharded_state_dict
from tests.distributed.convert_cases import CASES, VOCAB_DIVISOR, make_hf_model, sample_tokens

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    with megatron_io.single_process_megatron():
        yield


def build_megatron(config, *, extra=(), rotary_base=None):
    flags = megatron_args_from_hf_config(config, rotary_base=rotary_base,
                                         make_vocab_size_divisible_by=VOCAB_DIVISOR)
    args = megatron_io.parse_model_args(flags, extra)
    padded = padded_vocab_size(config.vocab_size, VOCAB_DIVISOR)
    return megatron_io.build_model(args, padded).eval()


def megatron_logits(model, tokens, vocab):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)[..., :vocab]


def reference_logits(state, config, tokens, interpolation=1.0):
    """Llama-family forward in float64 from the formulas (RMSNorm, rotate-half RoPE with optional
    llama3 frequency scaling or linear position interpolation (positions / ``interpolation``),
    causal grouped-query attention, SwiGLU), on HF-named weights."""
    sd = {k: v.double() for k, v in state.items()}
    spec = spec_from_hf_config(config)
    nh, ng, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    b, s = tokens.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * w

    inv = spec.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if spec.rope_scaling_factor:  # Llama 3.1: long wavelengths / factor, smooth in between
        wl = 2 * math.pi / inv
        smooth = ((8192 / wl - 1) / 3).clamp(0, 1)
        inv = (1 - smooth) * inv / spec.rope_scaling_factor + smooth * inv
    angles = (torch.arange(s, dtype=torch.float64) / interpolation)[:, None] * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # x [b, heads, s, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def proj(x, name):
        bias = sd.get(name + ".bias")
        return x @ sd[name + ".weight"].T + (bias if bias is not None else 0)

    x = sd["model.embed_tokens.weight"][tokens]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        hn = rms(x, sd[p + "input_layernorm.weight"])
        q = rope(proj(hn, p + "self_attn.q_proj").view(b, s, nh, d).transpose(1, 2))
        k = rope(proj(hn, p + "self_attn.k_proj").view(b, s, ng, d).transpose(1, 2))
        v = proj(hn, p + "self_attn.v_proj").view(b, s, ng, d).transpose(1, 2)
        k, v = (t.repeat_interleave(nh // ng, dim=1) for t in (k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * d)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        hn = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = hn @ sd[p + "mlp.gate_proj.weight"].T, hn @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["model.embed_tokens.weight"] if spec.tied_embeddings else sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_and_reference(case):
    hf = make_hf_model(case)
    model = build_megatron(hf.config)
    load_hf_into_megatron(model, hf.state_dict(), hf.config)
    tokens = sample_tokens(hf.config.vocab_size)
    ref = reference_logits(hf.state_dict(), hf.config, tokens)
    with torch.no_grad():
        hf_logits = hf(tokens).logits.double()
    ours = megatron_logits(model, tokens, hf.config.vocab_size).double()
    torch.testing.assert_close(hf_logits, ref, rtol=0, atol=1e-4)   # the reference is right
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert (ours - ref).abs().max() < 1e-4 and ref.std() > 0.1


def test_position_interpolation_factor_divides_the_positions():
    """--rotary-seq-len-interpolation-factor 4 reaches the model: its logits equal the float64
    reference at positions / 4 (and differ from the ones at unscaled positions)."""
    hf = make_hf_model("llama-gqa2-tied")
    model = build_megatron(hf.config, extra=("--rotary-seq-len-interpolation-factor", "4"))
    load_hf_into_megatron(model, hf.state_dict(), hf.config)
    tokens = sample_tokens(hf.config.vocab_size)
    ref = reference_logits(hf.state_dict(), hf.config, tokens, interpolation=4.0)
    ours = megatron_logits(model, tokens, hf.config.vocab_size).double()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    plain = reference_logits(hf.state_dict(), hf.config, tokens)
    assert (plain - ref).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(case):
    hf = make_hf_model(case)
    model = build_megatron(hf.config)
    load_hf_into_megatron(model, hf.state_dict(), hf.config)
    back = megatron_state_to_hf(unsharded_state_dict(model), hf.config)
    want = {k: v for k, v in hf.state_dict().items()
            if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert set(back) == set(want)
    for name, tensor in want.items():
        assert torch.equal(back[name], tensor), name


def test_padded_vocabulary_rows_are_zero():
    hf = make_hf_model("qwen2-bias-gqa4-vocab100")
    model = build_megatron(hf.config)
    load_hf_into_megatron(model, hf.state_dict(), hf.config)
    emb, out = model.embedding.word_embeddings.weight, model.output_layer.weight
    assert emb.shape[0] == out.shape[0] == 128
    assert torch.equal(emb[:100], hf.model.embed_tokens.weight)
    assert not emb[100:].any() and not out[100:].any()


def test_missing_tensor_is_named():
    hf = make_hf_model("llama-gqa2-tied")
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_into_megatron(build_megatron(hf.config), state, hf.config)


def test_shape_mismatch_is_named():
    hf = make_hf_model("llama-mha-untied")
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(32, 64\)"):
        load_hf_into_megatron(build_megatron(hf.config), state, hf.config)


def test_model_built_without_qkv_bias_is_refused():
    hf = make_hf_model("qwen2-bias-gqa2-tied")
    flags = [f for f in megatron_args_from_hf_config(hf.config, make_vocab_size_divisible_by=32)
             if f != "--add-qkv-bias"]
    model = megatron_io.build_model(megatron_io.parse_model_args(flags), 128)
    with pytest.raises(ConversionError, match="q_proj.bias"):
        load_hf_into_megatron(model, hf.state_dict(), hf.config)


def test_rotary_base_override():
    """A model built with a larger --rotary-base is refused unless the override is declared;
    then its logits equal HF's with the same rope_theta."""
    hf = make_hf_model("llama-gqa2-tied")
    model = build_megatron(hf.config, rotary_base=40000)
    with pytest.raises(ConversionError, match="rope_theta=10000"):
        load_hf_into_megatron(model, hf.state_dict(), hf.config)
    load_hf_into_megatron(model, hf.state_dict(), hf.config, rotary_base=40000)
    hf.config.rope_parameters["rope_theta"] = 40000.0
    hf40 = type(hf)(hf.config).eval()
    hf40.load_state_dict(hf.state_dict())
    tokens = sample_tokens(128)
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(model, tokens, 128), hf40(tokens).logits,
                                   rtol=0, atol=1e-4)
        assert (hf40(tokens).logits - hf(tokens).logits).abs().max() > 1e-3
