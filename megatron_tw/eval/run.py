"""One evaluation run: load a model and its tokenizer, run the requested sections, write the report.

``evaluate(cfg)`` is what ``tools/evaluate.py`` calls; ``cfg`` is its argparse namespace (see the
tool for every field). Sections run only when asked for: perplexity needs ``--heldout``, LongPPL
``--longppl-window``, the synthetic tasks ``--tasks`` and the needle grid ``--needle-task``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import torch

from megatron_tw.eval import perplexity as ppl
from megatron_tw.eval.backends import detect_model_type, load_backend, resolve_device
from megatron_tw.eval.report import write_report
from megatron_tw.eval.ruler import needle_grid, run_tasks
from megatron_tw.eval.tokenizer import TokenizerError, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_tokenizer(model: str, model_type: str) -> str:
    """The model folder's own tokenizer files, else (megatron) the ``--tokenizer-model`` the
    checkpoint was trained with."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if any(os.path.exists(os.path.join(model, n)) for n in names):
        return model
    if model_type == "megatron":
        from megatron_tw.checkpoint import megatron_io

        args = megatron_io.checkpoint_args(megatron_io.checkpoint_data_dir(model))
        path = getattr(args, "tokenizer_model", None)
        if path and os.path.exists(path):
            return path
    raise TokenizerError(f"--model {model}: no tokenizer found with the model; pass --tokenizer "
                         "(a SentencePiece .model file or an HF tokenizer folder)")


def _load(path, model_type, vocab, cfg, max_length):
    return load_backend(path, model_type, vocab_size=vocab, dtype=DTYPES[cfg.dtype],
                        batch_size=cfg.batch_size, max_length=max_length,
                        device=resolve_device(getattr(cfg, "device", "auto")))


def evaluate(cfg, log=print) -> dict:
    """Run the configured sections; write results.json/.md and plots to ``cfg.out``."""
    start = time.perf_counter()
    device = resolve_device(getattr(cfg, "device", "auto"))  # --device cuda without one: fail now
    torch.manual_seed(cfg.seed)
    model_type = cfg.model_type if cfg.model_type != "auto" else detect_model_type(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer(cfg.model, model_type),
                               add_bos=cfg.add_bos)
    tasks = [] if cfg.tasks in (None, "", "none") else cfg.tasks.split(",")
    if tasks == ["all"]:
        from megatron_tw.eval.tasks import DEFAULT_TASKS

        tasks = list(DEFAULT_TASKS)
    longest = max([cfg.ppl_length or 0, *cfg.lengths, *(cfg.needle_lengths or []),
                   *(cfg.ppl_context_lengths or [])])
    results: dict = {"model": {"name": cfg.name or os.path.basename(os.path.normpath(cfg.model)),
                               "path": os.path.abspath(cfg.model), "type": model_type,
                               "tokenizer": tokenizer.name},
                     "config": {k: v for k, v in vars(cfg).items() if not callable(v)}}
    log(f"evaluating {cfg.model} ({model_type}) with {tokenizer.name} on {device}")
    # the held-out text is read (and checked) before the model is loaded: a bad line fails fast
    stream = _read_heldout(cfg, tokenizer, longest) if cfg.heldout else None
    backend = _load(cfg.model, model_type, tokenizer.vocab_size, cfg, longest)
    scorer = None
    try:
        results["model"].update(getattr(backend, "info", {}))
        if cfg.heldout:
            scorer = _perplexity_sections(backend, tokenizer, cfg, results, longest, stream, log)
        if tasks:
            log(f"synthetic tasks {','.join(tasks)} at {cfg.lengths} ({cfg.samples} samples)")
            results["tasks"] = run_tasks(backend, tokenizer, tasks, cfg.lengths, cfg.samples,
                                         seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                                         essay_source=cfg.essay_source, log=log)
        if cfg.needle_task:
            log(f"needle grid {cfg.needle_task}")
            results["needle_grid"] = needle_grid(
                backend, tokenizer, cfg.needle_task, cfg.needle_lengths or cfg.lengths,
                cfg.needle_depths, cfg.needle_samples, seed=cfg.seed,
                max_new_tokens=cfg.max_new_tokens, essay_source=cfg.essay_source, log=log)
    finally:
        if scorer is not None:
            scorer.close()
        backend.close()
    results["seconds"] = round(time.perf_counter() - start, 1)
    paths = write_report(results, cfg.out, marks=cfg.mark_context or ())
    log(f"wrote {', '.join(paths.values())} ({results['seconds']} s)")
    return results


def _span(cfg, longest: int) -> int:
    return cfg.ppl_span or (cfg.ppl_length or longest) * (cfg.ppl_sequences or 16)


def _read_heldout(cfg, tokenizer, longest: int) -> torch.Tensor:
    # BOS (--add-bos) starts every held-out sequence, not every document of the stream
    return ppl.read_token_stream(cfg.heldout, dataclasses.replace(tokenizer, add_bos=False),
                                 max_tokens=max(_span(cfg, longest), longest))


def _perplexity_sections(backend, tokenizer, cfg, results, longest, stream,
                         log) -> Optional[object]:
    """Loss by position, ppl vs context, short-context ppl and LongPPL on the held-out token
    ``stream``; returns the separate LongPPL scorer backend (for the caller to close) or None."""
    span = _span(cfg, longest)
    bos = tokenizer.bos_id if cfg.add_bos else None
    log(f"held-out {cfg.heldout}: {stream.numel()} tokens read")
    scorer = None
    if cfg.ppl_length:
        seqs = ppl.cut_sequences(stream, cfg.ppl_length, cfg.ppl_sequences, bos)
        t0 = time.perf_counter()
        model_lp = backend.logprobs(seqs)
        pos = ppl.position_summary(model_lp, cfg.position_buckets)
        results["loss_by_position"] = pos
        log(f"  ppl @ {cfg.ppl_length}: {pos['ppl']:.3f} over {pos['sequences']} sequences "
            f"({time.perf_counter() - t0:.1f} s)")
        if cfg.longppl_window:
            if cfg.longppl_scorer != "self":
                scorer = _load(cfg.longppl_scorer, cfg.longppl_scorer_type, tokenizer.vocab_size,
                               cfg, longest)
            k = cfg.longppl_sequences or seqs.shape[0]
            t0 = time.perf_counter()
            lp = ppl.long_ppl(backend, seqs[:k], cfg.longppl_window, scorer=scorer,
                              mode=cfg.longppl_mode, stride=cfg.longppl_stride,
                              model_lp=model_lp[:k])
            lp["scorer"] = cfg.longppl_scorer
            lp["sequences"] = int(k)
            results["long_ppl"] = lp
            log(f"  LongPPL (W={cfg.longppl_window}, scorer {cfg.longppl_scorer}): "
                f"{lp['long_ppl']:.3f} on {lp['key_tokens']} key tokens "
                f"({time.perf_counter() - t0:.1f} s)")
    if cfg.ppl_context_lengths:
        results["ppl_vs_context"] = ppl.ppl_vs_context(backend, stream, cfg.ppl_context_lengths,
                                                       span, bos)
        log("  ppl vs context: " + ", ".join(f"{c}: {v['ppl']:.3f}" for c, v in
                                             results["ppl_vs_context"]["by_length"].items()))
    if cfg.short_ppl_length:
        results["short_ppl"] = ppl.short_ppl(backend, stream, cfg.short_ppl_length,
                                             max_sequences=span // cfg.short_ppl_length,
                                             bos_id=bos)
        log(f"  short-context ppl @ {cfg.short_ppl_length}: {results['short_ppl']['ppl']:.3f}")
    return scorer

