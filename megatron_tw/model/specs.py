"""Transformer layer specs: Transformer Engine on GPU machines that have it, megatron's local
modules otherwise. The choice follows ``--transformer-impl``; the start-up checks in
``megatron_tw.arguments`` make sure a TE request on a machine without TE fails early and clearly.
"""

from __future__ import annotations

from argparse import Namespace

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_tw.model.cp_attention import ContextParallelDotProductAttention
from megatron_tw.model.seeded_layer import LayerSeededTransformerLayer
from megatron_tw.registry import registrar

# name -> builder(args) -> ModuleSpec. Register a new backend here (e.g. a kitchen spec).
LAYER_SPECS = {}


register_layer_spec = registrar(LAYER_SPECS, "layer spec")


@register_layer_spec("transformer_engine")
def _te_spec(args: Namespace) -> ModuleSpec:
    # TE's DotProductAttention implements context parallelism (p2p / a2a / all_gather).
    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=args.num_experts,
        moe_grouped_gemm=args.moe_grouped_gemm,
        qk_layernorm=args.qk_layernorm,
    )


@register_layer_spec("local")
def _local_spec(args: Namespace) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=args.num_experts,
        moe_grouped_gemm=args.moe_grouped_gemm,
        qk_layernorm=args.qk_layernorm,
        normalization=args.normalization,
    )
    # megatron's local DotProductAttention asserts CP == 1 and needs a materialised mask for
    # sliding windows; this one serves CP (all-gathered K/V) and windows with the same code.
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec


def layer_spec_from_args(args: Namespace) -> ModuleSpec:
    """The layer spec for ``--transformer-impl`` (``transformer_engine`` or ``local``), with
    layer-seeded initialisation (identical initial weights under every parallel layout)."""
    spec = LAYER_SPECS[args.transformer_impl](args)
    return ModuleSpec(module=LayerSeededTransformerLayer, params={"init_seed": args.seed},
                      submodules=spec.submodules)


def sliding_scorer_spec(args: Namespace) -> ModuleSpec:
    """The run's layer spec with the sliding-window core attention that keeps the attention sink
    (key 0) visible: the short-context scorer's sliding mode.

    Transformer Engine's attention takes a window but no sink, so with the TE spec too the core
    attention is this project's (blockwise SDPA over the window plus key 0; it all-gathers K/V
    under CP); the TE linear layers, fused norms and FP8 GEMMs stay. Core attention has no
    parameters, so a scorer built from this spec shares every parameter name with the trainee.
    """
    spec = layer_spec_from_args(args)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=ContextParallelDotProductAttention,
                                          params={"sink": True})
    return spec
