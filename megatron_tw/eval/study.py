"""Evaluation and report of the long-range study (tools/long_range_study.py, docs/study.md).

Every checkpoint is scored in this one process (one model at a time, megatron_backend): the
held-out planted documents at 4W (megatron_tw/eval/planted.py: recurrence values beyond W and
within W, natural tokens, retrieval), natural held-out text at W (short-context perplexity),
and the weights each run trained with (its --tw-dump-weights files).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Optional

import numpy

from megatron_tw.data.planted import PlantTable, document_bounds, natural_chunks
from megatron_tw.eval.planted import dumped_weight_stats, label_scores, record_metrics



def load_documents(prefix: str) -> numpy.ndarray:
    """Every document of an IndexedDataset whose documents share one length: int64 [N, s]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return numpy.stack([numpy.asarray(ds[i], dtype=numpy.int64) for i in range(len(ds))])


def natural_documents(prefix: str, length: int, count: int) -> numpy.ndarray:
    """The first ``count`` ``length``-token chunks of a natural-text IndexedDataset [count, s]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    tokens = numpy.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    bounds = document_bounds(ds.sequence_lengths, ds.document_indices)
    chunks = natural_chunks(tokens, bounds, length)
    return numpy.stack([next(chunks) for _ in range(count)])


def _iterations(folder: str) -> list[int]:
    return sorted(int(m.group(1)) for m in (re.search(r"iter_(\d+)$", p)
                                            for p in glob.glob(os.path.join(folder, "iter_*")))
                  if m)


def _scores(folder: str, iteration: int, docs: numpy.ndarray, vocab: int, bos: int):
    from megatron_tw.eval.megatron_backend import MegatronBackend

    with MegatronBackend.from_checkpoint(folder, vocab_size=vocab, iteration=iteration,
                                         max_length=docs.shape[1]) as backend:
        return label_scores(backend.logits, docs, bos, vocab)


def check_copying(study) -> dict:
    """Phase 1's gate: the phase-1 model's copy gap within W (held-out, fresh values); no gate
    when the study's ``min_copy_gap`` is 0 (--quick)."""
    path = study.path("copy.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    else:
        vocab, bos = _vocab(study)
        docs = load_documents(study.path("data", "heldout_short"))
        table = PlantTable.load(study.path("data", "heldout_short_plants.npz"))
        loss, hit = _scores(study.path("pretrain"), None, docs, vocab, bos)
        result = record_metrics(loss, hit, table)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    study.stamp(f"phase 1 copies within W: held-out loss {result['first']:.2f} nats at a first "
                f"occurrence, {result['dependent']:.2f} at the recurrence (gap "
                f"{result['copy_gap']:.2f}, {result['tokens']['dependent']} tokens), exact "
                f"recall {100 * result['retrieval']:.0f}%")
    if study.cfg["min_copy_gap"] > 0 and result["copy_gap"] < study.cfg["min_copy_gap"]:
        raise SystemExit(f"long_range_study.py: the phase-1 model does not copy within W (gap "
                         f"{result['copy_gap']:.2f} < {study.cfg['min_copy_gap']} nats): phase 2 "
                         "would have nothing to extend; train the drill longer (remove "
                         f"{study.path('drill')} and {study.path('pretrain')} and raise "
                         "drill_iters, e.g. --set drill_iters=6000)")
    return result


def _vocab(study) -> tuple[int, int]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=study.tokenizer)
    return sp.get_piece_size(), sp.bos_id()


