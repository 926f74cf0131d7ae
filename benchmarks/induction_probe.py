"""Can a small model learn to copy by content? A plain-PyTorch reference, independent of megatron.

    python tools/build_planted_data.py --source data/demo/train_text_document \
        --tokenizer-model data/demo/tokenizer/tokenizer.model --out /tmp/copy --length 256 \
        --records 1 --value-length 62 --min-distance 64 --max-distance 192 --num-docs 12000 \
        --seed 1 --random-filler
    python benchmarks/induction_probe.py --data /tmp/copy --steps 700

A 2-layer Llama-style model (RMSNorm, RoPE, SwiGLU, hidden 128, 4 heads: the shapes of the
long-range study's phase 1, docs/study.md) trained with AdamW on documents whose every token is
random but for one repeated record. It prints the training loss every 50 steps: ln |alphabet|
(4.85 for 128 words) means nothing is copied, and the loss falls toward (1 - 62/256) x 4.85 =
3.7 once an induction head copies the repeat. Same data as pretrain_tw.py reads, so a result
that differs from megatron's would point at the training path, not at the task.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x [b, h, s, d] rotated by position (half-split layout, as megatron's RoPE)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angle = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv[None]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(
            2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ffn: int,
                 tie: bool = False, init_std: float = 0.02):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=init_std)
        if tie:
            self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [b, s] -> [b, s, vocab]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="IndexedDataset prefix of equal-length documents")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--bos", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--tie", action="store_true", help="tie the output layer to the embedding")
    args = p.parse_args(argv)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    torch.manual_seed(args.seed)
    ds = IndexedDataset(args.data, mmap=True)
    docs = torch.from_numpy(numpy.stack([numpy.asarray(ds[i], dtype=numpy.int64)
                                         for i in range(len(ds))]))
    model = TinyLM(args.vocab, args.hidden, args.layers, args.heads, args.ffn, args.tie,
                   args.init_std)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start = time.time()
    for step in range(args.steps):
        labels = docs[torch.randint(0, len(docs), (args.batch,))]
        ids = torch.cat([torch.full((args.batch, 1), args.bos), labels[:, :-1]], dim=1)
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:  # 20 warm-up steps, then constant, as the study
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
