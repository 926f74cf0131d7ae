"""The tokenizer used for preprocessing: megatron's own, built exactly as training builds it.

``megatron.training`` builds its tokenizer with
``megatron.core.tokenizers.utils.build_tokenizer.build_tokenizer(args)`` from the
``--tokenizer-*`` flags of its ``TokenizerConfig`` argument group. Preprocessing adds that
same argument group to its parser and calls the same function, so every flag that changes
tokenization (``--tokenizer-sentencepiece-ignore-extra-whitespaces``,
``--tokenizer-hf-no-include-special-tokens``, ``--vocab-file``, ...) means the same thing
here as in the training run, and the ids written are the ids training would produce.
``tokenizer.tokenize(text)`` is also what Megatron-LM's ``tools/preprocess_data.py`` calls.
"""

from __future__ import annotations

import argparse
import os


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add megatron.training's tokenizer argument group (``--tokenizer-type``, ...) to parser.

    Same as ``megatron.training.arguments._add_tokenizer_args``, without importing the whole
    training argument module.
    """
    from megatron.training.argument_utils import ArgumentGroupFactory
    from megatron.training.config import TokenizerConfig

    ArgumentGroupFactory(TokenizerConfig).build_group(parser, "tokenizer")
    return parser


def tokenizer_namespace(**overrides) -> argparse.Namespace:
    """The tokenizer arguments with megatron's defaults, then ``overrides`` (for library use)."""
    parser = add_tokenizer_args(argparse.ArgumentParser(add_help=False))
    args = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown tokenizer argument {key!r}")
        setattr(args, key, value)
    return args


def build_tokenizer(args: argparse.Namespace):
    """Build the tokenizer megatron.training would build from these arguments.

    Returns a ``megatron.core.tokenizers`` text tokenizer: ``tokenize(str) -> list[int]``,
    ``detokenize(ids) -> str``, ``eod``, ``bos``, ``vocab_size``.
    Vocabulary padding (a model concern) is left to training.
    """
    if args.tokenizer_type is None:
        raise ValueError("--tokenizer-type is required (e.g. SentencePieceTokenizer, "
                         "HuggingFaceTokenizer)")
    needs_model = args.tokenizer_type not in (
        "NullTokenizer", "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer")
    if needs_model and args.tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model "
                         "(a SentencePiece .model file or a HuggingFace tokenizer folder)")
    if needs_model and not os.path.exists(args.tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {args.tokenizer_model}: no such file or "
                                "folder")
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as _build

    args = argparse.Namespace(**vars(args))
    args.pad_vocab_size = False  # padding needs model-parallel sizes: training does it
    return _build(args)
