#!/usr/bin/env python
"""Tokenize text into megatron IndexedDataset files (``.bin``/``.idx``) for GPTDataset.

Megatron-LM's ``tools/preprocess_data.py`` interface (not shipped in the megatron-core
wheel). Output: ``<output-prefix>_<key>_document.bin/.idx`` for each ``--json-keys`` key.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/tokenizer.model \\
        --append-eod --workers 2

Inputs: JSON lines (``*.jsonl``/``*.json``), plain text files (one document per file), or a
folder of them. Every ``--tokenizer-*`` flag of megatron.training is accepted and means the
same as in training, so the ids written are the ids the training run's tokenizer produces.
Bad input (malformed JSON, missing key, invalid UTF-8) stops the run naming file and line,
unless ``--skip-bad-lines``; so do an empty input, an unwritable ``--output-prefix`` and a
``--tokenizer-model`` that is not a tokenizer (one line ``preprocess_data.py: error: ...``, exit
status 1). Nothing is written under the final names on failure, and temporary files an
interrupted earlier run left (``<prefix>_<key>_document.tmp-<pid>.*``) are removed.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_tw.data.preprocess.encoder import INVALID_UTF8_RULES  # noqa: E402
from megatron_tw.data.preprocess.pipeline import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    preprocess,
)
from megatron_tw.data.preprocess.tokenizer import add_tokenizer_args  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="JSON-lines file(s), plain text file(s) (one document per file) "
                            "or folder(s) of *.jsonl/*.json/*.txt files")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON line; one output per key "
                            "(default: text)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed JSON lines, lines missing a key and (with "
                            "--invalid-utf8 error) invalid UTF-8, counting and reporting them "
                            "instead of stopping")
    group.add_argument("--invalid-utf8", choices=INVALID_UTF8_RULES, default="error",
                       help="invalid UTF-8 bytes: 'error' names file, line and byte offset "
                            "(default); 'replace' substitutes U+FFFD and counts the documents")
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix; files are <prefix>_<key>_document.bin/.idx")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's end-of-document token to every document")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes (output is identical for any number)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="progress update every this many documents")
    group.add_argument("--no-progress-bar", action="store_true",
                       help="log lines instead of a progress bar even on a terminal")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    tokenizer_args = argparse.Namespace(**{
        k: v for k, v in vars(args).items()
        if k not in ("input", "json_keys", "skip_bad_lines", "invalid_utf8", "output_prefix",
                     "append_eod", "workers", "log_interval", "no_progress_bar")})
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_args=tokenizer_args,
        json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
        log_interval=args.log_interval, skip_bad_lines=args.skip_bad_lines,
        invalid_utf8=args.invalid_utf8, progress=False if args.no_progress_bar else None)
    try:
        summary = preprocess(cfg)
    except (PreprocessError, ValueError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"  # e.g. an input file that cannot be read
        else:
            message = " ".join(str(exc).split())
        print(f"preprocess_data.py: error: {message} (nothing written under "
              f"{args.output_prefix}_*_document.*)", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
