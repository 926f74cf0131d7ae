"""Tensor-for-tensor mapping between HF Llama-family weights and megatron's GPTModel weights.

Megatron names here are those of an unsharded (TP=1, PP=1) model with megatron's local layer spec
and *global* layer indices (``decoder.layers.{i}.``). Sharding over TP and the layer offset of a
pipeline stage are applied on top of these names in ``sharding.py``.

The four non-trivial rules:
- q/k/v: megatron fuses them into one ``linear_qkv`` whose output rows are grouped by KV head:
  for each of the G query groups, the group's Q heads, then its K head, then its V head
  (``SelfAttention.get_query_key_value_tensors`` views the output as [.., G, (Q/G + 2) * d] and
  splits it as [Q/G * d, d, d]). HF keeps q_proj [Q*d, h], k_proj [G*d, h], v_proj [G*d, h].
- SwiGLU: megatron's ``linear_fc1`` is cat(gate, up) [2f, h]; ``chunk(2)`` gives (gate, up).
- vocabulary: megatron pads the embedding and output rows to a multiple of
  ``--make-vocab-size-divisible-by`` x TP; padded rows are zero on import and dropped on export.
- tied embeddings: HF omits ``lm_head.weight``; megatron has no ``output_layer.weight`` at TP=PP=1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch

from megatron_tw.checkpoint.families import ConversionError, HFModelSpec

Tensor = torch.Tensor


# ---------------------------------------------------------------- pure tensor transforms
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_kv_heads: int) -> Tensor:
    """HF q [Q*d, ...], k [G*d, ...], v [G*d, ...] -> megatron linear_qkv [G*(Q/G+2)*d, ...].

    Works for weights ([*, h]) and biases ([*]).
    """
    rest = q.shape[1:]
    head_dim = k.shape[0] // num_kv_heads
    q = q.reshape(num_kv_heads, -1, head_dim, *rest)       # [G, Q/G, d, ...]
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)        # [G, 1, d, ...]
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of :func:`fuse_qkv`: megatron linear_qkv -> (q, k, v) in HF layout."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_kv_heads
    grouped = qkv.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
    return (q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest))


def pad_vocab(weight: Tensor, padded_size: int) -> Tensor:
    """[V, h] -> [padded_size, h] with zero rows appended."""
    if weight.shape[0] > padded_size:
        raise ConversionError(f"vocabulary of {weight.shape[0]} rows does not fit the model's "
                              f"padded vocabulary of {padded_size} rows")
    if weight.shape[0] == padded_size:
        return weight
    pad = weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


# ---------------------------------------------------------------- name rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensors it is made of. Templates take ``{i}`` (layer)."""

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[..., Tensor]          # (spec, padded_vocab, *hf tensors) -> tensor
    to_hf: Callable[..., tuple[Tensor, ...]]    # (spec, tensor) -> hf tensors
    per_layer: bool = True
    when: Callable[[HFModelSpec], bool] = lambda spec: True


def _same(spec, padded, t):
    return t


def _same_back(spec, t):
    return (t,)


def _vocab(spec, padded, t):
    return pad_vocab(t, padded)


def _vocab_back(spec, t):
    return (t[: spec.vocab_size],)


def _qkv(spec, padded, q, k, v):
    return fuse_qkv(q, k, v, spec.num_kv_heads)


def _qkv_back(spec, t):
    return split_qkv(t, spec.num_heads, spec.num_kv_heads, spec.head_dim)


def _fc1(spec, padded, gate, up):
    return torch.cat([gate, up], dim=0)


def _fc1_back(spec, t):
    return tuple(torch.chunk(t, 2, dim=0))


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _vocab, _vocab_back,
         per_layer=False),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         _same, _same_back),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"), _qkv, _qkv_back),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
         (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"), _qkv, _qkv_back,
         when=lambda spec: spec.qkv_bias),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",),
         _same, _same_back),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), _same, _same_back),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight", (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"),
         _fc1, _fc1_back),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), _same, _same_back),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _same, _same_back, per_layer=False),
    Rule("output_layer.weight", ("lm_head.weight",), _vocab, _vocab_back, per_layer=False,
         when=lambda spec: not spec.tied_embeddings),
)

# HF tensors that carry no weights (recomputed buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _layers(rule: Rule, spec: HFModelSpec) -> Iterable:
    return range(spec.num_layers) if rule.per_layer else (None,)


def expected_megatron_names(spec: HFModelSpec) -> dict[str, tuple[Rule, object]]:
    """megatron name -> (rule, layer) for every tensor of the unsharded model."""
    names = {}
    for rule in RULES:
        if rule.when(spec):
            for layer in _layers(rule, spec):
                names[rule.megatron.format(i=layer)] = (rule, layer)
    return names


