#!/usr/bin/env python
"""Tokenize text into megatron IndexedDataset files (``.bin``/``.idx``) for GPTDataset.

Megatron-LM's ``tools/preprocess_data.py`` interface (not shipped in the megatron-core
wheel). Output: ``<output-prefix>_<key>_document.bin/.idx`` for each ``--json-keys`` key
(``_sentence`` with ``--split-sentences``, as Megatron-LM names it).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/tokenizer.model \\
        --append-eod --workers 2

Inputs: JSON lines (``*.jsonl``/``*.json``), plain text files (one document per file), the
same gzip-compressed (``*.gz``), a folder of them, or a glob pattern. Every ``--tokenizer-*``
flag of megatron.training is accepted and means the same as in training, so the ids written are
the ids the training run's tokenizer produces. Every flag of Megatron-LM's tool is accepted with
its meaning there (``--split-sentences``, ``--keep-newlines``, ``--lang``, ``--partitions``,
``--keep-sequential-samples``, ...) or refused with a one-line error saying why (docs/data.md
has the table).
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

# Flags of earlier Megatron-LM versions of this tool that megatron-core 0.19.2 no longer has.
REFUSED_FLAGS = {
    "legacy_tokenizer": (
        "--legacy-tokenizer: refused: it selected megatron.training's legacy tokenizer classes, "
        "which megatron-core 0.19.2 no longer has; the tokenizer here is the one training "
        "builds (megatron.core.tokenizers), so drop the flag"),
}


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+",
                       help="JSON-lines file(s), plain text file(s) (one document per file), "
                            "the same gzip-compressed (*.gz), folder(s) of *.jsonl/*.json/*.txt "
                            "files (and .gz), or glob patterns")
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
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences with nltk's punkt (Megatron-LM's): "
                            "one sequence per sentence, output <prefix>_<key>_sentence.bin/.idx; "
                            "needs nltk and its punkt_tab data")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace (newlines) after each "
                            "sentence in that sentence (Megatron-LM's CustomLanguageVars)")
    group.add_argument("--lang", default=None,
                       help="with --split-sentences: the punkt model's language "
                            "(default: english)")
    add_tokenizer_args(parser)
    special = next(a for a in parser._actions if a.dest == "special_tokens")
    parser.add_argument("--tiktoken-special-tokens", dest="special_tokens", nargs=special.nargs,
                        type=special.type, default=argparse.SUPPRESS,
                        help="earlier Megatron-LM name of --tokenizer-special-tokens (same "
                             "meaning)")
    parser.add_argument("--legacy-tokenizer", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix; files are <prefix>_<key>_document.bin/.idx")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's end-of-document token to every document")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizer processes (output is identical for any number)")
    group.add_argument("--partitions", type=int, default=1,
                       help="process the input as this many contiguous parts in parallel, each "
                            "with workers/partitions tokenizer processes, merged in order "
                            "(Megatron-LM's; the output is identical to --partitions 1)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="keep the input order with --partitions (Megatron-LM's; always "
                            "the case here)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="progress update every this many documents")
    # --no-progress as in the project's other tools; --no-progress-bar kept as an alias
    group.add_argument("--no-progress", "--no-progress-bar", dest="no_progress_bar",
                       action="store_true",
                       help="log lines instead of a progress bar even on a terminal")
    return parser.parse_args(argv)


TOOL_ARGS = ("input", "json_keys", "skip_bad_lines", "invalid_utf8", "output_prefix",
             "append_eod", "workers", "log_interval", "no_progress_bar", "split_sentences",
             "keep_newlines", "lang", "partitions", "keep_sequential_samples",
             *REFUSED_FLAGS)


def main(argv=None) -> int:
    args = get_args(argv)
    level = "sentence" if args.split_sentences else "document"
    for dest, message in REFUSED_FLAGS.items():
        if getattr(args, dest):
            print(f"preprocess_data.py: error: {message}", file=sys.stderr)
            return 1
    if (args.tokenizer_type or "").lower().startswith("bert") and not args.split_sentences:
        print("preprocess_data.py: note: a BERT tokenizer usually goes with --split-sentences "
              "(Megatron-LM's tool says the same)", file=sys.stderr)
    tokenizer_args = argparse.Namespace(**{
        k: v for k, v in vars(args).items() if k not in TOOL_ARGS})
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_args=tokenizer_args,
        json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
        log_interval=args.log_interval, skip_bad_lines=args.skip_bad_lines,
        invalid_utf8=args.invalid_utf8, progress=False if args.no_progress_bar else None,
        split_sentences=args.split_sentences, lang=args.lang, keep_newlines=args.keep_newlines,
        partitions=args.partitions)
    try:
        summary = preprocess(cfg)
    except (PreprocessError, ValueError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"  # e.g. an input file that cannot be read
        else:
            message = " ".join(str(exc).split())
        print(f"preprocess_data.py: error: {message} (nothing written under "
              f"{args.output_prefix}_*_{level}.*)", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
