"""Transformer layers whose initial weights depend only on (seed, global layer number).

Stock megatron initialises every layer from one running RNG stream, so a pipeline stage that
starts at layer k draws different numbers than the single-process model does for layer k: the same
seed gives a different model under PP=2. Re-seeding at the start of each layer from its global
number makes the initial model identical under every TP x PP x CP x DP layout (TP and CP are
already invariant with CPU initialisation), which is what lets a run be compared with, or resumed
into, any other layout.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank


def layer_seed(init_seed: int, global_layer_number: int) -> int:
    # A large odd multiplier keeps per-layer seeds apart from the base seeds megatron derives
    # (seed + 100 * pp_rank, seed + 2718 + tp_rank, ...).
    return (init_seed + 1_000_003 * global_layer_number) % (2**63 - 1)


class LayerSeededTransformerLayer(TransformerLayer):
    """``TransformerLayer`` that re-seeds the default RNG from its global layer number first."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0,
                 **kwargs):
        global_number = layer_number
        if not kwargs.get("is_mtp_layer", False) and kwargs.get("add_layer_offset", True):
            pg_collection = kwargs.get("pg_collection") or ProcessGroupCollection.use_mpu_process_groups()
            global_number += get_transformer_layer_offset(
                config, kwargs.get("vp_stage"), get_pg_rank(pg_collection.pp))
        torch.manual_seed(layer_seed(init_seed, global_number))
        super().__init__(config, submodules, layer_number, *args, **kwargs)
