"""Hugging Face <-> megatron for the Llama family: the library entry points.

    flags = megatron_args_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    model = build_gpt_model(...)                       # any TP rank / pipeline stage
    load_hf_into_megatron(model, hf_dir)               # this rank's shard, checked
    hf_state = megatron_state_to_hf(model.state_dict(), hf_config)   # TP=PP=1 model

``load_hf_into_megatron`` runs inside any TP x PP layout (each rank reads only its stage's layers
and slices its TP shard), so a frozen scorer or an evaluation can load HF folders directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from megatron_tw.checkpoint.families import (
    ConversionError,
    HFModelSpec,
    megatron_args_from_hf_config,
    spec_from_hf_config,
)
from megatron_tw.checkpoint.hf_io import open_hf_weights, read_hf_config
from megatron_tw.checkpoint.layout import (
    MegatronFromHF,
    check_shape,
    megatron_to_hf_state,
)
from megatron_tw.checkpoint.sharding import canonical_name, layer_numbers, tp_shard, unwrap

__all__ = ["load_hf_into_megatron", "megatron_state_to_hf", "megatron_args_from_hf_config",
           "spec_from_hf_config", "unsharded_state_dict", "expected_inv_freq", "ConversionError"]


def _spec(hf_config: Any) -> HFModelSpec:
    return hf_config if isinstance(hf_config, HFModelSpec) else spec_from_hf_config(hf_config)


def expected_inv_freq(spec: HFModelSpec, rotary_base: Optional[float] = None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] of the HF model, float64, in HF's formula
    (``rope_theta ** -(2j/d)``, then llama3 scaling when configured)."""
    base = spec.rope_theta if rotary_base is None else rotary_base
    d = spec.head_dim
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if spec.rope_scaling_factor is not None:
        factor, low, high, old = spec.rope_scaling_factor, 1.0, 4.0, 8192.0
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _check_rotary(model, spec: HFModelSpec, rotary_base: Optional[float]) -> None:
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ConversionError("the megatron model has no rotary embedding; build it with "
                              "--position-embedding-type rope")
    want = expected_inv_freq(spec, rotary_base)
    have = rotary.inv_freq.detach().double().cpu()
    if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-5, atol=0):
        base = spec.rope_theta if rotary_base is None else rotary_base
        raise ConversionError(
            f"the model's RoPE frequencies differ from the HF model's (rope_theta={base:g}, "
            f"llama3 scaling factor={spec.rope_scaling_factor}); build it with the flags of "
            "megatron_args_from_hf_config (--rotary-base, --use-rope-scaling --rope-scaling-factor) "
            "or pass rotary_base= when the base is overridden on purpose")


def _tp(tp_rank, tp_size):
    if tp_rank is not None and tp_size is not None:
        return tp_rank, tp_size
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return 0, 1


