#!/usr/bin/env python
"""One-GPU check of the project's GPU path, as ONE markdown table (a column "section"):

    bash benchmarks/gpu_check.sh [options]      # = python benchmarks/gpu_check.py [options]
    python benchmarks/gpu_check.py --dry-run    # print the commands only
    python benchmarks/gpu_check.py --model tiny --allow-cpu     # the same code path on a CPU

Sections (rows in this order in the table):

  setup      the machine (GPU, torch, megatron-core, Transformer Engine) and the inputs made on
             the fly (benchmarks/gpu_check_fixtures.py: a tiny random HF Llama with the trainee's
             vocabulary as frozen scorer, a SentencePiece tokenizer, held-out text).
  attention  benchmarks/gpu_check_attention.py: chunk_causal_attention (forward + backward) and
             sliding_window_attention with and without the sink, against a float64 reference on
             sampled query rows, with the peak of torch.cuda.max_memory_allocated per case
             (bf16, 8 query / 2 K/V heads of 128, at 16k and 32k tokens, window 4096).
  pretrain   short pretrain_tw.py runs, one process each (benchmarks/gpu_check_train.py), on
             megatron's --mock-data: uniform (saves its checkpoint); dense with the self scorer,
             sliding and windows mode; dense with the frozen scorer; tools/score_data.py writing
             the frozen scorer's sidecar, then sparse with the precomputed losses; FP8 rows
             (Transformer Engine only). Per row: first and last lm loss (the loss must fall and
             stay finite), step time, tokens/s, TFLOP/s, MFU, the step time against the uniform
             row of the same call, host syncs per step and peak memory.
  evaluate   tools/evaluate.py --device cuda on the uniform row's checkpoint: a short
             perplexity, its time.

Figures of the pretrain rows:

    step time  median of megatron's "elapsed time per iteration" after ``--warmup`` iterations
    tokens/s   T / step time, T = global batch x sequence length (tokens per step)
    TFLOP/s    F / step time, the trained model's FLOPs per step (causal attention):
                 F = 6 N T + 6 L s d_attn T
                 N = L (h (d_attn + 2 g d_head) + d_attn h + 3 h f) + V h
               N counts the weight-matmul parameters (q, k/v, o, SwiGLU MLP, output layer over
               the padded vocabulary V; embedding lookups do no matmul): 2 N T forward + 4 N T
               backward. Attention adds QK^T and AV: 4 s d_attn per token forward over full
               attention, halved by the causal mask, times 3 with the backward.
               (L layers, h hidden, f MLP width, d_attn = heads x d_head, g KV groups, s sequence)
               A scorer's forward is overhead, not counted: weighting shows as lower TFLOP/s at
               the same F (and as the step-time ratio to uniform).
    MFU        TFLOP/s / the GPU's dense peak (H100/H200 SXM: bf16 989, FP8 1979 TFLOP/s;
               --peak-bf16/--peak-fp8 for other GPUs)
    syncs/step with GPU_CHECK_SYNC_DEBUG=1 the training process sets
               torch.cuda.set_sync_debug_mode("warn") after its first iteration; the lines
               "called a synchronizing CUDA operation" between two iteration lines of the log
               are that step's host syncs (median over the steps after the first)

Where Transformer Engine is absent the rows run with ``--transformer-impl local`` and the FP8
rows are skipped with the reason; without CUDA every row is skipped unless ``--allow-cpu`` (then
everything that can runs on the CPU: use --model tiny). A time budget (--budget) bounds the
whole check: a step that would start after it is skipped, and a running one is stopped at it.
On a GPU the steps run one at a time; on the CPU --jobs of them (2) at a time.
Exit status: 0 when every row that could run passed, 1 when a row failed or nothing could run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# the sibling modules (benchmarks/ is on sys.path: this script's folder, or the tests' insert)
from gpu_check_commands import (
    ROOT,
    ROWS,
    attention_command,
    attention_settings,
    child_env,
    eval_command,
    fixtures_command,
    paths,
    row_command,
    score_command,
)
from gpu_check_logs import error_line, parse_log
from gpu_check_machine import (
    MODELS,
    flops_per_step,
    fp8_recipe_support,
    peak_tflops,
    probe_machine,
    te_reason,
    total_params,
    transformer_impl,
)
from gpu_check_report import SECTIONS, Row, pretrain_numbers, render


# -- running -----------------------------------------------------------------------------------

class Runner:
    def __init__(self, args, info: dict):
        self.args, self.info = args, info
        self.start = time.monotonic()
        self.rows: list[Row] = []
        self.steps: dict[str, Row] = {}  # step key -> its row, once the step has finished
        self.log_dir = Path(args.log_dir)

    def status_of(self, key: str) -> Optional[str]:
        """The status of step ``key``'s row, None when it did not run."""
        row = self.steps.get(key)
        return None if row is None else row.status

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        tag = f"{row.status}" + (f": {row.error}" if row.error else "")
        print(f"[gpu_check] {row.section} / {row.name}: {tag}", file=sys.stderr, flush=True)
        return row

    def call(self, row: Row, cmd: list[str], log_name: str, sync_debug: bool = False,
             min_seconds: float = 15.0) -> Optional[str]:
        """Runs ``cmd``; returns its output (stdout and stderr), or None after marking ``row``
        skipped (budget) or failed (exit status, timeout)."""
        if self.args.dry_run:
            row.status = "dry run"
            row.data["command"] = cmd
            return None
        left = self.left()
        if left < min_seconds:
            row.skip(f"time budget spent (--budget {self.args.budget:.0f} s)")
            return None
        timeout = min(self.args.timeout, left)
        log = self.log_dir / f"{log_name}.log"
        row.data["log"] = str(log)
        print(f"[gpu_check] {row.section} / {row.name} ... ({shlex.join(cmd[1:3])} ...)",
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        # its own process group: a timeout ends the workers it started too (checkpoint savers)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(sync_debug), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            output, _ = proc.communicate()
            code = None
        row.seconds = time.monotonic() - t0
        log.write_text(output)
        if code is None:
            why = ("the time budget" if timeout < self.args.timeout else "--timeout")
            row.fail(f"stopped after {timeout:.0f} s ({why}); last line: "
                     f"{error_line(output)[:200]} [log: {log}]")
            return output
        if code != 0:
            row.fail(f"exit {code}: {error_line(output)[:240]} [log: {log}]")
        return output


def gpu_needed(args, info: dict) -> Optional[str]:
    if info["cuda"] or args.allow_cpu or args.dry_run:
        return None
    return "no CUDA GPU (--allow-cpu runs the check on the CPU, with --model tiny)"


def setup_rows(runner: Runner) -> None:
    args, info = runner.args, runner.info
    te = info["te"]["version"] if info["te"] else te_reason(info)
    row = Row("setup", "machine", seconds=None)
    mem = f", {info['memory_gib']:.0f} GiB" if info.get("memory_gib") else ""
    path = info.get("megatron_path")
    where = f" from {Path(path).parent}" if path else ""
    row.numbers = (f"{info['device']}{mem}, capability {info['capability']}, torch "
                   f"{info['torch']} (CUDA {info['cuda_version']}), megatron-core "
                   f"{info.get('megatron-core')}{where}, Transformer Engine: {te}")
    if info.get("probe_error"):
        row.fail(f"torch/megatron probe failed: {info['probe_error']}")
    elif info.get("megatron-core") is None:
        row.fail("megatron-core is not installed (bash benchmarks/gpu_check_wheels.sh here, then "
                 "copy .whl/ with the working tree: docs/gpu.md)")
    elif (why := gpu_needed(args, info)):
        row.skip(why)
    runner.add(row)


def fixtures_row(runner: Runner) -> Row:
    row = Row("setup", "fixtures (scorer, tokenizer, held-out text)", order=1)
    if (why := gpu_needed(runner.args, runner.info)):
        return runner.add(row.skip(why))
    p = paths(runner.args)
    if not runner.args.dry_run:
        shutil.rmtree(p["fixtures"], ignore_errors=True)
    out = runner.call(row, fixtures_command(runner.args), "fixtures", min_seconds=5)
    if out is not None and row.status == "ok":
        shape = MODELS[runner.args.model].shape
        row.numbers = (f"HF Llama scorer 2x128, vocab {shape.vocab_size:,}; SentencePiece "
                       "100 pieces; held-out .jsonl")
    return runner.add(row)


def attention_label(case: str, s: int) -> str:
    name = {"chunk_causal": "chunk_causal_attention",
            "sliding sink": "sliding_window_attention sink",
            "sliding": "sliding_window_attention no sink"}[case]
    return f"{name} {s // 1024}k" if s % 1024 == 0 else f"{name} {s}"


def attention_rows(runner: Runner) -> None:
    args, info = runner.args, runner.info
    a = attention_settings(args, info)
    lengths = [int(x) for x in a["lengths"].split(",") if x.strip()]
    names = [(case, s) for case in ("chunk_causal", "sliding sink", "sliding") for s in lengths]
    order = {name: i for i, name in enumerate(names)}
    if (why := gpu_needed(args, info)):
        for case, s in names:
            runner.add(Row("attention", attention_label(case, s), order=order[case, s]).skip(why))
        return
    out_file = runner.log_dir / "attention.jsonl"
    out_file.unlink(missing_ok=True)
    probe = Row("attention", "attention cases")
    output = runner.call(probe, attention_command(args, info, out_file), "attention",
                         min_seconds=10)
    if args.dry_run:
        runner.add(probe)
        return
    results = {}
    for line in (output or "").splitlines():
        if line.startswith("ATTN "):
            r = json.loads(line[5:])
            results[(r["case"], r["seq"])] = r
    for case, s in names:
        row = Row("attention", attention_label(case, s), order=order[case, s])
        r = results.get((case, s))
        if r is None:
            why = probe.error if probe.status != "ok" else "no result printed"
            row.skip(why) if probe.status == "skipped" else row.fail(why)
            runner.add(row)
            continue
        row.seconds = r.get("wall_s")
        row.data = r
        if r["status"] != "ok":
            row.fail(r.get("error") or "failed")
        if "max_abs_err" in r:
            errs = ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items())
            peak = (f"peak {r['peak_gib']:.2f} GiB (inputs {r['inputs_gib']:.2f})"
                    if r.get("peak_gib") is not None else "peak - (CPU)")
            row.numbers = (f"max abs err {r['max_abs_err']:.2e} ({errs}; tol "
                           f"{r['tol_rel']:g} x max |ref|), {peak}, {r['seconds'] * 1e3:.1f} ms, "
                           f"{r['rows']} rows vs float64; {r['what']}")
        runner.add(row)


