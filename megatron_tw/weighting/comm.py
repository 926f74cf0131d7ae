"""Context-parallel reductions for per-sequence weighting statistics.

Every function takes the context-parallel group explicitly. `cp_group=None` means "no context
parallelism": the functions return their input untouched and never touch torch.distributed, so
the weighting code runs (and is testable) without an initialized process group.

Only tensors of size [b] or [b, s_local] are communicated: never anything per vocabulary entry.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_world_size(cp_group) -> int:
    return 1 if cp_group is None else dist.get_world_size(cp_group)


def cp_rank(cp_group) -> int:
    return 0 if cp_group is None else dist.get_rank(cp_group)


def cp_sum(tensor: torch.Tensor, cp_group) -> torch.Tensor:
    """In-place sum over the CP group (a no-op without one); returns the tensor."""
    if cp_group is not None and cp_world_size(cp_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=cp_group)
    return tensor


def cp_max(tensor: torch.Tensor, cp_group) -> torch.Tensor:
    """In-place max over the CP group (a no-op without one); returns the tensor."""
    if cp_group is not None and cp_world_size(cp_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=cp_group)
    return tensor


def cp_gather_seq(tensor: torch.Tensor, cp_group, dim: int = -1) -> torch.Tensor:
    """Concatenate every CP rank's `tensor` along `dim` in rank order.

    The result holds the whole sequence, but in the *layout order* (rank 0's tokens, then rank
    1's, ...), not in position order: callers that need a layout-independent order sort by the
    global position ids gathered the same way. Rank r's own tokens sit at
    [r * s_local, (r + 1) * s_local) along `dim`.
    """
    world = cp_world_size(cp_group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=cp_group)
    return torch.cat(parts, dim=dim)