def load_hf_into_megatron(model, hf: Union[str, Mapping[str, torch.Tensor]], hf_config: Any = None,
                          *, rotary_base: Optional[float] = None, tp_rank: Optional[int] = None,
                          tp_size: Optional[int] = None, check_rotary: bool = True,
                          progress: bool = False) -> HFModelSpec:
    """Copy HF Llama-family weights into a megatron GPTModel (this rank's TP shard and PP stage).

    Args:
        model: GPTModel (possibly DDP/Float16Module-wrapped) or a list of them (virtual stages),
            built with the flags of :func:`megatron_args_from_hf_config`; its vocabulary may be
            padded (the extra rows become zero).
        hf: an HF model folder, or a state dict (HF names) together with ``hf_config``.
        hf_config: ``PretrainedConfig`` or dict; read from the folder when ``hf`` is a path.
        rotary_base: the RoPE base the model was built with when it overrides ``rope_theta``
            (context extension); only used for the frequency check.
        tp_rank, tp_size: default to megatron's tensor-parallel group (1 process: 0, 1).
        check_rotary: verify the model's RoPE frequencies match the HF model's.
        progress: a tqdm bar over the tensors copied (stderr).

    Returns the normalised ``HFModelSpec``. Raises ConversionError naming the tensor on a missing
    tensor or shape mismatch; no process-group communication happens.
    """
    if isinstance(hf, str):
        hf_config = hf_config if hf_config is not None else read_hf_config(hf)
        source = open_hf_weights(hf)
    else:
        if hf_config is None:
            raise ConversionError("load_hf_into_megatron(state_dict, ...) needs hf_config")
        source = hf
    spec = _spec(hf_config)
    tp_rank, tp_size = _tp(tp_rank, tp_size)
    chunks = [unwrap(c) for c in (model if isinstance(model, (list, tuple)) else [model])]
    build = MegatronFromHF(source, spec, _padded_vocab(chunks, tp_size) or spec.vocab_size)
    loaded_layers = []
    for chunk in chunks:
        loaded_layers += _load_stage(chunk, build, spec, tp_rank, tp_size, progress)
        if check_rotary:
            _check_rotary(chunk, spec, rotary_base)
    whole = (sorted(loaded_layers) == list(range(1, spec.num_layers + 1))
             and any(getattr(c, "pre_process", True) for c in chunks)
             and any(getattr(c, "post_process", True) for c in chunks))
    unused = build.unused_hf_names() if whole else []
    if unused:  # the model holds every layer, so every HF tensor should have found a place
        raise ConversionError(f"HF tensors with no place in the megatron model: {unused[:5]} "
                              "(check --add-qkv-bias / --untie-embeddings-and-output-weights against "
                              "megatron_args_from_hf_config)")
    return spec


def _padded_vocab(chunks, tp_size: int) -> Optional[int]:
    for chunk in chunks:
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            if name.endswith(("output_layer.weight", "word_embeddings.weight")):
                return tensor.shape[0] * tp_size
    return None


@torch.no_grad()
def _load_stage(model, build: MegatronFromHF, spec: HFModelSpec, tp_rank: int,
                tp_size: int, progress: bool = False) -> list[int]:
    """Copy this stage's shards; returns the global layer numbers it holds."""
    numbers = layer_numbers(model)
    if numbers and max(numbers) > spec.num_layers:
        raise ConversionError(f"the megatron model has layer {max(numbers)}, the HF model only "
                              f"{spec.num_layers} layers (--num-layers mismatch)")
    items = model.state_dict(keep_vars=True).items()
    if progress:
        from tqdm import tqdm

        items = tqdm(list(items), desc="converting", unit="tensor")
    for name, tensor in items:
        if name.endswith("_extra_state"):
            continue
        full_name = canonical_name(name, numbers, spec.tied_embeddings)
        if full_name not in build:
            raise ConversionError(f"megatron tensor {name!r} has no HF counterpart for "
                                  f"{spec.architecture} (check --add-qkv-bias / "
                                  "--untie-embeddings-and-output-weights against "
                                  "megatron_args_from_hf_config)")
        shard = tp_shard(full_name, build[full_name], tp_rank, tp_size)
        check_shape(f"{name} (TP rank {tp_rank} of {tp_size})", shard, tuple(tensor.shape))
        tensor.data.copy_(shard)
    return numbers


def unsharded_state_dict(model) -> dict[str, torch.Tensor]:
    """A TP=PP=1 model's tensors under the canonical megatron names (TE names folded in)."""
    model = unwrap(model)
    numbers = layer_numbers(model)
    return {canonical_name(name, numbers, tied_embeddings=False): tensor.detach()
            for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}


def megatron_state_to_hf(state_dict: Mapping[str, torch.Tensor], hf_config: Any,
                         dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """HF state dict from an unsharded (TP=PP=1) megatron state dict.

    ``state_dict``: ``model.state_dict()`` of a one-process GPTModel (or
    :func:`unsharded_state_dict`); padded vocabulary rows are dropped. ``dtype`` casts every
    tensor (default: keep).
    """
    spec = _spec(hf_config)
    state = {name: t for name, t in state_dict.items() if not name.endswith("_extra_state")}
    if any(".layer_norm_weight" in name for name in state):
        numbers = list(range(1, spec.num_layers + 1))
        state = {canonical_name(n, numbers, tied_embeddings=False): t for n, t in state.items()}
    out = megatron_to_hf_state(state, spec)
    return {k: (v.to(dtype) if dtype is not None else v) for k, v in out.items()}
