"""From unsharded megatron tensors to the shard a (TP rank, pipeline stage) model holds.

A pipeline stage's GPTModel numbers its layers from 0 (``decoder.layers.{j}``); each
TransformerLayer knows its global ``layer_number`` (1-based), which gives the global name.
Tensor parallelism follows megatron's parallel linear layers:
- column-parallel (rows split, contiguous by rank): vocabulary-parallel embedding and output layer,
  ``linear_qkv`` (the interleaved layout keeps whole query groups together; when there are fewer
  groups than TP ranks megatron all-gathers the same contiguous split), and ``linear_fc1`` with
  SwiGLU, where each rank holds [its gate rows; its up rows], not a contiguous slice of cat(gate, up);
- row-parallel (columns split): ``linear_proj`` and ``linear_fc2``;
- replicated: norms.
The Transformer Engine layer spec fuses the norms into the next linear layer; ``TE_ALIASES`` maps
those names to the local spec's, so a TE model loads the same tensors.
"""

from __future__ import annotations

import re

import torch

from megatron_tw.checkpoint.families import ConversionError

TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight",
           "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_SWIGLU = ("mlp.linear_fc1.weight",)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def canonical_name(local_name: str, layer_numbers: list[int], tied_embeddings: bool) -> str:
    """This stage's state-dict name -> the unsharded model's name (global layer index, local spec).

    ``layer_numbers[j]`` is the 1-based global number of local layer ``j``. On a last pipeline
    stage without the embedding, a tied model keeps a copy of the embedding as ``output_layer``.
    """
    match = _LAYER.match(local_name)
    if match:
        local, rest = int(match.group(1)), match.group(2)
        rest = TE_ALIASES.get(rest, rest)
        return f"decoder.layers.{layer_numbers[local] - 1}.{rest}"
    if local_name == "output_layer.weight" and tied_embeddings:
        return "embedding.word_embeddings.weight"
    return local_name


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The rows/columns of the unsharded tensor ``full`` that TP rank ``tp_rank`` holds."""
    if tp_size == 1:
        return full
    suffix = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    if suffix in _COLUMN:
        return _split(name, full, 0, tp_rank, tp_size)
    if suffix in _ROW:
        return _split(name, full, 1, tp_rank, tp_size)
    if suffix in _SWIGLU:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([_split(name, gate, 0, tp_rank, tp_size),
                          _split(name, up, 0, tp_rank, tp_size)], dim=0)
    return full  # norms are replicated


def _split(name, full, dim, rank, size):
    if full.shape[dim] % size:
        raise ConversionError(f"tensor {name!r} dim {dim} of size {full.shape[dim]} does not split "
                              f"over {size} tensor-parallel ranks")
    return torch.chunk(full, size, dim=dim)[rank]


def layer_numbers(model) -> list[int]:
    """1-based global layer numbers of this stage's ``decoder.layers``."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return []
    return [int(layer.layer_number) for layer in decoder.layers]
