"""The token-weighted loss function in megatron's per-token contract.

Returns ``(loss_sum, num_tokens, report)``: megatron sums ``loss_sum`` and ``num_tokens`` over
micro-batches and over the data-parallel x context-parallel ranks and divides once
(``--calculate-per-token-loss``), so the optimised quantity is
``sum_i w_i * mask_i * L_long[i] / sum_i mask_i`` over the global batch (docs/method.md).
With weights ``None`` (the uniform preset) it is exactly the stock pretrain_gpt loss.

Every micro-batch's per-token losses, weights and loss sum are checked for NaN/Inf, and its token
count is recorded for the optimizer-step guard (megatron_tw/reliability/guard.py, ``--tw-nonfinite``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_tw.reliability import check_finite, count_loss_tokens

# Builds (weights [b, s_local] or None, report dict) from the long-context losses of one micro-batch.
WeightFn = Callable[[torch.Tensor], tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]]


def token_weighted_loss(loss_mask: torch.Tensor, weight_fn: Optional[WeightFn],
                        output_tensor: torch.Tensor):
    """megatron ``loss_func``.

    Args:
        loss_mask: [b, s_local] 0/1 mask of this CP rank's positions.
        weight_fn: long_loss [b, s_local] (detached) -> (weights [b, s_local] or None, report);
            ``None`` means uniform weights.
        output_tensor: [b, s_local] per-token cross-entropy of the trainee (vocab-parallel: no rank
            ever materialised full-vocabulary logits for the sequence).

    Returns:
        loss_sum (scalar, differentiable), num_tokens (int scalar: local sum of the mask), report
        (name -> [numerator, denominator], reduced over DP x CP by megatron).
    """
    losses = output_tensor.float()
    mask = loss_mask.float()
    # The trainee's own losses first: when they are not finite, everything derived from them
    # (self-scored short losses, weights) is not either, and the report should name the source.
    finite = check_finite("loss", losses.detach(), loss_mask.detach())
    lm_loss = torch.sum(losses.view(-1) * mask.view(-1))
    num_tokens = mask.sum().clone().detach().to(torch.int)
    count_loss_tokens(num_tokens)
    report = {"lm loss": torch.cat([lm_loss.clone().detach().view(1), num_tokens.view(1)])}
    loss = lm_loss
    if weight_fn is not None:
        weights, stats = weight_fn(losses.detach())
        if weights is not None:
            # Only tokens in the loss count (compute_token_weights gives the others weight 0).
            finite &= check_finite("token weights", weights.detach(), loss_mask.detach())
            loss = torch.sum(losses.view(-1) * weights.view(-1) * mask.view(-1))
            report["weighted loss"] = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
        report.update(stats)
    if finite:  # a sum of finite terms can still overflow
        check_finite("loss", loss.detach())
    return loss, num_tokens, report
