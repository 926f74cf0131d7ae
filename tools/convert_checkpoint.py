"""Convert Llama-family checkpoints between Hugging Face and megatron (torch_dist).

    # HF -> megatron (Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2); prints the model flags
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF --out CKPT \\
        [--rotary-base 15300000] [--target-tensor-parallel-size 8] [--dtype bfloat16]
    torchrun ... pretrain_tw.py $(cat CKPT/megatron_args.txt) --pretrained-checkpoint CKPT ...

    # megatron -> HF (any TP x PP the checkpoint was saved in)
    python tools/convert_checkpoint.py megatron-to-hf --load RUN/checkpoints --out HF_OUT \\
        [--hf-config HF] [--dtype bfloat16]

``--direction hf-to-megatron|megatron-to-hf`` is accepted in place of the subcommand.
Runs in one process on CPU; no GPU or network needed. A source that cannot convert (config.json
malformed or not a model config, a tracker file without an iteration, an ``--out`` that cannot be
written, ...) is one line ``convert_checkpoint.py: error: ...`` and exit status 1, with nothing
left at ``--out``; temporary folders of a killed earlier run (``.<out>.tmp-<pid>``) are removed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name):
    import torch

    return None if name in (None, "auto") else getattr(torch, DTYPES[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    imp = sub.add_parser("hf-to-megatron", help="HF folder -> megatron release checkpoint")
    imp.add_argument("--hf-dir", required=True, help="HF model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="megatron checkpoint folder to create")
    imp.add_argument("--rotary-base", type=int, default=None,
                     help="RoPE base for the megatron model (default: the HF rope_theta); "
                          "a larger base is the context-extension recipe")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--target-tensor-parallel-size", type=int, default=1,
                     help="pad the vocabulary as megatron does at this TP size (the checkpoint "
                          "loads into it and every TP dividing it)")
    imp.add_argument("--tokenizer-model", default=None,
                     help="a sentencepiece model to ship instead of the HF folder's tokenizer")

    exp = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF folder")
    exp.add_argument("--load", required=True, help="megatron checkpoint folder (as given to --save)")
    exp.add_argument("--out", required=True, help="HF folder to create")
    exp.add_argument("--hf-config", default=None,
                     help="HF folder or config.json whose architecture name and special-token "
                          "ids to keep (default: the config.json hf-to-megatron wrote into "
                          "--load); every architectural field comes from the checkpoint's saved "
                          "arguments")
    exp.add_argument("--vocab-size", type=int, default=None,
                     help="the tokenizer's vocabulary without megatron's padding (default: the "
                          "template's, else the tokenizer the run trained with)")
    exp.add_argument("--iteration", type=int, default=None, help="default: the latest")
    exp.add_argument("--tokenizer-from", default=None, help="HF folder whose tokenizer to copy")
    exp.add_argument("--tokenizer-model", default=None, help="a sentencepiece model to ship")

    for p in (imp, exp):
        p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="weight dtype (auto: the source config's dtype)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--direction" in argv:  # --direction X is the subcommand X
        i = argv.index("--direction")
        direction = argv[i + 1]
        argv = [direction, *argv[:i], *argv[i + 2:]]
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2

    from megatron_tw.checkpoint import convert
    from megatron_tw.checkpoint.families import ConversionError

    try:
        if args.command == "hf-to-megatron":
            summary = convert.hf_to_megatron(
                args.hf_dir, args.out, rotary_base=args.rotary_base,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                target_tensor_parallel_size=args.target_tensor_parallel_size,
                dtype=_dtype(args.dtype), tokenizer_model=args.tokenizer_model,
                overwrite=args.overwrite, progress=not args.no_progress)
            _report_import(args.out, summary)
        else:
            summary = convert.megatron_to_hf(
                args.load, args.out, hf_config=args.hf_config, dtype=_dtype(args.dtype),
                tokenizer_from=args.tokenizer_from, tokenizer_model=args.tokenizer_model,
                iteration=args.iteration, overwrite=args.overwrite, vocab_size=args.vocab_size,
                progress=not args.no_progress)
            _report_removed(summary)
            print(f"wrote {args.out}: {', '.join(summary['files'] + summary['tokenizer_files'])} "
                  f"(rope_theta {summary['rope_theta']:g}, max_position_embeddings "
                  f"{summary['max_position_embeddings']}, {summary['dtype']})")
            if not summary["has_tokenizer"]:
                print(f"no tokenizer: {summary['tokenizer_source']} has no tokenizer files "
                      "(tokenizer.json, tokenizer.model, vocab.json), so AutoTokenizer cannot load "
                      f"{args.out}; rerun with --tokenizer-from HF_DIR or --tokenizer-model "
                      "FILE.model")
    except ConversionError as err:
        print(f"convert_checkpoint.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a source file that cannot be read, a full disk
        where = f"{err.filename}: " if err.filename else ""
        print(f"convert_checkpoint.py: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def _report_removed(summary: dict) -> None:
    if summary.get("removed_stale"):
        n = len(summary["removed_stale"])
        print(f"removed {n} temporary folder{'s' if n > 1 else ''} of an interrupted earlier run: "
              f"{', '.join(summary['removed_stale'])}")


def _report_import(out: str, summary: dict) -> None:
    flags = " ".join(shlex.quote(f) for f in summary["flags"])
    tps = summary["compatible_tensor_parallel_sizes"]
    print(f"wrote megatron checkpoint {out} ({summary['architecture']}, {summary['dtype']}, "
          f"vocabulary {summary['vocab_size']} padded to {summary['padded_vocab_size']})")
    _report_removed(summary)
    print(f"model flags (also in {os.path.join(out, 'megatron_args.txt')}):\n  {flags}")
    if summary["has_tokenizer"]:
        print(f"load with: pretrain_tw.py <model flags> --pretrained-checkpoint {out} "
              f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {out} ...")
    else:
        print(f"no tokenizer: {summary['source']} has no tokenizer files (tokenizer.json, "
              f"tokenizer.model, vocab.json), so {out} has none; load with: pretrain_tw.py "
              f"<model flags> --pretrained-checkpoint {out} --tokenizer-type ... --tokenizer-model "
              "<your tokenizer> ..., or rerun with --tokenizer-model FILE.model to ship one")
    print(f"tensor-parallel sizes that keep the padded vocabulary: {tps} (any pipeline size); "
          "pass --rotary-base / --seq-length / --max-position-embeddings after the model flags "
          "to extend the context (do not use --use-checkpoint-args: it restores the saved "
          "--rotary-base)")


if __name__ == "__main__":  # the guard matters: dist_checkpointing saves start worker processes
    sys.exit(main())
