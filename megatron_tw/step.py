"""megatron's ``forward_step`` for token-weighted training.

Per micro-batch: read the batch (TP broadcast + CP split), run the trainee forward with labels
(per-token long-context losses on the last pipeline stage), and hand megatron a loss function that
turns those losses plus the short-context losses into weights and the weighted loss.
"""

from __future__ import annotations

from functools import partial

from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args, get_timers
from megatron.training.utils import is_first_or_last_pipeline_stage

from megatron_tw.data.batch import active_keys, get_batch
from megatron_tw.loss import token_weighted_loss
from megatron_tw.token_weights import build_weight_fn, full_rows_needed, score_for_other_stage


def _batch_for_this_rank(data_iterator, vp_stage):
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None
    args = get_args()
    return get_batch(
        data_iterator,
        keys=active_keys(args),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        tp_src_rank=parallel_state.get_tensor_model_parallel_src_rank(),
        cp_group=parallel_state.get_context_parallel_group(),
        keep_full=("tokens", "labels") if full_rows_needed(args) else (),
    )


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Run one micro-batch forward; returns (output_tensor, loss_func) as megatron expects."""
    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = _batch_for_this_rank(data_iterator, vp_stage)
    timers("batch-generator").stop()

    if batch is None:  # a middle pipeline stage: activations arrive from the previous stage
        return model(None, None, None), partial(token_weighted_loss, None, None)
    output_tensor = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          loss_mask=batch["loss_mask"])
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage):
        score_for_other_stage(args, batch, model)  # the first stage may hold the frozen scorer
        return output_tensor, partial(token_weighted_loss, batch["loss_mask"], None)
    weight_fn = build_weight_fn(args, batch, model)
    return output_tensor, partial(token_weighted_loss, batch["loss_mask"], weight_fn)
