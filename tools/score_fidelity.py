#!/usr/bin/env python
"""How close each way of forming the short context comes to the method's definition, on a model.

    python tools/score_fidelity.py --model HF_FOLDER --text data/demo/heldout.jsonl \\
        --window 256 --seq-length 2048 --sequences 6 --positions 112 --project-scorer \\
        --output results/fidelity_w256.json

For sequences of --seq-length tokens led by the tokenizer's BOS (--lead-token for a tokenizer
without one), it computes the long-context loss and, at --positions sampled targets beyond W per
sequence, the short-context losses of: exact (BOS + the previous W - 1 tokens, run alone),
windows (the reference code's, stride --stride, BOS substituted), sliding (the previous W - 1
tokens only) and sliding+sink (the same plus the sequence's first token: the project's default).
It prints a markdown table (mean L_short, std of d = L_long - L_short, Spearman of abs(d) and the
overlap of the top quarter by abs(d), both against exact), the mean L_long, and the share of
long-range word repeats among the top-weighted targets. --project-scorer also runs the project's
own frozen scorer (megatron, --tw-scorer frozen) in both modes and reports its largest difference
from the HF variant it implements. Everything in float32 (docs/scoring.md).

--model: an HF causal LM folder, or a megatron checkpoint (converted to a temporary HF folder for
the HF variants; --hf-config when it has no config.json; the project scorer loads it directly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "score_fidelity.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _int(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected an integer") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                    "\n\n", 2)[2], allow_abbrev=False)
    p.add_argument("--model", required=True, help="HF causal LM folder or megatron checkpoint")
    p.add_argument("--text", required=True,
                   help="a text file, or a .jsonl file of {\"text\": ...} documents; sequences "
                        "are cut consecutively from the start of each document")
    p.add_argument("--window", type=_int("--window"), default=256,
                   help="W: a window of W tokens, a target sees W - 1 tokens (default 256)")
    p.add_argument("--seq-length", type=_int("--seq-length"), default=2048,
                   help="tokens per sequence, the lead token included (default 2048; megatron's "
                        "--seq-length is one less)")
    p.add_argument("--sequences", type=_int("--sequences"), default=6, help="default 6")
    p.add_argument("--positions", type=_int("--positions"), default=112,
                   help="targets sampled per sequence, beyond W (default 112)")
    p.add_argument("--stride", type=_int("--stride"), default=None,
                   help="S of the windows variant (default W // 2); (seq_length - W) %% S == 0")
    p.add_argument("--seed", type=_int("--seed"), default=0, help="of the sampled positions")
    p.add_argument("--lead-token", type=_int("--lead-token"), default=None,
                   help="token id leading every sequence (default: the tokenizer's BOS)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model or HF tokenizer folder (default: the model's)")
    p.add_argument("--model-type", default="auto", choices=["auto", "hf", "megatron"],
                   help="default: told apart by the folder's contents")
    p.add_argument("--hf-config", default=None,
                   help="megatron checkpoint without config.json: the HF folder of its "
                        "architecture")
    p.add_argument("--project-scorer", action="store_true",
                   help="also run the project's frozen scorer (megatron) in both modes")
    p.add_argument("--batch-size", type=_int("--batch-size"), default=16,
                   help="short sequences per HF forward (default 16)")
    p.add_argument("--output", default=None, help="write every number as JSON here")
    p.add_argument("--token-losses", default=None,
                   help="write the first sequence's per-token long and sliding+sink losses here, "
                        "as tools/visualize_weights.py --losses-json reads them")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    cfg_args = build_parser().parse_args(argv)
    from megatron_tw.checkpoint.families import ConversionError
    from megatron_tw.errors import ConfigError
    from megatron_tw.eval.fidelity import FidelityConfig, FidelityError, format_table, measure
    from megatron_tw.eval.tokenizer import TokenizerError

    if cfg_args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    fields = {k: v for k, v in vars(cfg_args).items()
              if k not in ("output", "token_losses", "quiet")}
    cfg = FidelityConfig(**fields)
    log = (lambda msg: None) if cfg_args.quiet else (
        lambda msg: print(f"[{PROG}] {msg}", file=sys.stderr, flush=True))
    try:
        for flag, path in (("--output", cfg_args.output),
                           ("--token-losses", cfg_args.token_losses)):
            folder = os.path.dirname(os.path.abspath(path)) if path else None
            if folder and not os.path.isdir(folder):
                raise FidelityError(f"{flag} {path}: folder {folder} does not exist")
        result = measure(cfg, log=log, token_losses=cfg_args.token_losses is not None)
    except (FidelityError, TokenizerError, ConversionError, ConfigError) as err:
        print(f"{PROG}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_table(result))
    data = result.to_json()
    if cfg_args.token_losses:
        with open(cfg_args.token_losses, "w") as f:
            json.dump(data["losses"].pop("sequence0_tokens"), f, indent=0)
    if cfg_args.output:
        data["command"] = ["tools/score_fidelity.py", *(sys.argv[1:] if argv is None else argv)]
        with open(cfg_args.output, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
