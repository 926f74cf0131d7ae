"""Text <-> token ids for evaluation: a SentencePiece model file or a Hugging Face tokenizer folder.

Both give the ids training saw: ``tools/preprocess_data.py`` tokenizes documents with megatron's
``SentencePieceTokenizer`` (plain ``encode`` of the text, no BOS) or ``HuggingFaceTokenizer``, and
appends EOD. Evaluation therefore encodes without special tokens and adds BOS only on request
(``add_bos``), for models whose training documents started with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or used; the message names the flag and the fix."""


@dataclass
class TextTokenizer:
    """``encode(text) -> list[int]`` and ``decode(ids) -> str`` over one backend.

    vocab_size: the tokenizer's vocabulary (a model's logits are cut to it: padded rows of a
        megatron vocabulary are not tokens).
    bos_id, eod_id: special ids (None when the tokenizer has none).
    """

    name: str
    vocab_size: int
    bos_id: Optional[int]
    eod_id: Optional[int]
    _encode: object
    _decode: object
    add_bos: bool = False

    def encode(self, text: str) -> list[int]:
        ids = list(self._encode(text))
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def count(self, text: str) -> int:
        """Number of tokens ``encode(text)`` gives (BOS included when added)."""
        return len(self.encode(text))


def sentencepiece_tokenizer(model_file: str, add_bos: bool = False) -> TextTokenizer:
    import sentencepiece

    if not os.path.isfile(model_file):
        raise TokenizerError(f"--tokenizer-model {model_file}: no such file (a SentencePiece "
                             ".model, e.g. data/demo/tokenizer/tokenizer.model)")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    bos, eos = sp.bos_id(), sp.eos_id()
    return TextTokenizer(name=f"sentencepiece:{model_file}", vocab_size=sp.get_piece_size(),
                         bos_id=bos if bos >= 0 else None, eod_id=eos if eos >= 0 else None,
                         _encode=sp.encode, _decode=sp.decode, add_bos=add_bos)


def hf_tokenizer(folder: str, add_bos: bool = False) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{folder}: no Hugging Face tokenizer here ({err}); pass "
                             "--tokenizer-model FILE.model or --tokenizer FOLDER") from err

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    return TextTokenizer(name=f"hf:{folder}", vocab_size=len(tok), bos_id=tok.bos_token_id,
                         eod_id=tok.eos_token_id, _encode=encode, _decode=decode,
                         add_bos=add_bos)


def load_tokenizer(path: str, add_bos: bool = False) -> TextTokenizer:
    """A SentencePiece ``.model`` file, or a folder holding HF tokenizer files (a folder with only
    ``tokenizer.model`` is read by SentencePiece directly: the same ids, faster)."""
    if os.path.isfile(path):
        return sentencepiece_tokenizer(path, add_bos)
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer {path}: no such file or folder")
    hf_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any(os.path.exists(os.path.join(path, f)) for f in hf_files):
        spm = os.path.join(path, "tokenizer.model")
        if os.path.isfile(spm):
            return sentencepiece_tokenizer(spm, add_bos)
    return hf_tokenizer(path, add_bos)
