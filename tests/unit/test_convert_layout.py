"""HF <-> megatron tensor rules, checked against references written here from the definitions
(megatron's fused q/k/v layout, SwiGLU TP shards, vocabulary padding, RoPE frequencies) and the
config validation errors."""

import pytest
import torch

from megatron_tw.checkpoint.families import (
    ConversionError,
    megatron_args_from_hf_config,
    padded_vocab_size,
    spec_from_hf_config,
)
from megatron_tw.checkpoint.hf import expected_inv_freq
from megatron_tw.checkpoint.layout import fuse_qkv, split_qkv
from megatron_tw.checkpoint.sharding import tp_shard
from tests.distributed.convert_cases import CASES, make_config

pytestmark = pytest.mark.unit


def reference_fused_qkv(q, k, v, groups):
    """Rows of megatron's linear_qkv: for each query group g, its Q/G query heads, then k_g, v_g
    (SelfAttention.get_query_key_value_tensors: view [.., G, (Q/G + 2) d], split [Q/G d, d, d])."""
    d = k.shape[0] // groups
    per = q.shape[0] // d // groups
    rows = []
    for g in range(groups):
        rows += [q[g * per * d:(g + 1) * per * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("with_hidden", [True, False], ids=["weight", "bias"])
def test_fused_qkv_layout_and_inverse(heads, groups, with_hidden):
    d, h = 6, 10
    shape = (lambda n: (n, h)) if with_hidden else (lambda n: (n,))
    q, k, v = (torch.randn(*shape(n * d)) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, groups)
    assert torch.equal(fused, reference_fused_qkv(q, k, v, groups))
    q2, k2, v2 = split_qkv(fused, heads, groups, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_megatron_query_split_recovers_hf_heads():
    """Project with the fused weight, then split as megatron does: each query head must see its
    own HF q rows and its group's k/v rows."""
    heads, groups, d, h = 8, 2, 4, 12
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    x = torch.randn(5, h)
    mixed = x @ fuse_qkv(q, k, v, groups).T                        # [s, G*(Q/G+2)*d]
    mixed = mixed.view(5, groups, (heads // groups + 2) * d)
    mq, mk, mv = torch.split(mixed, [heads // groups * d, d, d], dim=-1)
    torch.testing.assert_close(mq.reshape(5, heads, d), (x @ q.T).view(5, heads, d))
    torch.testing.assert_close(mk.reshape(5, groups, d), (x @ k.T).view(5, groups, d))
    torch.testing.assert_close(mv.reshape(5, groups, d), (x @ v.T).view(5, groups, d))


def test_tp_shards():
    f, h = 6, 4
    gate, up = torch.randn(f, h), torch.randn(f, h)
    fc1 = torch.cat([gate, up])
    for r in range(2):
        # each rank: [its gate rows; its up rows] (ColumnParallelLinear of 2f/TP rows, chunk(2))
        want = torch.cat([gate[r * 3:(r + 1) * 3], up[r * 3:(r + 1) * 3]])
        assert torch.equal(tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, r, 2), want)
        proj = torch.randn(h, 8)
        assert torch.equal(tp_shard("decoder.layers.3.self_attention.linear_proj.weight", proj, r, 2),
                           proj[:, r * 4:(r + 1) * 4])
        emb = torch.randn(16, h)
        assert torch.equal(tp_shard("embedding.word_embeddings.weight", emb, r, 2), emb[r * 8:(r + 1) * 8])
        norm = torch.randn(h)
        assert tp_shard("decoder.layers.1.input_layernorm.weight", norm, r, 2) is norm
    with pytest.raises(ConversionError, match="linear_qkv.weight"):
        tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", torch.randn(6, 2), 0, 4)


@pytest.mark.parametrize("vocab", [96, 100, 128, 32000, 49152, 128256, 151936, 32001])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_matches_megatron(vocab, tp):
    from argparse import Namespace

    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    args = Namespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, rank=1)
    assert padded_vocab_size(vocab, 128, tp) == vocab_size_with_padding(vocab, args, False)


@pytest.mark.parametrize("case", ["llama-mha-untied", "llama31-rope-scaling"])
def test_rope_frequencies_match_transformers(case):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = make_config(case)
    hf_inv = LlamaRotaryEmbedding(config).inv_freq.double()
    torch.testing.assert_close(expected_inv_freq(spec_from_hf_config(config)), hf_inv,
                               rtol=1e-6, atol=0)


def test_flags_describe_each_case():
    for case in CASES:
        config = make_config(case)
        flags = megatron_args_from_hf_config(config)
        value = lambda flag: flags[flags.index(flag) + 1]  # noqa: E731
        assert value("--num-query-groups") == str(config.num_key_value_heads)
        assert value("--kv-channels") == str(getattr(config, "head_dim", None)
                                             or config.hidden_size // config.num_attention_heads)
        assert ("--add-qkv-bias" in flags) == case.startswith("qwen2")
        assert ("--untie-embeddings-and-output-weights" in flags) != config.tie_word_embeddings
        assert ("--use-rope-scaling" in flags) == ("rope-scaling" in case)
    flags = megatron_args_from_hf_config(make_config("llama-gqa2-tied"), rotary_base=15_300_000)
    assert flags[flags.index("--rotary-base") + 1] == "15300000"


@pytest.mark.parametrize("change,needle", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     "low_freq_factor"),
], ids=["architecture", "o_proj-bias", "activation", "yarn", "llama3-constants"])
def test_unsupported_configs_are_named(change, needle):
    config = make_config("llama-mha-untied").to_dict()
    config.update(change)
    if "rope_scaling" in change:
        config["rope_parameters"] = {"rope_theta": 10000.0, **change["rope_scaling"]}
    with pytest.raises(ConversionError, match=needle):
        spec_from_hf_config(config)


def test_mistral_sliding_window_is_refused():
    from transformers import MistralConfig

    with pytest.raises(ConversionError, match="sliding_window=4096"):
        spec_from_hf_config(MistralConfig(sliding_window=4096))
