"""Which Hugging Face architectures convert, and what Megatron flags describe them.

Every supported model is a Llama-family decoder: pre-norm RMSNorm, rotary position embeddings
(rotate-half layout, megatron's non-interleaved RoPE), SwiGLU MLP, grouped-query attention, no
linear biases except optional q/k/v biases. ``HFModelSpec`` is the one normalised description the
rest of the package works from; a new architecture registers a ``Family`` in ``FAMILIES``.

Why a compact mapping of our own instead of Megatron-Bridge (PyPI ``megatron-bridge``, the upstream
converter): megatron-bridge 0.6.2 pins ``transformers>=5.8,<=5.12.1`` (pip reports
"ResolutionImpossible" next to the project's transformers 5.24), ``import megatron.bridge`` fails
under transformers 5.24 (``ModuleNotFoundError: transformers.modeling_attn_mask_utils``), and it
depends on ``megatron-core[dev]``, which pulls CUDA-only builds (flashinfer, fast-hadamard-transform,
Transformer Engine recipes) that a CPU machine cannot install. The Llama family needs four tensor
rules (below and in ``layout.py``); owning them keeps the project on its pinned versions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor/field and the fix."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What distinguishes one HF architecture of the Llama family."""

    name: str
    qkv_bias: bool                      # q/k/v projections carry biases (Qwen2)
    # config fields that must hold for the conversion to be exact: field -> (allowed values, why)
    requirements: tuple[tuple[str, tuple, str], ...] = ()


_NO_LINEAR_BIAS = (
    ("attention_bias", (False, None), "megatron's --add-qkv-bias has no o_proj bias; "
     "biased o_proj is not supported"),
    ("mlp_bias", (False, None), "MLP biases are not supported (megatron --disable-bias-linear)"),
)

