"""From the data iterator to this rank's micro-batch: TP broadcast, then CP split.

Only tensor-parallel rank 0 reads the data iterator; every tensor is broadcast over the TP group
and then every *per-token* tensor is split over the context-parallel group in megatron's
load-balanced order (2*CP chunks, CP rank r keeps chunks r and 2*CP-1-r).

Adding a per-token tensor (precomputed short-context losses, say) is one call to
:func:`register_per_token_key`; it then travels the TP broadcast and the CP split like the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_tw.weighting import needs_short_losses


@dataclass(frozen=True)
class BatchKey:
    name: str
    dtype: torch.dtype
    per_token: bool  # [b, s] (split over CP) or [b] (per sample, not split)
    enabled: Callable[[object], bool]  # args -> whether the run needs this key


BATCH_KEYS: dict[str, BatchKey] = {}


def register_batch_key(name: str, dtype: torch.dtype, *, per_token: bool = True,
                       enabled: Callable[[object], bool] = lambda args: True) -> None:
    if name in BATCH_KEYS:
        raise ValueError(f"batch key {name!r} is already registered")
    BATCH_KEYS[name] = BatchKey(name, dtype, per_token, enabled)


def register_per_token_key(name: str, dtype: torch.dtype,
                           enabled: Callable[[object], bool] = lambda args: True) -> None:
    """Declare a [b, s] tensor the dataset yields under ``name`` (TP-broadcast and CP-split)."""
    register_batch_key(name, dtype, per_token=True, enabled=enabled)


register_per_token_key("tokens", torch.int64)
register_per_token_key("labels", torch.int64)
register_per_token_key("loss_mask", torch.float32)
# Global positions 0..s-1 (RoPE and the weighting's "beyond the short context" need the position
# a token has in the whole sequence, which a CP rank's local index no longer tells).
register_per_token_key("position_ids", torch.int64)
# A stable id per sample: the weighting's tie-break key, identical under every parallel layout.
register_batch_key("sample_id", torch.int64, per_token=False)


def reads_short_loss(args) -> bool:
    """Whether the run reads precomputed short-context losses with each sample (the sidecar of
    tools/score_data.py, read by data/short_loss.py)."""
    return getattr(args, "tw_scorer", None) == "precomputed" and needs_short_losses(args)


# The precomputed losses travel with the batch: TP broadcast and CP split like the tokens.
register_per_token_key("short_loss", torch.float32, enabled=reads_short_loss)


def active_keys(args) -> list[BatchKey]:
    return [key for key in BATCH_KEYS.values() if key.enabled(args)]


def _broadcast(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def get_batch(data_iterator: Optional[Iterator], *, keys: list[BatchKey], micro_batch_size: int,
              seq_length: int, tp_group, tp_src_rank: int, cp_group, device: torch.device,
              keep_full: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Read (TP rank 0), move to ``device``, broadcast over ``tp_group``, split over ``cp_group``.

    Returns a dict of ``[b, s / CP]`` per-token tensors (and ``[b]`` per-sample tensors). On TP
    ranks other than 0 ``data_iterator`` is not touched. Receive buffers are shaped from
    ``micro_batch_size`` and ``seq_length`` (the full sequence length, before the CP split).
    Keys in ``keep_full`` are also returned unsplit as ``<key>_full`` [b, s] (the scorer keeps
    whole token rows: integers only, so every CP rank can score the spans ending in its chunks).
    Every tensor is on ``device`` (the GPU in a GPU run: NCCL broadcasts CUDA tensors only, and
    the model's embedding takes CUDA indices), as megatron's ``get_batch_on_this_tp_rank`` moves
    with ``.cuda(non_blocking=True)``.
    """
    reading = tp_group is None or dist.get_rank(tp_group) == 0
    sample = next(data_iterator) if reading else None
    batch = {}
    for key in keys:
        shape = (micro_batch_size, seq_length) if key.per_token else (micro_batch_size,)
        if reading:
            if key.name not in sample:
                raise KeyError(f"the dataset yields no '{key.name}' (keys: {sorted(sample)}); "
                               "the run's flags require it")
            tensor = sample[key.name].to(device=device, dtype=key.dtype, non_blocking=True)
            tensor = tensor.reshape(shape).contiguous()
        else:
            tensor = torch.empty(shape, dtype=key.dtype, device=device)
        batch[key.name] = _broadcast(tensor, tp_src_rank, tp_group)

    per_token = {name: t for name, t in batch.items() if BATCH_KEYS[name].per_token}
    for name in keep_full:
        batch[f"{name}_full"] = batch[name]
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        # cp_group must be explicit: megatron treats None as the whole world.
        per_token = get_batch_on_this_cp_rank(per_token, is_hybrid_cp=False, cp_group=cp_group)
    batch.update(per_token)
    return batch
