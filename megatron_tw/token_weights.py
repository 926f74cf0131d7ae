"""Glue between a micro-batch, the short-context scorer and the weighting (METHOD.md steps 1-2).

``build_weight_fn(args, batch)`` returns the callable the loss function applies to the trainee's
long-context losses, or ``None`` for the uniform baseline, in which case the loss is the stock
megatron loss bit for bit.
"""

from __future__ import annotations


def build_weight_fn(args, batch):
    config = getattr(args, "tw_weighting", None)
    if config is None or config.is_uniform:
        return None
    raise NotImplementedError("non-uniform weighting is wired in megatron_tw.token_weights")
