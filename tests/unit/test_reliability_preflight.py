"""Start-up checks of what a run reads before its first step: the checkpoint ``--load`` resumes
from and the tokenizer file. Real files: checkpoints written by torch.distributed.checkpoint
(the storage layer of megatron's torch_dist format) and torch.save (megatron's torch format), a
SentencePiece model trained here; each damaged the way a kill or a bad copy damages it.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from megatron_tw.arguments import ConfigError
from megatron_tw.reliability.preflight import (check_load_checkpoint, check_tokenizer_files,
                                          checkpoint_problems)
from tests.launch import TINY_MODEL, TINY_TRAINING

pytestmark = pytest.mark.unit


def _torch_dist(folder, seed=0):
    """A checkpoint folder as megatron's torch_dist writes it: DCP files + metadata.json."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(seed)
    state = {"model.w": torch.randn(64, 32, generator=g), "model.b": torch.randn(32, generator=g)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                      "sharded_backend_version": 1}))
    return folder


def _torch_legacy(folder):
    (folder / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": {"w": torch.randn(64, 32)}, "iteration": 3},
               folder / "mp_rank_00" / "model_optim_rng.pt")
    return folder


def _truncate(path, keep=0.5):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    return size


def test_complete_checkpoints_have_no_problems(tmp_path):
    assert checkpoint_problems(str(_torch_dist(tmp_path / "a"))) == []
    assert checkpoint_problems(str(_torch_legacy(tmp_path / "b"))) == []


def test_torch_dist_damage_is_named(tmp_path):
    folder = _torch_dist(tmp_path / "iter_0000004")
    data = sorted(folder.glob("*.distcp"))[0]
    size = _truncate(data)
    assert checkpoint_problems(str(folder)) == [
        f"{data.name} is truncated ({size // 2} of {size} bytes)"]
    data.unlink()
    assert checkpoint_problems(str(folder)) == [f"missing {data.name}"]
    _truncate(folder / ".metadata")
    assert checkpoint_problems(str(folder))[0].startswith("unreadable .metadata")
    (folder / ".metadata").unlink()
    assert checkpoint_problems(str(folder)) == ["missing .metadata (written at the end of a save)"]
    (folder / "metadata.json").unlink()  # what an interrupted first save leaves
    assert "this save was interrupted" in checkpoint_problems(str(folder))[0]


def test_torch_format_damage_is_named(tmp_path):
    folder = _torch_legacy(tmp_path / "iter_0000003")
    _truncate(folder / "mp_rank_00" / "model_optim_rng.pt", keep=0.9)
    (problem,) = checkpoint_problems(str(folder))
    assert problem.startswith("mp_rank_00/model_optim_rng.pt is truncated or damaged")
    (folder / "mp_rank_00" / "model_optim_rng.pt").unlink()
    assert checkpoint_problems(str(folder)) == ["missing mp_rank_00/model_optim_rng.pt"]


def _load(load, step=None):
    check_load_checkpoint(argparse.Namespace(load=str(load), ckpt_step=step))


def test_tracker_naming_an_incomplete_checkpoint_points_to_the_complete_one(tmp_path):
    ck = tmp_path / "ck"
    _torch_dist(ck / "iter_0000002")
    broken = _torch_dist(ck / "iter_0000004", seed=1)
    (broken / ".metadata").unlink()
    (ck / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(ConfigError) as err:
        _load(ck)
    msg = str(err.value)
    assert f"--load {ck}: checkpoint iter_0000004 (named by latest_checkpointed_iteration.txt) " \
           "is incomplete: missing .metadata" in msg
    assert ("complete checkpoints here: iter_0000002; resume from the newest with "
            "--ckpt-step 2") in msg
    _load(ck, step=2)  # the fix it names works
    with pytest.raises(ConfigError, match=r"iter_0000004 \(named by --ckpt-step 4\)"):
        _load(ck, step=4)


@pytest.mark.parametrize("text", ["", "4\x00", "latest"])
def test_damaged_tracker_fails_instead_of_exiting_quietly(tmp_path, text):
    ck = tmp_path / "ck"
    _torch_dist(ck / "iter_0000002")
    (ck / "latest_checkpointed_iteration.txt").write_text(text)
    with pytest.raises(ConfigError) as err:
        _load(ck)
    assert f"holds {text.strip()!r}, not an iteration" in str(err.value)
    assert "--ckpt-step 2" in str(err.value)


def test_no_checkpoint_yet_starts_from_scratch(tmp_path, capsys):
    _load(tmp_path / "does-not-exist")  # first run of an auto-resume job: nothing to check
    ck = tmp_path / "ck"
    _torch_dist(ck / "iter_0000002")  # a folder without tracker: megatron starts from scratch
    _load(ck)
    err = capsys.readouterr().err
    assert "no latest_checkpointed_iteration.txt" in err and "--ckpt-step 2" in err, err


# -- tokenizer files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    words = "sea ship whale morning letter garden storm river island captain".split()
    text = folder / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(words[i] for i in torch.randint(0, 10, (12,), generator=g))
                              for _ in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spm"),
                                             vocab_size=40, model_type="bpe")
    return folder / "spm.model"


def _tok(kind, model=None, **extra):
    ns = argparse.Namespace(tokenizer_type=kind, tokenizer_model=model and str(model),
                            vocab_file=None, merge_file=None)
    for k, v in extra.items():
        setattr(ns, k, v)
    check_tokenizer_files(ns)


def test_sentencepiece_model_checks(tmp_path, sentencepiece_model):
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        _tok(kind, sentencepiece_model)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(ConfigError, match=f"--tokenizer-model {junk} is not a SentencePiece model"):
        _tok("SentencePieceTokenizer", junk)
    with pytest.raises(ConfigError, match="no such file"):
        _tok("SentencePieceTokenizer", tmp_path / "missing.model")
    with pytest.raises(ConfigError, match="needs --tokenizer-model"):
        _tok("Llama2Tokenizer", None)


def test_vocabulary_files_must_exist(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text("{}")
    with pytest.raises(ConfigError, match="needs --merge-file"):
        _tok("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(tmp_path / "none.txt"))
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face tokenizer folder"):
        _tok("HuggingFaceTokenizer", hf)
    _tok("NullTokenizer")


def test_checks_run_from_the_parser(tmp_path, monkeypatch):
    """Registered with megatron_tw.arguments: the parser runs them before megatron's own
    validation, and the non-finite flags land in the namespace."""
    from megatron_tw.arguments import parse_and_validate_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    base = [*TINY_MODEL, *TINY_TRAINING, "--train-iters", "2"]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(ConfigError, match="not an iteration"):
        parse_and_validate_args([*base, "--load", str(ck)], set_globals=False)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=f"--tokenizer-model {junk} is not a SentencePiece"):
        parse_and_validate_args([*base, "--tokenizer-type", "SentencePieceTokenizer",
                                 "--tokenizer-model", str(junk)], set_globals=False)
    args = parse_and_validate_args([*base, "--tw-nonfinite", "skip"], set_globals=False)
    # skip owns the gradient check: megatron's fatal DDP check is off, the guard's is on
    assert args.tw_nonfinite == "skip" and args.tw_check_nonfinite
    assert not args.check_for_nan_in_loss_and_grad
    args = parse_and_validate_args([*base, "--no-check-for-nan-in-loss-and-grad"],
                                   set_globals=False)
    assert args.tw_nonfinite == "stop" and not args.tw_check_nonfinite
