"""Causal attention of a chunk of queries over the keys up to the chunk's end, with no mask.

Under context parallelism a rank's queries are a chunk at global positions [start, end) and the
keys are positions [0, end): query ``start + i`` sees keys ``0 .. start + i`` (the causal mask
aligned lower-right). On CUDA, SDPA serves ``causal_lower_right`` with fused kernels. On the CPU,
SDPA turns that bias into a dense [chunk, end] mask and keeps it for the backward pass, memory
that grows with the square of the sequence length and does not shrink with CP. The CPU path here
splits the keys into two blocks that need no mask,

    prefix   keys [0, start)    every query sees all of them   (flash kernel, not causal)
    diagonal keys [start, end)  a square causal block          (flash kernel, causal)

and merges the two partial results with their log-sum-exps, as ring attention merges the blocks
it receives: out = sum_b exp(lse_b - lse) * out_b with lse = logaddexp(lse_prefix, lse_diag).
The backward pass runs each block's flash backward with the merged output and log-sum-exp, which
gives exactly the gradient of the full softmax restricted to that block. Saved for backward:
q, k, v, the output and the log-sum-exp, all linear in the sequence length.

Why the private aten ops: SDPA's public API returns no log-sum-exp, and the merge needs it. The
two ops are CPU flash attention's forward and backward as SDPA itself calls them; torch is
pinned exactly (pyproject.toml), and tests/unit/test_chunk_attention.py checks this module
against a float64 softmax reference, so a change of their contract fails there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixDiagonalAttention(torch.autograd.Function):
    """q [b, n, c, h], k/v [b, ng, start + c, h] (ng divides n) -> out [b, n, c, h]."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        start = k.shape[2] - q.shape[2]
        out, lse = _flash_forward(q, k[:, :, start:], v[:, :, start:], 0.0, True, scale=scale)
        if start > 0:
            out_prefix, lse_prefix = _flash_forward(q, k[:, :, :start], v[:, :, :start], 0.0,
                                                    False, scale=scale)
            out, lse = _merge(out_prefix, lse_prefix, out, lse)  # lse [b, n, c], float32
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        start = k.shape[2] - q.shape[2]
        grad_out = grad_out.contiguous()
        dq, dk_diag, dv_diag = _flash_backward(grad_out, q, k[:, :, start:], v[:, :, start:], out,
                                               lse, 0.0, True, scale=ctx.scale)
        if start == 0:
            return dq, dk_diag, dv_diag, None
        dq_prefix, dk_prefix, dv_prefix = _flash_backward(
            grad_out, q, k[:, :, :start], v[:, :, :start], out, lse, 0.0, False, scale=ctx.scale)
        return (dq + dq_prefix, torch.cat([dk_prefix, dk_diag], dim=2),
                torch.cat([dv_prefix, dv_diag], dim=2), None)


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of the queries q [b, n, c, h] at the last c positions of the keys k, v
    [b, ng, end, h] (grouped-query: ng divides n), causal; returns [b, n, c, h]."""
    c, end = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu" and dropout_p == 0.0:
        return _PrefixDiagonalAttention.apply(q, k, v, scale)
    # CUDA: fused kernels take the lower-right causal bias without a dense mask. CPU with
    # attention dropout: the flash blocks above would draw independent dropout masks, so SDPA
    # takes the (dense) mask instead.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, end),
                                          dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Softmax over the union of two disjoint key sets from each set's (output, log-sum-exp)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = (torch.exp(lse_a - lse)[..., None] * out_a.float()
           + torch.exp(lse_b - lse)[..., None] * out_b.float())
    return out, lse


# Queries per block of the sliding-window pass: bounds its [block, block + left] mask.
_MAX_BLOCK = 2048


@torch.no_grad()
def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             left: int, scale: float, sink: bool = False) -> torch.Tensor:
    """Forward-only sliding-window causal attention (the short-context scoring pass), on the CPU
    and on CUDA.

    q [b, n, c, h] are the queries at positions start .. start + c - 1, k/v [b, ng, s, h] the keys
    at positions 0 .. s - 1 (s >= start + c; ng divides n); a query at p sees keys p - left .. p,
    and with ``sink`` also key 0, the sequence's first token, which a model trained with full
    attention uses as an attention sink. Returns [b, n, c, h].

    The queries go in blocks of at most ``min(left, 2048)``; a block at [a, e) attends to the keys
    [a - left, e) (plus key 0) under a [e - a, keys] boolean mask, so nothing of size c x s is
    built and the work per query is about ``block + left`` keys. On CUDA K/V are expanded for
    grouped-query attention per block (SDPA's memory-efficient kernel takes masks but not GQA;
    its flash kernel takes no mask); the CPU kernel shares the K/V heads.
    """
    c, n, ng = q.shape[2], q.shape[1], k.shape[1]
    cuda = q.device.type == "cuda"
    block = max(1, min(max(left, 1), c, _MAX_BLOCK))
    outs = []
    for a in range(0, c, block):
        e = min(a + block, c)
        pa, pe = start + a, start + e  # global query positions [pa, pe)
        lo = max(0, pa - left)
        keys, values = k[:, :, lo:pe], v[:, :, lo:pe]
        query_pos = torch.arange(pa, pe, device=q.device)[:, None]
        key_pos = torch.arange(lo, pe, device=q.device)[None, :]
        mask = (key_pos <= query_pos) & (key_pos >= query_pos - left)  # [e - a, pe - lo]
        if sink and lo > 0:
            keys = torch.cat([k[:, :, :1], keys], dim=2)
            values = torch.cat([v[:, :, :1], values], dim=2)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        elif sink:
            mask[:, 0] = True  # key 0 is in range; keep it visible beyond the window too
        if cuda and n != ng:
            keys = keys.repeat_interleave(n // ng, dim=1)
            values = values.repeat_interleave(n // ng, dim=1)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:e], keys, values, attn_mask=mask,
                                                   scale=scale, enable_gqa=not cuda and n != ng))
    return torch.cat(outs, dim=2)