def evaluate_study(study) -> dict:
    """Score every run's checkpoints; write OUT/results.json, OUT/summary.md, OUT/curve.png."""
    cfg, short = study.cfg, study.cfg["short"]
    vocab, bos = _vocab(study)
    docs = load_documents(study.path("data", "heldout_long"))
    table = PlantTable.load(study.path("data", "heldout_long_plants.npz"))
    natural = natural_documents(os.path.join(study.args.data, "heldout_text_document"), short,
                                cfg["natural_sequences"])
    extend_table = PlantTable.load(study.path("data", "extend_plants.npz"))
    n_extend = study.sets["extend"].docs
    tokens_per_iter = cfg["extend_batch"] * study.long
    cache_path = study.path("eval_cache.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)

    def scored(name: str, iteration: Optional[int], final: bool) -> dict:
        key = f"{name}@{iteration}"
        if key not in cache:
            folder = study.path(name)
            loss, hit = _scores(folder, iteration, docs, vocab, bos)
            entry = record_metrics(loss, hit, table, far_from=short)
            if final:
                nat_loss, _ = _scores(folder, iteration, natural, vocab, bos)
                entry["short_ppl"] = float(math.exp(nat_loss.mean()))
            cache[key] = entry
            with open(cache_path, "w") as f:
                json.dump(cache, f)
        return cache[key]

    results = {"config": {k: v for k, v in cfg.items()}, "long": study.long, "runs": {}}
    base = scored("pretrain", None, True)
    results["base"] = base
    for name, preset, scorer, seed in study.runs():
        iters = _iterations(study.path(name))
        curve = [(0, base["dependent_far"])]
        for it in iters[:-1]:
            curve.append((it * tokens_per_iter, scored(name, it, False)["dependent_far"]))
        final = scored(name, iters[-1], True)
        curve.append((iters[-1] * tokens_per_iter, final["dependent_far"]))
        run = {"preset": preset, "scorer": scorer, "seed": seed, "final": final,
               "curve": curve}
        weights_dir = study.path(name, "weights")
        if os.path.isdir(weights_dir):
            run["weights"] = {}
            for step_dir in sorted(glob.glob(os.path.join(weights_dir, "iter_*"))):
                files = sorted(glob.glob(os.path.join(step_dir, "*.npz")))
                step = int(step_dir.rsplit("_", 1)[1])
                run["weights"][step] = dumped_weight_stats(files, extend_table, n_extend,
                                                           study.long, far_from=short)
        results["runs"][name] = run
        study.stamp(f"evaluated {name}: far {final['dependent_far']:.3f}, natural "
                    f"{final['natural']:.3f}, retrieval {100 * final['retrieval_far']:.1f}%")
    results["table"] = aggregate(results)
    with open(study.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(study.path("summary.md"), "w") as f:
        f.write(render_summary(results, short))
    plot_curves(results, study.path("curve.png"), short)
    return results


def _config(run: dict) -> str:
    return run["preset"] if not run["scorer"] else f"{run['preset']} ({run['scorer']})"


# "first": the first occurrence's values, the no-copying reference of the two recurrence columns
METRICS = ("dependent_far", "dependent_near", "first", "natural", "short_ppl", "retrieval_far")
WEIGHT_METRICS = ("share_far", "tokens_far", "mean_far", "effective", "zero")


def aggregate(results: dict) -> dict:
    """config -> metric -> (mean, std over seeds, n); weights at the last dumped step."""
    groups: dict[str, list] = {}
    for run in results["runs"].values():
        groups.setdefault(_config(run), []).append(run)
    table = {}
    for config, runs in groups.items():
        row = {}
        for metric in METRICS:
            values = numpy.array([r["final"][metric] for r in runs], dtype=numpy.float64)
            row[metric] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1
                           else 0.0, len(values))
        for when in ("first", "last"):
            stats = []
            for r in runs:
                if "weights" in r and r["weights"]:
                    steps = sorted(r["weights"], key=int)
                    stats.append(r["weights"][steps[0] if when == "first" else steps[-1]])
            for metric in WEIGHT_METRICS:
                if stats:
                    values = numpy.array([s[metric] for s in stats])
                    row[f"w_{when}_{metric}"] = (float(values.mean()),
                                                 float(values.std(ddof=1)) if len(values) > 1
                                                 else 0.0, len(values))
        table[config] = row
    return table


def _pm(cell, digits: int = 3, scale: float = 1.0) -> str:
    mean, std, n = cell
    if n > 1:
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f}"


ORDER = ("uniform", "dense (frozen)", "dense (self)", "sparse (frozen)", "sparse (self)",
         "longce (frozen)", "longce (self)")


def render_summary(results: dict, short: int) -> str:
    base, table = results["base"], results["table"]
    long = results["long"]
    tokens = base["tokens"]
    lines = [
        f"Held-out: {tokens['records']} records ({tokens['dependent_far']} recurrence-value "
        f"tokens beyond W={short}, {tokens['dependent_near']} within), {tokens['natural']} "
        f"natural tokens at {long} tokens; short-context perplexity on natural text at {short} "
        "tokens. A recurrence copies when its loss is below the first occurrence's (no copying: "
        "about ln |alphabet|). Mean ± std over seeds.", "",
        f"| model | loss beyond W | loss within W | first occurrence | loss natural | "
        f"short-ctx ppl ({short}) | retrieval beyond W (%) |",
        "|---|---|---|---|---|---|---|",
        f"| base ({short}) | {base['dependent_far']:.3f} | {base['dependent_near']:.3f} | "
        f"{base['first']:.3f} | {base['natural']:.3f} | {base['short_ppl']:.2f} | "
        f"{100 * base['retrieval_far']:.1f} |",
    ]
    for config in [c for c in ORDER if c in table]:
        row = table[config]
        lines.append(f"| {config} | {_pm(row['dependent_far'])} | {_pm(row['dependent_near'])} | "
                     f"{_pm(row['first'])} | {_pm(row['natural'])} | {_pm(row['short_ppl'], 2)} | "
                     f"{_pm(row['retrieval_far'], 1, 100)} |")
    lines += ["", "Weights the training used (the first and the last step; share of the summed "
              "weight on recurrence values beyond W, their share of the tokens, their mean "
              "weight relative to the mean, effective tokens, zero-weight tokens):", "",
              "| run | step | weight share beyond-W values | token share | relative weight | "
              "effective tokens | zero weight |", "|---|---|---|---|---|---|---|"]
    for config in [c for c in ORDER if c in table]:
        row = table[config]
        for when in ("first", "last"):
            if f"w_{when}_share_far" not in row:
                continue
            lines.append(
                f"| {config} | {when} | {_pm(row[f'w_{when}_share_far'], 1, 100)}% | "
                f"{_pm(row[f'w_{when}_tokens_far'], 1, 100)}% | "
                f"{_pm(row[f'w_{when}_mean_far'], 2)} | {_pm(row[f'w_{when}_effective'], 2)} | "
                f"{_pm(row[f'w_{when}_zero'], 2)} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: str, short: int) -> None:
    """Held-out loss on recurrence values beyond W against training tokens, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list] = {}
    for run in results["runs"].values():
        groups.setdefault(_config(run), []).append(run["curve"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in [c for c in ORDER if c in groups]:
        curves = numpy.array(groups[config], dtype=numpy.float64)  # [seeds, points, 2]
        x = curves[0, :, 0] / 1e6
        mean, std = curves[:, :, 1].mean(0), curves[:, :, 1].std(0)
        style = "--" if "frozen" in config else "-"
        line, = ax.plot(x, mean, style, marker="o", ms=3, label=config)
        if len(curves) > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens in phase 2 (millions)")
    ax.set_ylabel(f"held-out loss on values beyond W={short} (nats)")
    ax.set_title("learning the long-range dependencies (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
