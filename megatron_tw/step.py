"""megatron's ``forward_step`` for token-weighted training, and its weight hook.

Per micro-batch: read the batch (TP broadcast + CP split, on the compute device), run the trainee
forward with labels (per-token long-context losses on the last pipeline stage), run the scorer
(the run's, built once at start-up and passed in), and hand megatron a loss function that turns
long and short losses into weights and the weighted loss (docs/method.md, "Pipeline").
``weight_fn`` is ``None`` for the uniform baseline, whose loss is then the stock megatron loss
bit for bit.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args, get_timers
from megatron.training.utils import is_first_or_last_pipeline_stage

from megatron_tw import runtime
from megatron_tw.data.batch import active_keys, get_batch
from megatron_tw.errors import ConfigError
from megatron_tw.loss import token_weighted_loss
from megatron_tw.reliability import check_finite
from megatron_tw.scoring import pipeline
from megatron_tw.scoring.scorers import Scorer
from megatron_tw.weight_dump import dump_due, dump_weights
from megatron_tw.weighting import compute_token_weights, weight_statistics


def _cp_group():
    group = parallel_state.get_context_parallel_group()
    return group if parallel_state.get_context_parallel_world_size() > 1 else None


def _batch_for_this_rank(data_iterator, vp_stage, scorer: Optional[Scorer]):
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None
    args = get_args()
    full_rows = scorer is not None and scorer.needs_full_rows(args)
    return get_batch(
        data_iterator,
        keys=active_keys(args),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        tp_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        cp_group=parallel_state.get_context_parallel_group(),
        device=runtime.compute_device(),
        keep_full=("tokens", "labels") if full_rows else (),
    )


def score_for_other_stage(args, batch, scorer: Optional[Scorer]) -> None:
    """On a pipeline stage that holds the frozen scorer but not the loss: score this micro-batch
    and send the losses to the last stage (see megatron_tw/scoring/pipeline.py)."""
    if scorer is not None and pipeline.remote_scoring(args) and pipeline.is_scorer_stage(args):
        pipeline.send_short_losses(*scorer.short_losses(batch))


def build_weight_fn(args, batch, scorer: Optional[Scorer]):
    """On the last pipeline stage: this micro-batch's weighting hook for the loss function
    (None for uniform weights)."""
    config = getattr(args, "tw_weighting", None)
    if config is None or config.is_uniform:
        return None
    short, same_as_long = None, None
    if config.needs_short_loss:
        if pipeline.remote_scoring(args):
            short, same_as_long = pipeline.recv_short_losses(batch["loss_mask"].shape,
                                                             batch["loss_mask"].device)
        else:
            short, same_as_long = scorer.short_losses(batch)
    mask = batch["loss_mask"]
    cp_group = _cp_group()
    iteration = args.curr_iteration

    def weight_fn(long_loss: torch.Tensor):
        """long_loss [b, s/CP] (detached) -> (weights [b, s/CP], statistics)."""
        short_loss = None
        if short is not None:
            short_loss = torch.where(same_as_long, long_loss, short)
            check_finite("short-context losses", short_loss, mask)
        weights = compute_token_weights(
            long_loss, short_loss, mask, batch["position_ids"], batch["sample_id"],
            config=config, seed=args.seed, iteration=iteration, cp_group=cp_group)
        stats = weight_statistics(weights, long_loss, short_loss, mask, batch["position_ids"],
                                  short_context=args.tw_short_context or 0, cp_group=cp_group)
        if dump_due(args, iteration) and parallel_state.get_tensor_model_parallel_rank() == 0:
            ranks = {"dp": parallel_state.get_data_parallel_rank(),
                     "cp": parallel_state.get_context_parallel_rank()}
            dump_weights(args.tw_dump_weights, iteration, ranks, sample_id=batch["sample_id"],
                         position_ids=batch["position_ids"], weights=weights,
                         long_loss=long_loss, loss_mask=mask, short_loss=short_loss)
        return weights, stats

    return weight_fn


def forward_step(data_iterator, model, return_schedule_plan: bool = False, *,
                 scorer: Optional[Scorer] = None):
    """Run one micro-batch forward; returns (output_tensor, loss_func) as megatron expects.

    ``scorer``: the run's short-context scorer (``scoring.scorers.build_scorer``; None when the
    weighting needs no short losses). pretrain_tw.py binds it with ``functools.partial``.
    """
    if return_schedule_plan:  # refused at start-up (arguments.check_schedule); never silent
        raise NotImplementedError("token-weighted forward_step builds no schedule plan "
                                  "(--overlap-moe-expert-parallel-comm)")
    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = _batch_for_this_rank(data_iterator, vp_stage, scorer)
    timers("batch-generator").stop()

    if batch is None:  # a middle pipeline stage: activations arrive from the previous stage
        return model(None, None, None), partial(token_weighted_loss, None, None)
    output_tensor = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          loss_mask=batch["loss_mask"])
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage):
        score_for_other_stage(args, batch, scorer)  # the first stage may hold the frozen scorer
        return output_tensor, partial(token_weighted_loss, batch["loss_mask"], None)
    weight_fn = build_weight_fn(args, batch, scorer)
    return output_tensor, partial(token_weighted_loss, batch["loss_mask"], weight_fn)


@contextlib.contextmanager
def _rng_untouched():
    """Building the scorer's modules draws (discarded) initial weights and reseeds per layer;
    restore the default, CUDA and megatron tracker generators afterwards, so a weighted run
    draws the same random numbers (dropout, data order) as a uniform one."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    tracker.set_states(states)


def scorer_setup_hook(model_provider, scorer: Optional[Scorer]):
    """Wrap megatron's model provider so the scorer builds its model once, right after the
    trainee's (first) chunk: megatron is initialised there, every rank passes through it (the
    scorer's process groups and checkpoint load are collective), and the trainee exists (the
    self scorer shares its parameters)."""
    if scorer is None:
        return model_provider

    def provider(*args, **kwargs):
        model = model_provider(*args, **kwargs)
        if not scorer.ready:  # virtual pipeline stages call the provider once per chunk
            try:
                with _rng_untouched():
                    scorer.setup(model)
            except ConfigError as err:  # e.g. --tw-scorer-load of another vocabulary
                raise SystemExit(f"pretrain_tw.py: error: {err}") from None
            scorer.ready = True
        return model

    return provider