PRETRAIN_ORDER = ["uniform", "dense-self-sliding", "dense-self-windows", "dense-frozen",
                  "score_data", "sparse-precomputed", "fp8-uniform", "fp8-dense"]


def pretrain_row(runner: Runner, name: str) -> Row:
    args, info = runner.args, runner.info
    precision = ROWS[name][0]
    row = Row("pretrain", name, order=PRETRAIN_ORDER.index(name))
    if (why := gpu_needed(args, info)):
        return runner.add(row.skip(why))
    if precision == "fp8" and (why := fp8_recipe_support(info, args.fp8_recipe)):
        if not args.dry_run:
            return runner.add(row.skip(why))
        row.error = f"here: skipped, {why}"
    needs = {"dense-frozen": "fixtures", "sparse-precomputed": "score_data"}.get(name)
    if needs and not args.dry_run and runner.status_of(needs) != "ok":
        return runner.add(row.skip(f"needs the {needs} row"))
    if name == "uniform" and not args.dry_run:
        shutil.rmtree(paths(args)["ckpt"], ignore_errors=True)
    cmd = row_command(name, args, info)
    row.data["impl"] = transformer_impl(args, info, precision)
    output = runner.call(row, cmd, f"pretrain-{name}", sync_debug=True)
    if output is None:
        return runner.add(row)
    r = parse_log(output, args.warmup)
    row.data.update(r)
    add_figures(row, args, info)
    if row.status == "ok":
        losses = r["losses"]
        if r["step_ms"] is None or len(losses) < 2:
            row.fail(f"no timed iteration after the warm-up in the log [log: {row.data['log']}]")
        elif r["nan_iterations"] or any(x != x or x in (float("inf"), float("-inf"))
                                        for x in losses):
            row.fail(f"non-finite lm loss: {losses}")
        elif not losses[-1] < losses[0]:
            row.fail(f"lm loss did not fall: {losses[0]:.4g} -> {losses[-1]:.4g}")
    row.numbers = pretrain_numbers(row)
    return runner.add(row)


