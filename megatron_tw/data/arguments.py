"""Data flags of the fork (``--tw-*``), added to megatron's parser via extra_args_provider."""

from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the long-document sampling flags (see megatron_tw/data/long_document.py)."""
    group = parser.add_argument_group(title="megatron_tw data")
    group.add_argument(
        "--tw-long-document-sampling", action="store_true",
        help="Build each training sequence from ONE document: non-overlapping windows "
             "'BOS + seq_length-1 document tokens' (labels: the next seq_length tokens), "
             "drawn shuffled by --seed, never crossing documents and never padded; the tail "
             "shorter than a window is dropped. Replaces GPTDataset's packing for "
             "--data-path (one prefix); --split divides by document. The paper's set-up for "
             "context extension.")
    group.add_argument(
        "--tw-min-document-length", type=int, default=None,
        help="With --tw-long-document-sampling: use only documents of at least this many "
             "tokens (documents shorter than --seq-length are never used). Default: every "
             "document with at least one full window.")
    group.add_argument(
        "--tw-lead-token-id", type=int, default=None,
        help="With --tw-long-document-sampling: the token id each window starts with instead of "
             "the tokenizer's BOS (for tokenizers without one, e.g. Qwen2's: pass its "
             "<|endoftext|> id). Default: the tokenizer's BOS.")
    return parser


def validate_data_args(args: argparse.Namespace) -> None:
    """Check the flags once at start-up; errors name the flag and the fix."""
    if args.tw_min_document_length is not None:
        if not args.tw_long_document_sampling:
            raise ValueError("--tw-min-document-length only applies with "
                             "--tw-long-document-sampling: add that flag or drop this one")
        if args.tw_min_document_length < 0:
            raise ValueError(f"--tw-min-document-length must be >= 0, got "
                             f"{args.tw_min_document_length}")
    if args.tw_lead_token_id is not None:
        if not args.tw_long_document_sampling:
            raise ValueError("--tw-lead-token-id only applies with --tw-long-document-sampling")
        if args.tw_lead_token_id < 0:
            raise ValueError(f"--tw-lead-token-id must be >= 0, got {args.tw_lead_token_id}")
    if args.tw_long_document_sampling:
        data_path = getattr(args, "data_path", None) or []
        if len(data_path) != 1:
            raise ValueError("--tw-long-document-sampling reads one --data-path prefix (no "
                             f"blend, no per-split paths); got --data-path {data_path}")
