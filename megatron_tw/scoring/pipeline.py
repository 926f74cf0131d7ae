"""The frozen scorer co-located on one pipeline stage.

With pipeline parallelism the last stage already holds the output layer and the loss, so by
default the frozen scorer lives on the first stage (``--tw-scorer-stage 0``), which reads the
same micro-batch. Per micro-batch it sends its short-context losses ([b, s / CP] float32 and a
[b, s / CP] "same as long" mask) point-to-point to the last stage of the same (TP, CP, DP)
coordinate: one small tensor pair per micro-batch, nothing of size sequence x vocabulary.

The pair of ranks talks over a group of its own, created and initialised at start-up
(``connect``; see runtime/groups.py ``pair_groups`` for why). Sends are non-blocking: under 1F1B
the scorer stage runs forward micro-batches ahead of the last stage, and a blocking send would
wait on a receive the last stage posts only after its own activation receive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_tw.runtime.groups import pair_groups

_PENDING: list = []  # (work, tensors) kept alive until the send completes
_LINK = {}  # "group": this rank's scorer-stage <-> last-stage group


def remote_scoring(args) -> bool:
    """Whether the frozen scorer runs on another pipeline stage than the loss (the last)."""
    pp = args.pipeline_model_parallel_size
    return args.tw_scorer == "frozen" and pp > 1 and args.tw_scorer_stage != pp - 1


def is_scorer_stage(args) -> bool:
    return parallel_state.get_pipeline_model_parallel_rank() == args.tw_scorer_stage


def connect(args, device) -> None:
    """Create the scorer-stage <-> last-stage groups (collective: every rank, at start-up)."""
    ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    _LINK["group"] = pair_groups(ranks, args.tw_scorer_stage, len(ranks) - 1, device)


def _group():
    if "group" not in _LINK:
        raise RuntimeError("scoring.pipeline.connect() was not called at start-up")
    return _LINK["group"]


def send_short_losses(short: torch.Tensor, same_as_long: torch.Tensor) -> None:
    """From the scorer stage to the last stage of this rank's pipeline."""
    while _PENDING and _PENDING[0][0].is_completed():
        _PENDING.pop(0)
    dst = parallel_state.get_pipeline_model_parallel_last_rank()
    payload = (short.float().contiguous(), same_as_long.to(torch.uint8).contiguous())
    works = [dist.isend(t, dst, group=_group()) for t in payload]
    _PENDING.extend((w, payload) for w in works)


def recv_short_losses(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """On the last stage: the scorer stage's losses for this micro-batch, on ``device``
    (remote scoring means stage 0: the scorer stage is the first or the last)."""
    src = parallel_state.get_pipeline_model_parallel_first_rank()
    short = torch.empty(shape, dtype=torch.float32, device=device)
    same = torch.empty(shape, dtype=torch.uint8, device=device)
    dist.recv(short, src, group=_group())
    dist.recv(same, src, group=_group())
    return short, same.bool()
