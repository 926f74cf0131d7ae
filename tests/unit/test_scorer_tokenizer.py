"""A frozen scorer of the same vocabulary size but another tokenizer is refused: its folder's
tokenizer must split a fixed probe text as the trainee's does (the size check alone passes)."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.unit


def _spm(prefix, lines):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=100, model_type="bpe", minloglevel=2)
    return f"{prefix}.model"


def _scorer_folder(path, model_file):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(path)
    shutil.copy(model_file, path / "tokenizer.model")
    return str(path)


def test_same_size_other_tokenizer_is_refused(tmp_path):
    import sentencepiece as spm

    from megatron_tw.scoring.frozen import TOKENIZER_PROBE, ScorerError, check_scorer_tokenizer

    trainee = _spm(tmp_path / "a", [f"It was the best of times, it was the worst {i}."
                                    for i in range(200)])
    other = _spm(tmp_path / "b", [f"Call me Ishmael. Some years ago, never mind {i}."
                                  for i in range(200)])
    probe = spm.SentencePieceProcessor(model_file=trainee).encode(TOKENIZER_PROBE)
    same = _scorer_folder(tmp_path / "same", trainee)
    check_scorer_tokenizer(same, probe)  # the trainee's own tokenizer passes
    different = _scorer_folder(tmp_path / "different", other)
    with pytest.raises(ScorerError, match=r"--tw-scorer-load .*different: its tokenizer splits "
                                          r"a probe sentence differently"):
        check_scorer_tokenizer(different, probe)
    check_scorer_tokenizer(different, None)  # no probe (e.g. NullTokenizer): not checked


def test_a_converted_checkpoint_is_not_taken_for_an_hf_folder(tmp_path):
    """hf-to-megatron leaves its template config.json in the checkpoint folder; the frozen scorer
    must still load it as a megatron checkpoint."""
    from megatron_tw.scoring.frozen import is_hf_folder

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("release")
    assert is_hf_folder(str(hf)) and not is_hf_folder(str(ckpt))
