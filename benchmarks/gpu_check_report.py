"""The table of benchmarks/gpu_check.py: a Row (one line of the table: section, name, status,
seconds, figures, error), a pretrain row's figures as text, and the markdown table with its
header, warnings and (dry run) commands.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Optional

from gpu_check_commands import windows_setting
from gpu_check_machine import MODELS, matmul_params, total_params

SECTIONS = ("setup", "attention", "pretrain", "evaluate")  # the table's, in this order


@dataclass
class Row:
    section: str
    name: str
    status: str = "ok"  # ok | failed | skipped | dry run
    seconds: Optional[float] = None
    numbers: str = ""
    error: str = ""
    data: dict = field(default_factory=dict)
    order: float = 0  # place in its section of the table (steps may finish in any order)

    def fail(self, why: str) -> "Row":
        self.status, self.error = "failed", why
        return self

    def skip(self, why: str) -> "Row":
        self.status, self.error = "skipped", why
        return self


def _g(value: float) -> str:
    """Three significant digits for small numbers (tiny CPU runs), else one decimal."""
    return format(value, ".3g") if abs(value) < 10 else format(value, ".1f")


def pretrain_numbers(row: Row) -> str:
    d = row.data
    parts = []
    if d.get("losses"):
        parts.append(f"lm loss {d['losses'][0]:.4g} -> {d['losses'][-1]:.4g}")
    if d.get("step_ms") is not None:
        parts.append(f"step {_g(d['step_ms'])} ms")
        parts.append(f"{d['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{_g(d['tflops'])} TFLOP/s")
        parts.append(f"MFU {d['mfu']:.1%}" if d.get("mfu") is not None else "MFU -")
    if d.get("vs_uniform") is not None:
        parts.append(f"x{d['vs_uniform']:.3f} uniform")
    if d.get("syncs_per_step") is not None:
        parts.append(f"syncs/step {d['syncs_per_step']:g} ({d['syncs']})")
    elif d.get("step_ms") is not None:
        parts.append("syncs/step -")
    if d.get("max_alloc_mb"):
        parts.append(f"peak {d['max_alloc_mb'] / 1024:.1f} GiB")
    if d.get("impl"):
        parts.append(d["impl"])
    return ", ".join(p for p in parts if p)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], args, info: dict) -> str:
    shape = MODELS[args.model].shape
    ww, ss = windows_setting(args.seq_length)
    vocab = next((r.data["padded_vocab"] for r in rows if r.data.get("padded_vocab")),
                 shape.vocab_size)
    lines = [f"# GPU check: {info['device']}, model {args.model} "
             f"({total_params(shape, vocab) / 1e6:,.1f}M parameters), seq {args.seq_length}, "
             f"global batch {args.global_batch_size}, {args.iters} iterations "
             f"(step time: median after {args.warmup})", "",
             f"- pretrain: bf16, one process, --mock-data, lr {args.lr:g}; sliding rows W = "
             f"{args.short_context}, windows row W = {ww} S = {ss}; FP8 hybrid/{args.fp8_recipe}",
             "- TFLOP/s = (6 N T + 6 L s d_attn T) / step time, "
             f"N = {matmul_params(shape, vocab):,}, "
             f"T = {args.global_batch_size * args.seq_length:,} tokens per step; MFU against the "
             "dense peak; syncs/step from torch.cuda.set_sync_debug_mode(\"warn\") after "
             "iteration 1", "",
             "| section | name | status | time (s) | numbers | error |",
             "|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SECTIONS)}
    for r in sorted(rows, key=lambda r: (order[r.section], r.order)):
        secs = "-" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"| {r.section} | {_cell(r.name)} | {r.status} | {secs} | "
                     f"{_cell(r.numbers or '-')} | {_cell(r.error or '')} |")
    for r in rows:
        if (r.data.get("params") is not None
                and r.data["params"] != r.data.get("params_formula")):
            lines.append(f"\nwarning: {r.name}: megatron reports {r.data['params']:,} "
                         f"parameters, the FLOP formula assumes {r.data['params_formula']:,}")
    for r in rows:
        if "command" in r.data:
            lines.append(f"\n{r.section} / {r.name}:\n    " + shlex.join(r.data["command"]))
    return "\n".join(lines) + "\n"
