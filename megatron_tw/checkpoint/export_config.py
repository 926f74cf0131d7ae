"""The Hugging Face config of a megatron checkpoint, built from the arguments the run saved.

A run's checkpoint holds its argument namespace; every architectural flag the export can
represent maps to one HF field, and every flag it cannot is refused, naming it:

| megatron flag | HF field(s) |
|---|---|
| --num-layers, --hidden-size, --ffn-hidden-size | num_hidden_layers, hidden_size, intermediate_size |
| --num-attention-heads, --num-query-groups, --kv-channels | num_attention_heads, num_key_value_heads, head_dim |
| --norm-epsilon | rms_norm_eps |
| --rotary-base | rope_theta |
| --use-rope-scaling --rope-scaling-factor F | rope_scaling llama3 (factor F; megatron fixes the other constants) |
| --rotary-seq-len-interpolation-factor F | rope_scaling linear (factor F) |
| --untie-embeddings-and-output-weights | tie_word_embeddings = false |
| --seq-length / --max-position-embeddings | max_position_embeddings (the larger) |
| --add-qkv-bias | Qwen2 (q/k/v biases) |

Refused: --rotary-percent below 1 (partial RoPE), llama3 scaling together with an interpolation
factor, LayerNorm, non-SwiGLU MLPs, linear biases beyond q/k/v, learned or no position
embeddings, mixture of experts, multi-latent attention.

Every reader gets the same RoPE: transformers 5 reads ``rope_parameters``; transformers 4.x
reads ``rope_theta`` and ``rope_scaling`` (and ``torch_dtype``), and falls back to a base of
10000 without them, so both spellings are written.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_tw.checkpoint.families import ConversionError

# megatron's RotaryEmbedding._apply_scaling constants for llama3 scaling (only the factor is a flag)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _refuse(flag: str, why: str) -> None:
    raise ConversionError(f"the checkpoint trained with {flag}: {why}; a Hugging Face Llama-family "
                          "config cannot represent it, so the export would compute another model")


def rope_fields(args) -> dict:
    """rope_theta and the scaling, as one ``rope_parameters`` dict (transformers 5 spelling)."""
    params = {"rope_theta": float(getattr(args, "rotary_base", 10000)), "rope_type": "default"}
    percent = float(getattr(args, "rotary_percent", 1.0) or 1.0)
    if percent != 1.0:
        _refuse(f"--rotary-percent {percent}", "RoPE on part of each head")
    interpolation = getattr(args, "rotary_seq_len_interpolation_factor", None)
    if getattr(args, "use_rope_scaling", False):
        if interpolation:
            _refuse("--use-rope-scaling with --rotary-seq-len-interpolation-factor",
                    "two RoPE scalings at once")
        params.update(rope_type="llama3", factor=float(args.rope_scaling_factor), **LLAMA3_ROPE)
    elif interpolation:
        params.update(rope_type="linear", factor=float(interpolation))
    return params


def hf_config_dict(args, *, vocab_size: int, dtype: str,
                   template: Optional[dict] = None) -> dict:
    """The config.json contents for a checkpoint saved with ``args``.

    vocab_size: the tokenizer's vocabulary (the embedding's padding rows are dropped).
    dtype: the weights' dtype name ("bfloat16", ...).
    template: an HF config dict whose token ids (bos/eos/pad) and architecture name are kept;
        every architectural field comes from ``args``.
    """
    template = dict(template or {})
    checks = (
        ("position_embedding_type", lambda v: v == "rope",
         "--position-embedding-type other than rope"),
        ("normalization", lambda v: v == "RMSNorm", "--normalization other than RMSNorm"),
        ("swiglu", bool, "an MLP without --swiglu"),
        ("add_bias_linear", lambda v: not v, "linear biases (no --disable-bias-linear)"),
        ("num_experts", lambda v: not v, "--num-experts (mixture of experts)"),
        ("multi_latent_attention", lambda v: not v, "--multi-latent-attention"),
        ("qk_layernorm", lambda v: not v, "--qk-layernorm"),
    )
    for name, ok, flag in checks:
        if hasattr(args, name) and not ok(getattr(args, name)):
            _refuse(flag, "not a Llama-family layer")
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    head_dim = int(getattr(args, "kv_channels", None) or args.hidden_size // heads)
    qkv_bias = bool(getattr(args, "add_qkv_bias", False))
    architecture = "Qwen2ForCausalLM" if qkv_bias else (
        (template.get("architectures") or ["LlamaForCausalLM"])[0])
    if qkv_bias and architecture != "Qwen2ForCausalLM":
        _refuse("--add-qkv-bias", "q/k/v biases exist in Qwen2 only")
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2"}.get(architecture)
    if model_type is None:
        raise ConversionError(f"template architecture {architecture!r} is not supported")
    rope = rope_fields(args)
    context = max(int(getattr(args, "seq_length", 0) or 0),
                  int(getattr(args, "max_position_embeddings", 0) or 0))
    config = {
        "architectures": [architecture], "model_type": model_type,
        "num_hidden_layers": int(args.num_layers), "hidden_size": int(args.hidden_size),
        "intermediate_size": int(args.ffn_hidden_size), "num_attention_heads": heads,
        "num_key_value_heads": groups, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": float(getattr(args, "layernorm_epsilon", 1e-5)),  # --norm-epsilon
        "vocab_size": int(vocab_size), "max_position_embeddings": context,
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "rope_parameters": rope,
        # the transformers 4.x spelling of the same RoPE and dtype (read by lm-eval's [hf] extra)
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": dtype, "torch_dtype": dtype,
        "attention_dropout": 0.0, "initializer_range": float(getattr(args, "init_method_std",
                                                                     0.02)),
        "use_cache": True,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if model_type in ("mistral", "qwen2"):
        config.update(sliding_window=None, use_sliding_window=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in template:
            config[key] = template[key]
    return config


def legacy_rope_frequencies(config: dict, head_dim: int):
    """RoPE inverse frequencies [head_dim / 2] as transformers 4.x computes them from
    ``rope_theta`` and ``rope_scaling`` alone (written out from its llama3 / linear rules, for
    checking what a 4.x reader gets; 4.x ignores ``rope_parameters``)."""
    import math

    import torch

    base = float(config.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling: Any = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor",
                                                          "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        out = []
        for f in inv.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return torch.tensor(out, dtype=torch.float64)
    return inv
