"""Glue between a micro-batch, the short-context scorer and the weighting (METHOD.md steps 1-2).

``build_weight_fn(args, batch, model)`` runs the scorer for this micro-batch (if the weighting
compares losses) and returns the callable the loss function applies to the trainee's long-context
losses; ``None`` for the uniform baseline, whose loss is then the stock megatron loss bit for bit.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_tw.reliability import check_finite
from megatron_tw.weighting import compute_token_weights, weight_statistics


def needs_scorer(args) -> bool:
    config = getattr(args, "tw_weighting", None)
    return config is not None and not config.is_uniform and config.needs_short_loss


def full_rows_needed(args) -> bool:
    """Whether every CP rank keeps the whole [b, s] token/label rows (integers) for scoring."""
    if not needs_scorer(args):
        return False
    from megatron_tw.scoring.scorers import SCORERS

    return SCORERS[args.tw_scorer].needs_full_rows(args)


def _cp_group():
    group = parallel_state.get_context_parallel_group()
    return group if parallel_state.get_context_parallel_world_size() > 1 else None


def score_for_other_stage(args, batch, model) -> None:
    """On a pipeline stage that holds the frozen scorer but not the loss: score this micro-batch
    and send the losses to the last stage (see megatron_tw/scoring/pipeline.py)."""
    if not needs_scorer(args):
        return
    from megatron_tw.scoring import pipeline

    if pipeline.remote_scoring(args) and pipeline.is_scorer_stage(args):
        from megatron_tw.scoring.scorers import get_scorer

        pipeline.send_short_losses(*get_scorer(args).short_losses(batch, model))


def build_weight_fn(args, batch, model):
    """On the last pipeline stage: this micro-batch's weighting hook for the loss function."""
    config = getattr(args, "tw_weighting", None)
    if config is None or config.is_uniform:
        return None
    short, same_as_long = None, None
    if config.needs_short_loss:
        from megatron_tw.scoring import pipeline

        if pipeline.remote_scoring(args):
            short, same_as_long = pipeline.recv_short_losses(batch["loss_mask"].shape,
                                                             batch["loss_mask"].device)
        else:
            from megatron_tw.scoring.scorers import get_scorer

            short, same_as_long = get_scorer(args).short_losses(batch, model)
    mask = batch["loss_mask"]
    cp_group = _cp_group()
    iteration = args.curr_iteration

    def weight_fn(long_loss: torch.Tensor):
        short_loss = None
        if short is not None:
            short_loss = torch.where(same_as_long, long_loss, short)
            check_finite("short-context losses", short_loss[mask.bool()])
        weights = compute_token_weights(
            long_loss, short_loss, mask, batch["position_ids"], batch["sample_id"],
            config=config, seed=args.seed, iteration=iteration, cp_group=cp_group)
        stats = weight_statistics(weights, long_loss, short_loss, mask, batch["position_ids"],
                                  short_context=args.tw_short_context or 0, cp_group=cp_group)
        return weights, stats

    return weight_fn
