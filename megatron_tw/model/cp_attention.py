"""Core attention for the local (non-Transformer-Engine) spec, with context parallelism.

megatron-core's local ``DotProductAttention`` asserts ``context_parallel_size == 1``; only TE's
attention implements CP. This module gives the local spec the same mathematics as TE's
``all_gather`` CP mode: every CP rank all-gathers K and V of the whole sequence (the backward pass
sums the K/V gradients back to their owners), and its queries attend under a causal mask built
from *global* token positions, so the result equals single-rank attention exactly (up to float
rounding). It also serves CP = 1 and sliding-window attention (``config.window_size``), which the
short-context scorer uses: a query at position p sees keys p-left .. p.

It is meant for CPU runs and tests. On GPUs the TE spec provides fused kernels and ring (p2p)
communication; this module gathers K/V of size [s, b, ng, hn] per layer and, for causal attention, keeps
nothing quadratic in s (chunk_attention.py); so does the forward-only sliding-window pass of the
short-context scorer (with gradients, sliding windows use a [s/CP, s] mask).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_tw.data.cp_layout import load_balanced_positions, query_runs
from megatron_tw.model.chunk_attention import chunk_causal_attention, sliding_window_attention


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` in rank order; backward returns this rank's slice
    of the summed gradient (every rank's queries may use every rank's keys)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # gloo has no reduce_scatter: all-reduce and keep this rank's slice (same result).
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _to_global_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[cp * s_local, ...] in rank order (each rank: chunks r, 2cp-1-r) -> [s, ...] in sequence
    order."""
    chunks = gathered.chunk(2 * cp_size, dim=0)  # rank r contributed chunks 2r, 2r+1 here
    ordered = [None] * (2 * cp_size)
    for r in range(cp_size):
        ordered[r] = chunks[2 * r]
        ordered[2 * cp_size - 1 - r] = chunks[2 * r + 1]
    return torch.cat(ordered, dim=0)


class ContextParallelDotProductAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec (same constructor and forward signature as
    megatron's ``DotProductAttention``). Shapes: query [sq, b, np, hn], key/value [sk, b, ng, hn]
    (sq = sk = s / CP on each rank); output [sq, b, np * hn]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, sink: bool = False):
        super().__init__(config=config)
        # With a window: key 0 (the sequence's first token) stays visible to every query, the
        # attention sink of a model trained with full attention (the sliding-mode scorer).
        self.sink = sink
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"{type(self).__name__} implements causal attention only, got "
                             f"{attn_mask_type}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # (left, right) like TE: a query at p sees keys in [p - left, p]; right must be 0 (causal).
        self.window = config.window_size
        if self.window is not None and self.window[1] not in (0, -1):
            raise ValueError("causal sliding-window attention needs window_size (left, 0)")

    def _blockwise_window(self, q: torch.Tensor, dropout: float) -> bool:
        """The forward-only blockwise kernel serves this call: no gradient, no dropout, a finite
        window (the scoring pass, on the CPU or CUDA)."""
        return not torch.is_grad_enabled() and dropout == 0.0 and self.window[0] >= 0

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None and self.window[0] >= 0:
            allowed &= k_pos[None, :] >= q_pos[:, None] - self.window[0]
            if self.sink:
                allowed |= k_pos[None, :] == 0
        return allowed  # [sq, sk] bool, True = attend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need the Transformer Engine "
                             "spec (--transformer-impl transformer_engine)")
        sq = query.shape[0]
        cp = self.cp_group.size() if self.cp_group is not None else 1
        rank = self.cp_group.rank() if cp > 1 else 0
        if cp > 1:
            key = _to_global_order(_AllGatherSeq.apply(key, self.cp_group), cp)
            value = _to_global_order(_AllGatherSeq.apply(value, self.cp_group), cp)
        runs = query_runs(sq, cp, rank)

        # grouped-query attention: SDPA shares each K/V head without expanding it (enable_gqa)
        gqa = self.heads > self.groups
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            if self.window is not None and self._blockwise_window(q, dropout):
                # the scoring pass: blocks of queries, nothing of size [sq, sk]
                out = torch.cat([sliding_window_attention(
                    q[:, :, a:e], k, v, start, self.window[0], self.softmax_scale, self.sink)
                    for a, e, start in runs], dim=2)
            elif self.window is not None:  # with gradients or dropout: an explicit mask
                q_pos = (load_balanced_positions(sq, cp, rank, query.device) if cp > 1
                         else torch.arange(sq, device=query.device))
                k_pos = torch.arange(key.shape[0], device=query.device)
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=self._mask(q_pos, k_pos), dropout_p=dropout,
                    scale=self.softmax_scale, enable_gqa=gqa)
            elif cp == 1 and sq == k.shape[2]:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
            elif cp == 1:  # a KV cache (decoding): the queries are the last sq of the sk keys.
                # SDPA's is_causal aligns the mask upper-left (query i sees keys 0..i), wrong for
                # sq < sk; the lower-right alignment is chunk_causal_attention's.
                out = chunk_causal_attention(q, k, v, self.softmax_scale, dropout)
            else:  # each local chunk attends to the keys up to its end, causal lower-right,
                # with no [s/CP, s] mask materialised (see chunk_attention)
                out = torch.cat([chunk_causal_attention(
                    q[:, :, a:e], k[:, :, :start + e - a], v[:, :, :start + e - a],
                    self.softmax_scale, dropout) for a, e, start in runs], dim=2)
        # [b, n, sq, h] -> [sq, b, n * h]
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], -1)
