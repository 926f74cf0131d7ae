"""Token weighting: from long/short-context losses to per-token loss weights (docs/method.md, "Pipeline").

    config = build_weighting_config("dense", interpolation=0.5)
    w = compute_token_weights(long_loss, short_loss, loss_mask, position_ids, sample_ids,
                              config=config, seed=seed, iteration=it, cp_group=cp_group)
    loss = (w * loss_mask * long_loss).sum() / loss_mask.sum()

Files: config.py (WeightingConfig + validation), transforms.py (comparison and transform
registries), sparsify.py (layout-independent top-kappa), normalize.py (L1, softmax),
weights.py (the pipeline), statistics.py (logging), presets.py (named schemes),
arguments.py (--tw-* flags), comm.py (context-parallel reductions).
"""

from megatron_tw.weighting.arguments import (
    add_weighting_args,
    needs_short_losses,
    weighting_config_from_args,
)
from megatron_tw.weighting.config import WeightingConfig
from megatron_tw.weighting.presets import PRESETS, build_weighting_config, register_preset
from megatron_tw.weighting.statistics import weight_statistics
from megatron_tw.weighting.transforms import TRANSFORMS, register_transform
from megatron_tw.weighting.weights import compute_token_weights

__all__ = [
    "WeightingConfig",
    "PRESETS",
    "TRANSFORMS",
    "register_preset",
    "register_transform",
    "build_weighting_config",
    "add_weighting_args",
    "weighting_config_from_args",
    "needs_short_losses",
    "compute_token_weights",
    "weight_statistics",
]
