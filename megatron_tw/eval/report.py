"""Evaluation output: the results JSON, a markdown summary and PNG plots, for one model or several.

``results`` is the dict ``tools/evaluate.py`` writes to ``results.json``:

    {"model": {...}, "config": {...}, "loss_by_position": {...}, "ppl_vs_context": {...},
     "long_ppl": {...}, "short_ppl": {...}, "tasks": {task: {length: {...}}}, "needle_grid": {...}}

(any section may be missing). Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence


def write_json(results: dict, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, allow_nan=True)
    os.replace(tmp, path)
    return path


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fmt(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def task_average(tasks: Mapping, length: str) -> Optional[float]:
    scores = [cells[length]["score"] for cells in tasks.values()
              if length in cells and "score" in cells[length]]
    return sum(scores) / len(scores) if scores else None


def _task_lengths(tasks: Mapping) -> list[str]:
    return sorted({length for cells in tasks.values() for length in cells}, key=int)


def markdown(results: dict, title: Optional[str] = None) -> str:
    """A human-readable summary of one model's results."""
    lines = [f"# {title or results.get('model', {}).get('name', 'evaluation')}", ""]
    model = results.get("model", {})
    if model:
        lines += [f"model: `{model.get('path')}` ({model.get('type')}); tokenizer "
                  f"`{model.get('tokenizer')}`", ""]
    lines += _perplexity_section(results)
    tasks = results.get("tasks")
    if tasks:
        lengths = _task_lengths(tasks)
        lines += ["## Synthetic tasks (string_match_all, %)", "",
                  "| task | " + " | ".join(lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for task, cells in tasks.items():
            row = [_fmt(cells.get(L, {}).get("score"), 1) for L in lengths]
            lines.append(f"| {task} | " + " | ".join(row) + " |")
        lines.append("| **average** | " + " | ".join(_fmt(task_average(tasks, L), 1)
                                                    for L in lengths) + " |")
        lines.append("")
    grid = results.get("needle_grid")
    if grid:
        lines += [f"## Needle grid: {grid['task']} (length x depth %, {grid['samples']} samples "
                  "per cell)", "",
                  "| length | " + " | ".join(f"{d:g}%" for d in grid["depths"]) + " |",
                  "|---|" + "---|" * len(grid["depths"])]
        for length, row in zip(grid["lengths"], grid["scores"]):
            lines.append(f"| {length} | " + " | ".join(_fmt(s, 0) for s in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _perplexity_section(results: dict) -> list[str]:
    lines = []
    pos = results.get("loss_by_position")
    if pos:
        lines += [f"## Perplexity on held-out text ({pos['sequences']} sequences of "
                  f"{pos['length']} tokens)", "",
                  f"- perplexity at full context: **{_fmt(pos['ppl'])}** (loss {_fmt(pos['loss'], 4)})"]
        sp = results.get("short_ppl")
        if sp:
            lines.append(f"- short-context perplexity ({sp['length']}-token sequences): "
                         f"**{_fmt(sp['ppl'])}**")
        lp = results.get("long_ppl")
        if lp:
            lines.append(f"- LongPPL (key tokens by {lp.get('scorer', 'self')} at W={lp['window']}"
                         f", {lp['mode']}): **{_fmt(lp['long_ppl'])}** on {lp['key_tokens']} key "
                         f"tokens ({_fmt(100 * lp['key_fraction'])}%); other tokens "
                         f"{_fmt(lp['other_ppl'])}")
        lines += ["", "Loss by position (mean over sequences, per bucket of positions):", "",
                  "| positions | " + " | ".join(f"{a}-{b - 1}" for a, b in
                                                zip(pos["bucket_edges"][:-1],
                                                    pos["bucket_edges"][1:])) + " |",
                  "|---|" + "---|" * len(pos["bucket_loss"]),
                  "| loss | " + " | ".join(_fmt(x, 3) for x in pos["bucket_loss"]) + " |", ""]
    ctx = results.get("ppl_vs_context")
    if ctx:
        by = ctx["by_length"]
        lines += [f"Perplexity vs context length (the same {ctx['span']} tokens):", "",
                  "| context | " + " | ".join(by) + " |", "|---|" + "---|" * len(by),
                  "| ppl | " + " | ".join(_fmt(v["ppl"]) for v in by.values()) + " |", ""]
    return lines


def comparison_markdown(runs: Mapping[str, dict]) -> str:
    """One table row per model: perplexities, LongPPL and the task averages per length."""
    lengths = sorted({L for r in runs.values() for L in _task_lengths(r.get("tasks", {}))}, key=int)
    head = ["model", "ppl (full ctx)", "short-ctx ppl", "LongPPL", "key tokens"]
    head += [f"tasks avg @{L}" for L in lengths]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in runs.items():
        pos, sp, lp = r.get("loss_by_position", {}), r.get("short_ppl", {}), r.get("long_ppl", {})
        row = [name, _fmt(pos.get("ppl")), _fmt(sp.get("ppl")), _fmt(lp.get("long_ppl")),
               str(lp.get("key_tokens", "-"))]
        row += [_fmt(task_average(r.get("tasks", {}), L), 1) for L in lengths]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_by_position(runs: Mapping[str, dict], path: str,
                          marks: Sequence[int] = ()) -> Optional[str]:
    """Smoothed mean loss against token position, one line per model; dashed lines at ``marks``
    (e.g. the training contexts)."""
    curves = {n: r["loss_by_position"] for n, r in runs.items() if r.get("loss_by_position")}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pos in curves.items():
        per = pos["per_position"]
        window = max(1, len(per) // 32)
        ax.plot(range(1, len(per) + 1), _smooth(per, window), label=name, linewidth=1.4)
    for m in marks:
        ax.axvline(m, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("token position (tokens of context)")
    ax.set_ylabel("mean loss (nats), running mean")
    ax.set_title("Held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppl_vs_context(runs: Mapping[str, dict], path: str) -> Optional[str]:
    data = {n: r["ppl_vs_context"]["by_length"] for n, r in runs.items() if r.get("ppl_vs_context")}
    if not data:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, by in data.items():
        xs = [int(c) for c in by]
        ax.plot(xs, [by[c]["ppl"] for c in by], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Held-out perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_needle_heatmap(grid: dict, path: str, title: Optional[str] = None) -> str:
    """Score (0-100) per (context length, needle depth), green = found."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid["depths"]),
                                    1.4 + 0.6 * len(grid["lengths"])))
    values = [[float("nan") if s is None else s for s in row] for row in grid["scores"]]
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(grid["depths"])), [f"{d:g}%" for d in grid["depths"]])
    ax.set_yticks(range(len(grid["lengths"])), [str(L) for L in grid["lengths"]])
    for i, row in enumerate(grid["scores"]):
        for j, s in enumerate(row):
            ax.text(j, i, "-" if s is None else f"{s:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title or f"{grid['task']}: string_match_all")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: str, marks: Sequence[int] = ()) -> dict:
    """results.json, results.md and the plots of one model into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    name = results.get("model", {}).get("name", "model")
    paths = {"json": write_json(results, os.path.join(out_dir, "results.json"))}
    loss = plot_loss_by_position({name: results}, os.path.join(out_dir, "loss_by_position.png"),
                                 marks)
    ctx = plot_ppl_vs_context({name: results}, os.path.join(out_dir, "ppl_vs_context.png"))
    if results.get("needle_grid"):
        paths["needle_heatmap"] = plot_needle_heatmap(
            results["needle_grid"], os.path.join(out_dir, "needle_heatmap.png"),
            f"{name}: {results['needle_grid']['task']}")
    paths.update({k: v for k, v in (("loss_by_position", loss), ("ppl_vs_context", ctx)) if v})
    md = markdown(results)
    pics = [f"![{k}]({os.path.basename(v)})" for k, v in paths.items() if v.endswith(".png")]
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(md + ("\n" + "\n".join(pics) + "\n" if pics else ""))
    paths["markdown"] = md_path
    return paths
