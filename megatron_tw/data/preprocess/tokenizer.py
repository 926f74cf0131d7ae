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


class TokenizerError(ValueError):
    """A ``--tokenizer-model`` that does not hold the tokenizer ``--tokenizer-type`` names; the
    message names the flag, the path and the fix (one line)."""


# Files that carry an HF tokenizer's vocabulary (tokenizer_config.json alone does not: without
# one of these, transformers falls back to converting a slow tokenizer and then blames a missing
# sentencepiece/tiktoken install).
HF_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                       "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_tokenizer_path(tokenizer_type: str, path: str) -> None:
    """Refuse a path that cannot hold this tokenizer type before megatron tries to load it."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if os.path.isfile(path):
            raise TokenizerError(
                f"--tokenizer-model {path}: a file, but --tokenizer-type HuggingFaceTokenizer "
                "takes a tokenizer folder (tokenizer.json, ...); for a SentencePiece .model file "
                "pass --tokenizer-type SentencePieceTokenizer")
        if not any(os.path.isfile(os.path.join(path, n)) for n in HF_VOCABULARY_FILES):
            model_folder = os.path.isfile(os.path.join(path, "config.json"))
            raise TokenizerError(
                f"--tokenizer-model {path}: no tokenizer files in this folder (none of "
                f"{', '.join(HF_VOCABULARY_FILES[:4])}"
                + ("; it holds a model config.json without its tokenizer" if model_folder else "")
                + "); pass the folder the tokenizer was saved to (tokenizer.save_pretrained)")
    elif tokenizer_type == "SentencePieceTokenizer" and os.path.isdir(path):
        inside = os.path.join(path, "tokenizer.model")
        hint = (f"pass --tokenizer-model {inside}" if os.path.isfile(inside) else
                "pass the .model file written by tools/train_tokenizer.py, or "
                "--tokenizer-type HuggingFaceTokenizer for an HF tokenizer folder")
        raise TokenizerError(f"--tokenizer-model {path}: a folder, but --tokenizer-type "
                             f"SentencePieceTokenizer takes a .model file; {hint}")


def build_tokenizer(args: argparse.Namespace):
    """Build the tokenizer megatron.training would build from these arguments.

    Returns a ``megatron.core.tokenizers`` text tokenizer: ``tokenize(str) -> list[int]``,
    ``detokenize(ids) -> str``, ``eod``, ``bos``, ``vocab_size``.
    Vocabulary padding (a model concern) is left to training. Raises FileNotFoundError for a
    missing ``--tokenizer-model`` and TokenizerError for one that holds no such tokenizer.
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
    if needs_model:
        _check_tokenizer_path(args.tokenizer_type, args.tokenizer_model)
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as _build

    args = argparse.Namespace(**vars(args))
    args.pad_vocab_size = False  # padding needs model-parallel sizes: training does it
    try:
        return _build(args)
    except AttributeError as exc:  # e.g. MultimodalTokenizer: args.tokenizer_prompt_format
        flag = "--" + (getattr(exc, "name", None) or "?").replace("_", "-")
        raise TokenizerError(
            f"--tokenizer-type {args.tokenizer_type}: refused: megatron builds it from {flag}, a "
            "training flag outside megatron.training's tokenizer group, which Megatron-LM's "
            "preprocess_data.py does not accept either (it fails there the same way); preprocess "
            "the text with that model's text tokenizer (e.g. HuggingFaceTokenizer)") from exc
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AssertionError,
            ImportError) as exc:
        what = f" --tokenizer-model {args.tokenizer_model}" if needs_model else ""
        if args.tokenizer_type == "SentencePieceTokenizer":
            raise TokenizerError(
                f"--tokenizer-model {args.tokenizer_model}: not a SentencePiece model "
                f"({_one_line(exc)}); pass the .model file written by tools/train_tokenizer.py, "
                "or --tokenizer-type HuggingFaceTokenizer for an HF tokenizer folder") from exc
        raise TokenizerError(f"--tokenizer-type {args.tokenizer_type}{what}: cannot load the "
                             f"tokenizer ({_one_line(exc)}); check the --tokenizer-* flags"
                             ) from exc
