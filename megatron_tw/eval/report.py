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
import re
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
                         f"{_fmt(lp['other_ppl'])}; mean gain log p_long - log p_short beyond "
                         f"W: {_fmt(lp.get('mean_gain_beyond_window'), 4)} nats")
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


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|(.*)")
_FIELD = re.compile(r"([a-zA-Z][a-zA-Z0-9 ._()-]*?):\s+([-+0-9.eE]+|nan|inf)\s*\|")


def training_summary(log_path: str, last: int = 5) -> dict:
    """From a pretrain_tw.py console log: iterations run, mean time per iteration and the mean of
    the last ``last`` logged values of the lm loss and weighted loss."""
    rows = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _ITERATION.search(line)
            if m:
                fields = {k.strip(): float(v) for k, v in _FIELD.findall(m.group(3) + "|")}
                rows.append((int(m.group(1)), fields))
    if not rows:
        raise ValueError(f"{log_path}: no 'iteration N/M |' lines (not a pretrain_tw.py log?)")
    tail = [f for _, f in rows[-last:]]

    def mean(key):
        values = [f[key] for f in tail if key in f]
        return sum(values) / len(values) if values else None

    times = [f["elapsed time per iteration (ms)"] for _, f in rows
             if "elapsed time per iteration (ms)" in f]
    return {"iterations": rows[-1][0], "lm_loss": mean("lm loss"),
            "weighted_loss": mean("weighted loss"),
            "ms_per_iteration": sum(times) / len(times) if times else None}


def comparison_markdown(runs: Mapping[str, dict]) -> str:
    """One table row per model: perplexities, LongPPL and the task averages per length."""
    lengths = sorted({L for r in runs.values() for L in _task_lengths(r.get("tasks", {}))}, key=int)
    train = any("training" in r for r in runs.values())
    head = ["model"] + (["train lm loss", "s/iter"] if train else [])
    head += ["ppl (full ctx)", "short-ctx ppl", "LongPPL", "key tokens", "gain beyond W"]
    head += [f"tasks avg @{L}" for L in lengths]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in runs.items():
        pos, sp, lp = r.get("loss_by_position", {}), r.get("short_ppl", {}), r.get("long_ppl", {})
        row = [name]
        if train:
            t = r.get("training", {})
            ms = t.get("ms_per_iteration")
            row += [_fmt(t.get("lm_loss"), 3), _fmt(ms / 1000 if ms else None)]
        row += [_fmt(pos.get("ppl")), _fmt(sp.get("ppl")), _fmt(lp.get("long_ppl")),
                str(lp.get("key_tokens", "-")), _fmt(lp.get("mean_gain_beyond_window"), 4)]
        row += [_fmt(task_average(r.get("tasks", {}), L), 1) for L in lengths]
        lines.append("| " + " | ".join(row) + " |")
    lines += _comparison_details(runs)
    return "\n".join(lines) + "\n"


def _comparison_details(runs: Mapping[str, dict]) -> list[str]:
    """Perplexity vs context length, loss by position bucket, task scores: one row per model."""
    lines = []
    ctx = {n: r["ppl_vs_context"]["by_length"] for n, r in runs.items() if r.get("ppl_vs_context")}
    if ctx:
        cols = sorted({c for by in ctx.values() for c in by}, key=int)
        lines += ["", "Perplexity vs context length:", "",
                  "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(by.get(c, {}).get("ppl")) for c in cols) + " |"
                  for n, by in ctx.items()]
    pos = {n: r["loss_by_position"] for n, r in runs.items() if r.get("loss_by_position")}
    if pos:
        edges = next(iter(pos.values()))["bucket_edges"]
        cols = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
        lines += ["", "Mean loss by token position:", "",
                  "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(x, 3) for x in p["bucket_loss"]) + " |"
                  for n, p in pos.items() if p["bucket_edges"] == edges]
    tasks = {n: r["tasks"] for n, r in runs.items() if r.get("tasks")}
    if tasks:
        cells = sorted({(t, L) for ts in tasks.values() for t, by in ts.items() for L in by},
                       key=lambda c: (c[0], int(c[1])))
        lines += ["", "Synthetic tasks (string_match_all, %):", "",
                  "| model | " + " | ".join(f"{t} @{L}" for t, L in cells) + " |",
                  "|---" * (len(cells) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(ts.get(t, {}).get(L, {}).get("score"), 1)
                                           for t, L in cells) + " |" for n, ts in tasks.items()]
    grids = {n: r["needle_grid"] for n, r in runs.items() if r.get("needle_grid")}
    if grids:
        g0 = next(iter(grids.values()))
        cols = [f"{L}/{d:g}%" for L in g0["lengths"] for d in g0["depths"]]
        lines += ["", f"Needle grid {g0['task']} (length/depth):", "",
                  "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_fmt(x, 0) for row in g["scores"] for x in row) + " |"
                  for n, g in grids.items()]
    return lines


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
