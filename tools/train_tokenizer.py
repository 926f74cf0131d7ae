#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer with byte fallback on JSON-lines documents.

    python tools/train_tokenizer.py --input data/demo/corpus/train.jsonl \\
        --out data/demo/tokenizer --vocab-size 8000

Writes ``<out>/tokenizer.model`` (use it with ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model <out>/tokenizer.model``), ``tokenizer.vocab`` and ``tokenizer.stamp``
(a hash of inputs and options: an up-to-date model is not retrained). Lossless:
identity normalization, whitespace kept, so decode(encode(text)) == text.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_tw.data.preprocess.spm_trainer import train_sentencepiece  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines file(s)")
    parser.add_argument("--json-key", default="text", help="key holding the text")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    start = time.perf_counter()
    try:
        path, trained = train_sentencepiece(args.input, args.out, args.vocab_size,
                                            args.model_type, args.json_key, args.seed,
                                            args.num_threads, args.force)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = f"trained in {time.perf_counter() - start:.1f} s" if trained else "up to date"
    print(f"tokenizer {path} ({state}, vocab {args.vocab_size}, {args.model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