# HF ``architectures[0]`` -> Family. Register a new Llama-like architecture here.
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", qkv_bias=False, requirements=_NO_LINEAR_BIAS),
    "MistralForCausalLM": Family("mistral", qkv_bias=False),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class HFModelSpec:
    """A Llama-family model's shape, read once from its HF config.

    ``vocab_size`` is the HF embedding's row count; megatron pads it up to ``padded_vocab_size``.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float]  # llama3-style rope scaling (Llama 3.1/3.2), else None
    tied_embeddings: bool
    qkv_bias: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _get(config: Any, name: str, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _required_int(config: Any, name: str) -> int:
    value = _get(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConversionError(f"config field {name}={value!r}: an integer is required "
                              "(add it to config.json)")
    return int(value)


def rope_parameters(config: Any) -> dict:
    """``rope_theta`` and scaling, from transformers 5.x ``rope_parameters`` or 4.x fields."""
    params = dict(_get(config, "rope_parameters") or {})
    if "rope_theta" not in params and _get(config, "rope_theta") is not None:
        params["rope_theta"] = _get(config, "rope_theta")
    scaling = _get(config, "rope_scaling")
    if scaling and "rope_type" not in params:
        params.update(scaling)
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


# megatron's RotaryEmbedding._apply_scaling hard-codes these llama3 constants; only the factor is
# a flag (--rope-scaling-factor).
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


def architecture_of(config: Any) -> str:
    archs = _get(config, "architectures") or []
    if archs:
        return archs[0]
    model_type = _get(config, "model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ConversionError(f"model_type {model_type!r} (no 'architectures' in the config) is not "
                          f"supported; supported: {', '.join(FAMILIES)}")


def spec_from_hf_config(config: Any) -> HFModelSpec:
    """Validate an HF config (``PretrainedConfig`` or its dict) and normalise it.

    Raises ConversionError naming the config field when the model is not exactly representable.
    """
    arch = architecture_of(config)
    if arch not in FAMILIES:
        raise ConversionError(f"architecture {arch!r} is not supported; supported: "
                              f"{', '.join(FAMILIES)} (register a Family in "
                              "megatron_tw/checkpoint/families.py to add one)")
    family = FAMILIES[arch]
    for field, allowed, why in family.requirements:
        if _get(config, field) not in allowed:
            raise ConversionError(f"config field {field}={_get(config, field)!r}: {why}")
    act = _get(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"config field hidden_act={act!r}: only SwiGLU (silu) MLPs convert")
    window = _get(config, "sliding_window")
    uses_window = _get(config, "use_sliding_window", arch == "MistralForCausalLM")
    if window is not None and uses_window:
        raise ConversionError(
            f"config field sliding_window={window}: megatron attends over the whole causal context, "
            "so logits would differ beyond the window. Set sliding_window to null in config.json "
            "(as Mistral v0.2+ does) if full attention is intended")
    hidden = _required_int(config, "hidden_size")
    heads = _required_int(config, "num_attention_heads")
    kv_heads = int(_get(config, "num_key_value_heads") or heads)
    if heads <= 0 or kv_heads <= 0:
        raise ConversionError(f"config fields num_attention_heads={heads}, num_key_value_heads="
                              f"{kv_heads}: must be positive")
    if hidden % heads and _get(config, "head_dim") is None:
        raise ConversionError(f"config field hidden_size={hidden} is not divisible by "
                              f"num_attention_heads={heads} and no head_dim is given; fix one of "
                              "them (the head size is hidden_size / num_attention_heads)")
    if heads % kv_heads:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    rope = rope_parameters(config)
    factor = None
    if rope["rope_type"] == "llama3":
        for key, value in _MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                raise ConversionError(
                    f"rope_scaling {key}={rope.get(key)}: megatron's llama3 rope scaling fixes "
                    f"{key}={value}; only the factor is configurable (--rope-scaling-factor)")
        factor = float(rope["factor"])
    elif rope["rope_type"] != "default":
        raise ConversionError(f"rope_scaling type {rope['rope_type']!r} is not supported "
                              "(supported: none, llama3)")
    return HFModelSpec(
        architecture=arch,
        num_layers=_required_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_required_int(config, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_get(config, "head_dim") or hidden // heads),
        vocab_size=_required_int(config, "vocab_size"),
        max_position_embeddings=_required_int(config, "max_position_embeddings"),
        norm_eps=float(_get(config, "rms_norm_eps")),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=factor,
        tied_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
    )


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """megatron's padding rule: the next multiple of ``divisible_by * tensor_parallel_size``."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def megatron_args_from_hf_config(config: Any, *, rotary_base: Optional[float] = None,
                                 make_vocab_size_divisible_by: int = 128) -> list[str]:
    """The Megatron model flags that build this HF model's architecture.

    ``rotary_base`` overrides the HF ``rope_theta`` (context extension). Training flags (sequence
    length, batch sizes, parallel layout, tokenizer) are the user's; the vocabulary padding is
    ``--make-vocab-size-divisible-by`` (the padded rows are zero on import, dropped on export).
    """
    spec = config if isinstance(config, HFModelSpec) else spec_from_hf_config(config)
    base = spec.rope_theta if rotary_base is None else rotary_base
    if not float(base).is_integer():
        raise ConversionError(f"rope_theta {base} is not an integer; megatron's --rotary-base is "
                              "an integer flag: pass an integer --rotary-base")
    flags = [
        "--num-layers", str(spec.num_layers),
        "--hidden-size", str(spec.hidden_size),
        "--ffn-hidden-size", str(spec.ffn_hidden_size),
        "--num-attention-heads", str(spec.num_heads),
        "--group-query-attention", "--num-query-groups", str(spec.num_kv_heads),
        "--kv-channels", str(spec.head_dim),
        "--max-position-embeddings", str(spec.max_position_embeddings),
        "--position-embedding-type", "rope",
        "--rotary-base", _number(base),
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(spec.norm_eps),
        "--swiglu",
        "--disable-bias-linear",
        "--attention-softmax-in-fp32",
        "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by),
    ]
    if spec.qkv_bias:
        flags.append("--add-qkv-bias")
    if not spec.tied_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if spec.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", _number(spec.rope_scaling_factor)]
    return flags


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def with_rope_theta(config: Any, rope_theta: float, max_position_embeddings: Optional[int] = None):
    """A copy of an HF ``PretrainedConfig`` with a new RoPE base (and context length)."""
    import copy

    config = copy.deepcopy(config)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(rope_theta)
    if hasattr(config, "rope_theta"):
        config.rope_theta = float(rope_theta)
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    return config
