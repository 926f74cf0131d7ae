"""weight_statistics: logging quantities for the token weights, in Megatron's report convention.

Megatron's loss function returns a report {name: tensor([numerator, denominator])}; the training
loop sums these over micro-batches and over the data-parallel x context-parallel group, then
logs numerator / denominator. So:
- per-token means contribute [sum over this rank's masked tokens, this rank's token count];
- per-sequence quantities (std, max, effective tokens) need the whole sequence: they are reduced
  over the CP group, and only CP rank 0 contributes [sum over sequences, number of sequences]
  (the other CP ranks contribute [0, 0]), so that summing over ranks counts each sequence once.
  The logged value is then the mean over sequences. Sequences without masked tokens are skipped.
"""

from __future__ import annotations

import torch

from megatron_tw.weighting.comm import cp_max, cp_rank, cp_sum


@torch.no_grad()
def weight_statistics(weights: torch.Tensor, long_loss: torch.Tensor,
                      short_loss: torch.Tensor | None, loss_mask: torch.Tensor,
                      position_ids: torch.Tensor, *, short_context: int,
                      cp_group=None) -> dict[str, torch.Tensor]:
    """Weight statistics of one micro-batch; every value is float32 [2] = [numerator, denom].

    weights, long_loss, short_loss, loss_mask, position_ids: [b, s_local] (this CP rank's tokens;
    position_ids are global positions). short_loss may be None (e.g. uniform weighting without a
    scorer): "long-context gain" is then left out.

    Keys:
      "weight mean"                   per token: sum w / N.
      "weight std"                    per sequence: population std of w over its N tokens.
      "weight max"                    per sequence: max w.
      "effective tokens frac"         per sequence: (sum w)^2 / sum w^2 / N (1 for uniform,
                                      kappa for a binary top-kappa mask).
      "zero weight frac"              per token: share of masked tokens with w == 0.
      "weight share beyond short ctx" per token: sum of w at positions >= short_context / sum w.
      "long-context gain"             per token: mean of L_short - L_long.
    Per-sequence values are reduced over `cp_group` (only); see the module docstring.
    """
    device = weights.device
    valid = loss_mask.detach() != 0
    w = torch.where(valid, weights.detach().to(torch.float64), 0.0)
    count = valid.sum(dim=1, dtype=torch.float64)  # [b], local
    sum_w = w.sum(dim=1)

    # Whole-sequence sums (over the CP group): N, sum w, sum w^2 in one all-reduce.
    seq = cp_sum(torch.stack([count, sum_w, (w * w).sum(dim=1)]), cp_group)
    n_seq, sum_w_seq, sum_w2_seq = seq[0], seq[1], seq[2]
    has_tokens = n_seq > 0
    n_safe = torch.where(has_tokens, n_seq, 1.0)
    mean_seq = sum_w_seq / n_safe
    # Two-pass variance (no cancellation of E[w^2] - E[w]^2 for near-constant weights).
    centered = torch.where(valid, w - mean_seq.unsqueeze(1), 0.0)
    var_seq = cp_sum((centered * centered).sum(dim=1), cp_group) / n_safe
    max_seq = cp_max(torch.where(valid, w, float("-inf")).amax(dim=1), cp_group)
    eff_seq = torch.where(sum_w2_seq > 0,
                          sum_w_seq * sum_w_seq / torch.where(sum_w2_seq > 0, sum_w2_seq, 1.0),
                          0.0) / n_safe

    first = cp_rank(cp_group) == 0
    num_sequences = has_tokens.sum().to(torch.float64)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        if not first:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack([torch.where(has_tokens, values, 0.0).sum(), num_sequences])

    def per_token(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        return torch.stack([numerator.sum(), denominator.sum()])

    beyond = torch.where(position_ids >= short_context, w, 0.0)
    stats = {
        "weight mean": per_token(sum_w, count),
        "weight std": per_sequence(var_seq.clamp(min=0.0).sqrt()),
        "weight max": per_sequence(max_seq),
        "effective tokens frac": per_sequence(eff_seq),
        "zero weight frac": per_token((valid & (w == 0)).sum(dim=1, dtype=torch.float64), count),
        "weight share beyond short ctx": per_token(beyond.sum(dim=1), sum_w),
    }
    if short_loss is not None:
        gain = torch.where(valid, short_loss.detach().to(torch.float64)
                           - long_loss.detach().to(torch.float64), 0.0)
        stats["long-context gain"] = per_token(gain.sum(dim=1), count)
    return {name: value.to(torch.float32) for name, value in stats.items()}
