"""``--tw-dump-weights DIR``: write the token weights training used, to look at offline.

Every ``--tw-dump-weights-interval`` iterations (and at the first), each micro-batch's weights are
written next to what they came from, one file per micro-batch and rank that computes the loss
(tensor-parallel rank 0 of the last pipeline stage; every data- and context-parallel rank):

    DIR/iter_<iteration>/dp<d>_cp<c>_mb<m>.npz
        sample_id [b]            the dataset's sample ids (long-document windows: the window id)
        position_ids [b, s/CP]   global positions of this CP rank's tokens
        weights, long_loss, loss_mask [b, s/CP], short_loss [b, s/CP] when the weighting has one

Rows of one sample from all CP ranks together cover its sequence once (reassemble by
``position_ids``). The copy to host is a device sync, on dump iterations only; other iterations
pay one integer test per micro-batch.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy
import torch

_counters: dict[int, int] = {}  # iteration -> micro-batches written so far on this rank


def dump_due(args, iteration: int) -> bool:
    """Whether this iteration's weights are written (``args.tw_dump_weights`` set)."""
    folder = getattr(args, "tw_dump_weights", None)
    return bool(folder) and (iteration == 0 or iteration % args.tw_dump_weights_interval == 0)


def dump_weights(folder: str, iteration: int, ranks: dict[str, int], *, sample_id: torch.Tensor,
                 position_ids: torch.Tensor, weights: torch.Tensor, long_loss: torch.Tensor,
                 loss_mask: torch.Tensor, short_loss: Optional[torch.Tensor] = None) -> str:
    """Write one micro-batch (shapes in the module docstring); returns the file's path."""
    micro = _counters.get(iteration, 0)
    _counters.clear()  # only the current iteration's count is ever needed
    _counters[iteration] = micro + 1
    out = os.path.join(folder, f"iter_{iteration:07d}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"dp{ranks['dp']}_cp{ranks['cp']}_mb{micro}.npz")
    arrays = {"sample_id": sample_id, "position_ids": position_ids, "weights": weights,
              "long_loss": long_loss, "loss_mask": loss_mask}
    if short_loss is not None:
        arrays["short_loss"] = short_loss
    numpy.savez(path, **{k: v.detach().float().cpu().numpy() if v.is_floating_point()
                         else v.detach().cpu().numpy() for k, v in arrays.items()})
    return path