def expected_hf_names(spec: HFModelSpec) -> list[str]:
    return [name.format(i=layer) for rule in RULES if rule.when(spec)
            for layer in _layers(rule, spec) for name in rule.hf]


class MegatronFromHF:
    """Builds unsharded megatron tensors on demand from an HF tensor source.

    ``source`` is any mapping HF name -> tensor (a dict, or a lazy safetensors reader). Each
    megatron tensor is built when asked, so a pipeline stage reads only its own layers.
    """

    def __init__(self, source: Mapping[str, Tensor], spec: HFModelSpec, padded_vocab_size: int):
        self.source = source
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size
        self.names = expected_megatron_names(spec)
        self.used_hf: set[str] = set()

    def _hf(self, name: str) -> Tensor:
        if name not in self.source:
            raise ConversionError(f"HF checkpoint has no tensor {name!r} (needed for "
                                  f"{self.spec.architecture} with {self.spec.num_layers} layers)")
        self.used_hf.add(name)
        return self.source[name]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise ConversionError(f"megatron tensor {name!r} has no HF counterpart for "
                                  f"{self.spec.architecture} (is the model built with the flags "
                                  "from megatron_args_from_hf_config?)")
        rule, layer = self.names[name]
        tensors = []
        for template in rule.hf:
            hf_name = template.format(i=layer)
            tensors.append(self._hf(hf_name))
            check_shape(hf_name, tensors[-1], self.expected_hf_shape(hf_name))
        tensor = rule.to_megatron(self.spec, self.padded_vocab_size, *tensors)
        check_shape(name, tensor, self.expected_shape(name))
        return tensor

    def expected_shape(self, name: str) -> tuple[int, ...]:
        s, h = self.spec, self.spec.hidden_size
        qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        suffix = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
        shapes = {
            "embedding.word_embeddings.weight": (self.padded_vocab_size, h),
            "output_layer.weight": (self.padded_vocab_size, h),
            "decoder.final_layernorm.weight": (h,),
            "input_layernorm.weight": (h,),
            "pre_mlp_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": (qkv_rows, h),
            "self_attention.linear_qkv.bias": (qkv_rows,),
            "self_attention.linear_proj.weight": (h, s.num_heads * s.head_dim),
            "mlp.linear_fc1.weight": (2 * s.ffn_hidden_size, h),
            "mlp.linear_fc2.weight": (h, s.ffn_hidden_size),
        }
        return shapes[suffix]

    def expected_hf_shape(self, hf_name: str) -> tuple[int, ...]:
        s, h = self.spec, self.spec.hidden_size
        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
        shapes = {
            "model.embed_tokens.weight": (s.vocab_size, h), "lm_head.weight": (s.vocab_size, h),
            "model.norm.weight": (h,), "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h), "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.weight": (kv_rows, h), "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.weight": (kv_rows, h), "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.o_proj.weight": (h, q_rows),
            "mlp.gate_proj.weight": (s.ffn_hidden_size, h), "mlp.up_proj.weight": (s.ffn_hidden_size, h),
            "mlp.down_proj.weight": (h, s.ffn_hidden_size),
        }
        return shapes[suffix]

    def unused_hf_names(self) -> list[str]:
        return sorted(n for n in self.source if n not in self.used_hf
                      and not n.endswith(IGNORED_HF_SUFFIXES)
                      and not (n == "lm_head.weight" and self.spec.tied_embeddings))


def check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(expected)} from the model configuration")


def hf_to_megatron_state(source: Mapping[str, Tensor], spec: HFModelSpec,
                         padded_vocab_size: int) -> dict[str, Tensor]:
    """The whole unsharded megatron state dict (global layer names) from HF tensors."""
    build = MegatronFromHF(source, spec, padded_vocab_size)
    state = {name: build[name] for name in build.names}
    unused = build.unused_hf_names()
    if unused:
        raise ConversionError(f"HF checkpoint tensors with no megatron counterpart: {unused[:5]}"
                              f"{' ...' if len(unused) > 5 else ''}")
    return state


def megatron_to_hf_state(state: Mapping[str, Tensor], spec: HFModelSpec) -> dict[str, Tensor]:
    """HF state dict from an unsharded megatron state dict (global layer names).

    Padded vocabulary rows are dropped; a tied model gets no ``lm_head.weight`` (HF re-ties it).
    """
    out: dict[str, Tensor] = {}
    names = expected_megatron_names(spec)
    for name, (rule, layer) in names.items():
        if name not in state:
            raise ConversionError(f"megatron state dict has no tensor {name!r}")
        tensors = rule.to_hf(spec, state[name])
        for hf_name, tensor in zip(rule.hf, tensors):
            out[hf_name.format(i=layer)] = tensor.contiguous()
    unexpected = sorted(n for n in state if n not in names and not n.endswith("_extra_state"))
    if unexpected:
        raise ConversionError(f"megatron tensors with no HF counterpart: {unexpected[:5]}")
    return out