def add_figures(row: Row, args, info: dict) -> None:
    d = row.data
    shape = MODELS[args.model].shape
    vocab = d.get("padded_vocab") or shape.vocab_size
    d["params_formula"] = total_params(shape, vocab)
    if d.get("step_ms") is None:
        return
    tokens = args.global_batch_size * args.seq_length
    seconds = d["step_ms"] / 1000.0
    d["tokens_per_s"] = tokens / seconds
    d["tflops"] = flops_per_step(shape, vocab, args.seq_length, tokens) / seconds / 1e12
    peak = peak_tflops(info, ROWS[row.name][0], args)
    d["mfu"] = d["tflops"] / peak if (peak and info["cuda"]) else None


def add_ratios(runner: Runner) -> None:
    """Each weighted row's step time against the uniform row of the same call."""
    uniform = runner.steps.get("uniform")
    base = uniform.data.get("step_ms") if uniform is not None else None
    for row in runner.rows:
        if row.section == "pretrain" and row.name in ROWS and row.name != "uniform":
            if base and row.data.get("step_ms") is not None:
                row.data["vs_uniform"] = row.data["step_ms"] / base
                row.numbers = pretrain_numbers(row)


def score_row(runner: Runner) -> Row:
    args, info = runner.args, runner.info
    row = Row("pretrain", "score_data (sidecar for sparse-precomputed)",
              order=PRETRAIN_ORDER.index("score_data"))
    if (why := gpu_needed(args, info)):
        return runner.add(row.skip(why))
    if not args.dry_run and runner.status_of("fixtures") != "ok":
        return runner.add(row.skip("needs the fixtures row"))
    if not args.dry_run:
        shutil.rmtree(paths(args)["sidecar"].parent, ignore_errors=True)
        paths(args)["sidecar"].parent.mkdir(parents=True)
    output = runner.call(row, score_command(args, info), "score_data")
    if output is not None and row.status == "ok":
        m = re.search(r"wrote \S+_train\.\{bin,idx,json\}: (\d+) x (\d+) float32", output)
        if m:
            row.numbers = (f"{m.group(1)} samples x {m.group(2)} losses, frozen scorer, "
                           f"W={args.short_context} sliding")
        else:
            row.fail(f"no train sidecar written [log: {row.data['log']}]")
    return runner.add(row)


