"""compute_token_weights: per-token loss weights from long- and short-context losses.

Runs the pipeline of docs/method.md per sequence, in the method's order:
    comparison -> transforms -> truncation -> sparsification -> normalization -> interpolation
in float64, under no_grad (weights are constants for the backward pass), and returns float32.

Context parallelism: a sequence of length S is split over the CP group in Megatron's
load-balanced order (rank r holds chunks r and 2*CP-1-r of 2*CP chunks), so each rank sees
[b, s_local] = [b, S / CP] tokens that are not contiguous. Every per-sequence quantity (N, the
L1 sum, the softmax max and sum, the top-k selection) is reduced over `cp_group` and nothing
else; element-wise steps need no communication. The result equals, up to float rounding in the
sums, the weights of the whole sequence computed on one rank.
"""

from __future__ import annotations

import torch

from megatron_tw.weighting.comm import cp_sum
from megatron_tw.weighting.config import WeightingConfig
from megatron_tw.weighting.normalize import NORMALIZATIONS
from megatron_tw.weighting.sparsify import top_kappa_mask
from megatron_tw.weighting.transforms import COMPARISONS, TRANSFORMS


def _check_shapes(long_loss, short_loss, loss_mask, position_ids, sample_ids):
    shape = long_loss.shape
    if long_loss.dim() != 2:
        raise ValueError(f"long_loss must be [b, s_local]; got shape {tuple(shape)}")
    for name, tensor in (("short_loss", short_loss), ("loss_mask", loss_mask),
                         ("position_ids", position_ids)):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)} "
                             "like long_loss (every per-token tensor split the same way over CP)")
    if sample_ids is not None and sample_ids.numel() != shape[0]:
        raise ValueError(f"sample_ids must be [b] = [{shape[0]}]; got {tuple(sample_ids.shape)}")


@torch.no_grad()
def compute_token_weights(long_loss: torch.Tensor, short_loss: torch.Tensor | None,
                          loss_mask: torch.Tensor, position_ids: torch.Tensor,
                          sample_ids: torch.Tensor, *, config: WeightingConfig, seed: int,
                          iteration: int, cp_group=None) -> torch.Tensor:
    """Loss weights for the tokens this context-parallel rank holds.

    Args:
        long_loss:    [b, s_local] float, per-token cross-entropy of the trainee (full context).
        short_loss:   [b, s_local] float, per-token cross-entropy with short context; may be
                      None when `config.is_uniform` (it is not read then).
        loss_mask:    [b, s_local] 0/1 of any dtype; tokens outside it get weight 0 and never
                      count in N, in sums, maxima or the top-k (their losses may be garbage,
                      even nan).
        position_ids: [b, s_local] int64 GLOBAL positions in the sequence (unique within it);
                      used for the sparsification tie-break only.
        sample_ids:   [b] int64 dataset sample index; also for the tie-break only.
        config:       the weighting steps (validated here).
        seed, iteration: with the sample id and position, they seed the tie-break key.
        cp_group:     the context-parallel group, over which every per-sequence statistic is
                      reduced; None for no CP (torch.distributed is then never called).

    Returns:
        [b, s_local] float32 weights, detached, 0 outside loss_mask.

    Sparsification keeps k = floor(kappa * N) tokens per sequence (N = loss-masked tokens of the
    whole sequence); when kappa * N < 1 and N >= 1 it keeps exactly one token, the top one.
    A sequence whose weights are all zero before normalization gets uniform weights.
    """
    config.validate()
    valid = loss_mask.detach() != 0
    if config.is_uniform:
        # Exactly 1.0 on masked tokens: the weighted loss is then the stock loss, bit for bit.
        return valid.to(torch.float32)
    if short_loss is None:
        raise ValueError(f"{config} needs short-context losses but short_loss is None; "
                         "configure a scorer or use --tw-preset uniform")
    _check_shapes(long_loss, short_loss, loss_mask, position_ids, sample_ids)

    long64 = long_loss.detach().to(torch.float64)
    short64 = short_loss.detach().to(torch.float64)
    scores = COMPARISONS[config.comparison](long64, short64)
    # Losses at masked positions are arbitrary (padding, document ends, even nan): zero them
    # before any step, so that no step (a newly registered one included) ever sees them.
    scores = torch.where(valid, scores, 0.0)

    for name in config.transforms:
        scores = TRANSFORMS[name](scores, config)

    if config.truncation is not None:
        scores = scores.clamp(max=config.truncation)

    if config.sparsity is not None:
        scores = top_kappa_mask(scores, valid, position_ids, sample_ids, kappa=config.sparsity,
                                seed=seed, iteration=iteration, cp_group=cp_group)

    if config.normalization is not None:
        num_tokens = cp_sum(valid.sum(dim=1, dtype=torch.float64), cp_group)  # [b], N
        scores = NORMALIZATIONS[config.normalization](scores, valid, num_tokens, config, cp_group)

    if config.interpolation is not None:
        lam = config.interpolation
        scores = lam + (1.0 - lam) * scores

    return torch.where(valid, scores, 0.0).to(torch.float32)
