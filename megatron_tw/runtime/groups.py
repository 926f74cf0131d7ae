"""Process groups the project creates beside megatron's (explicit groups, created collectively)."""

from __future__ import annotations

import torch.distributed as dist

_SINGLE_RANK_GROUP = None
_STAGE_GROUPS: dict = {}


def single_rank_group():
    """A process group holding only this rank (created collectively, once, on every rank): the
    pipeline group of a model that is whole on its stage, or the CP group of one that runs
    without context parallelism."""
    global _SINGLE_RANK_GROUP
    if _SINGLE_RANK_GROUP is None:
        group, _ = dist.new_subgroups(group_size=1)
        _SINGLE_RANK_GROUP = group
    return _SINGLE_RANK_GROUP


def pipeline_stage_group(stage: int, pp_rank: int):
    """The group of every rank whose pipeline rank is ``stage`` (all TP x CP x DP ranks of that
    stage); None on ranks of other stages.

    Collective over the world: every rank calls it with its own ``pp_rank`` and the same
    ``stage``. A model that lives on one stage only (the frozen scorer) loads its checkpoint over
    this group; over the world group the load would wait for ranks that never join it.
    """
    if stage not in _STAGE_GROUPS:
        pp_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(pp_ranks, pp_rank)
        members = [rank for rank, p in enumerate(pp_ranks) if p == stage]
        group = dist.new_group(members)  # new_group is collective: every rank creates it
        _STAGE_GROUPS[stage] = group if pp_rank == stage else None
    return _STAGE_GROUPS[stage]


def pair_groups(pipeline_ranks: list[int], first: int, second: int, device):
    """A two-rank group {pipeline[first], pipeline[second]} for every pipeline, created on every
    rank (new_group is collective); returns this rank's pipeline's group, initialised.

    Its own communicator keeps these sends apart from megatron's stage-to-stage traffic (messages
    between one pair of ranks on one NCCL communicator are matched in order), and one all-reduce
    on it at start-up creates the NCCL communicator eagerly: created lazily by the first send, its
    initialisation would block the sender while the receiver waits in megatron's activation
    receive, which needs that very sender (a deadlock gloo, without such an init, never shows).
    """
    import torch

    pipelines = [None] * dist.get_world_size()
    dist.all_gather_object(pipelines, list(pipeline_ranks))
    mine = None
    for ranks in sorted({tuple(p) for p in pipelines}):
        members = sorted({ranks[first], ranks[second]})
        group = dist.new_group(members)
        if tuple(pipeline_ranks) == ranks:
            mine = group
    if mine is not None and dist.get_rank() in (pipeline_ranks[first], pipeline_ranks[second]):
        dist.all_reduce(torch.zeros(1, device=device), group=mine)
    return mine