def evaluate_row(runner: Runner) -> Row:
    args, info = runner.args, runner.info
    row = Row("evaluate", "evaluate.py perplexity (uniform checkpoint)")
    if (why := gpu_needed(args, info)):
        return runner.add(row.skip(why))
    if not args.dry_run:
        for need in ("uniform", "fixtures"):
            if runner.status_of(need) != "ok":
                return runner.add(row.skip(f"needs the {need} row"))
        shutil.rmtree(paths(args)["eval"], ignore_errors=True)
    output = runner.call(row, eval_command(args, info), "evaluate")
    if output is not None and row.status == "ok":
        try:
            res = json.loads((paths(args)["eval"] / "results.json").read_text())
            pos = res["loss_by_position"]
            device = "cuda" if info["cuda"] else "cpu"
            row.numbers = (f"ppl {pos['ppl']:.4g} over {pos['sequences']} x "
                           f"{min(args.ppl_length, args.seq_length)} tokens on {device}, "
                           f"evaluate {res['seconds']} s")
            row.data["ppl"], row.data["eval_seconds"] = pos["ppl"], res["seconds"]
            if not pos["ppl"] == pos["ppl"]:
                row.fail("perplexity is NaN")
        except (OSError, KeyError, ValueError) as err:
            row.fail(f"no results.json with a perplexity: {err}")
    return runner.add(row)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    p.add_argument("--seq-length", type=int, default=None, help="default: the model's (8192)")
    p.add_argument("--short-context", type=int, default=None,
                   help="W of the sliding-mode rows (default: the model's, 4096)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per step (micro-batch 1, accumulated; default: the model's, 4)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="iterations left out of the median")
    p.add_argument("--lr", type=float, default=None, help="constant learning rate "
                   "(default: the model's, 1e-4)")
    p.add_argument("--sections", default=",".join(SECTIONS[1:]),
                   help="comma list of attention, pretrain, evaluate (setup always runs)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"pretrain rows: {', '.join(ROWS)}")
    p.add_argument("--impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="bf16 rows' --transformer-impl (auto: TE where it imports on a GPU)")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
                   default="delayed")
    p.add_argument("--peak-bf16", type=float, default=None, help="dense bf16 peak TFLOP/s")
    p.add_argument("--peak-fp8", type=float, default=None, help="dense FP8 peak TFLOP/s")
    p.add_argument("--attn-lengths", default=None,
                   help="attention sequence lengths (default 16384,32768; CPU 512,1024)")
    p.add_argument("--attn-window", type=int, default=None,
                   help="sliding cases' W (default 4096; CPU 128)")
    p.add_argument("--attn-rows", type=int, default=64, help="query rows checked per case")
    p.add_argument("--ppl-length", type=int, default=None,
                   help="evaluate's --ppl-length (default: the model's, 2048)")
    p.add_argument("--row-extra", action="append", default=[], metavar="NAME=FLAGS",
                   help="append FLAGS (shell-split) to one step's command: a pretrain row, "
                        "score_data, evaluate, attention or all (e.g. to test the check itself)")
    p.add_argument("--log-dir", default="/tmp/tw_gpu_check", help="logs and work files")
    p.add_argument("--out", default=None, help="also write the table (markdown) here, and the "
                   "rows' figures as JSON next to it (.json)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per command")
    p.add_argument("--budget", type=float, default=500,
                   help="seconds for the whole check (default 500: under 9 minutes with the "
                        "wheel install); later steps are skipped")
    p.add_argument("--jobs", type=int, default=2, help="steps at a time on the CPU "
                   "(--allow-cpu); on a GPU always 1")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run every section on "
                   "the CPU (use --model tiny)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    d = MODELS[args.model]
    args.seq_length = args.seq_length or d.seq_length
    args.short_context = args.short_context or min(d.short_context, args.seq_length // 2)
    args.global_batch_size = args.global_batch_size or d.global_batch_size
    args.lr = args.lr or d.lr
    args.ppl_length = args.ppl_length or d.ppl_length
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if args.sections - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(args.sections - set(SECTIONS))}")
    if args.iters <= args.warmup:
        p.error(f"--iters {args.iters} must exceed --warmup {args.warmup}")
    extras = []
    for item in args.row_extra:
        name, sep, flags = item.partition("=")
        targets = {*ROWS, "score_data", "evaluate", "attention", "all"}
        if not sep or name not in targets:
            p.error(f"--row-extra {item!r}: expected NAME=FLAGS, NAME one of "
                    f"{', '.join(sorted(targets))}")
        extras.append((name, shlex.split(flags)))
    args.row_extra = extras
    return args


@dataclass
class Step:
    key: str
    deps: tuple
    run: object  # Runner -> Row (the step's main row)


def plan(args) -> list[Step]:
    """The steps in the order they run on a GPU (one at a time); a step's dependencies come
    before it."""
    wanted, rows = args.sections, args.rows
    pretrain = [r for r in PRETRAIN_ORDER if r in rows or r == "score_data"
                and "sparse-precomputed" in rows] if "pretrain" in wanted else []
    if "evaluate" in wanted and "uniform" not in pretrain:
        pretrain.insert(0, "uniform")  # the evaluate row's checkpoint
    steps = []
    if "evaluate" in wanted or {"dense-frozen", "score_data"} & set(pretrain):
        steps.append(Step("fixtures", (), fixtures_row))
    if "attention" in wanted:
        steps.append(Step("attention", (), attention_rows))
    for name in pretrain:
        if name == "score_data":
            steps.append(Step(name, ("fixtures",), score_row))
        else:
            deps = {"dense-frozen": ("fixtures",), "sparse-precomputed": ("score_data",)}
            steps.append(Step(name, deps.get(name, ()),
                              lambda runner, name=name: pretrain_row(runner, name)))
        if name == "uniform" and "evaluate" in wanted:
            steps.append(Step("evaluate", ("uniform", "fixtures"), evaluate_row))
    return steps


def run_steps(runner: Runner, steps: list[Step], jobs: int) -> None:
    """Runs ``steps``, at most ``jobs`` at a time, each once its dependencies have finished;
    in list order when jobs is 1."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    keys = {s.key for s in steps}
    pending, running, finished = list(steps), {}, set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for step in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in finished or d not in keys for d in step.deps):
                    pending.remove(step)
                    running[pool.submit(step.run, runner)] = step
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                row = future.result()
                if row is not None:
                    runner.steps[step.key] = row
                finished.add(step.key)


def main(argv=None) -> int:
    started = time.monotonic()  # the budget counts the probes too
    args = parse_args(argv)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    info = probe_machine()
    runner = Runner(args, info)
    runner.start = started
    setup_rows(runner)
    # one step at a time on a GPU (timings, memory); on the CPU --jobs (the tests' 2 cores)
    jobs = 1 if (info["cuda"] or args.dry_run) else max(1, args.jobs)
    run_steps(runner, plan(args), jobs)
    add_ratios(runner)
    table = render(runner.rows, args, info)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(
            {"machine": info, "seconds": time.monotonic() - runner.start,
             "rows": [{"section": r.section, "name": r.name, "status": r.status,
                       "seconds": r.seconds, "numbers": r.numbers, "error": r.error,
                       "data": r.data} for r in runner.rows]}, indent=1, default=str))
    failed = [r for r in runner.rows if r.status == "failed"]
    ran = [r for r in runner.rows if r.status == "ok" and r.section != "setup"]
    budget = [r for r in runner.rows if r.status == "skipped" and "time budget" in r.error]
    print(f"gpu_check: {len(ran)} ok, {len(failed)} failed, "
          f"{sum(r.status == 'skipped' for r in runner.rows)} skipped in "
          f"{time.monotonic() - runner.start:.0f} s"
          + (f"; {len(budget)} skipped for the time budget" if budget else ""), file=sys.stderr)
    if args.dry_run:
        return 0
    if failed or not ran:
        if not ran and not failed:
            print("gpu_check: nothing could run on this machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
