"""What identifies a sidecar's samples (content, not paths), and the flag-time checks of
``--tw-scorer precomputed`` and of tools/score_data.py.

- A GPTDataset's fingerprint follows the data's *content*: a copy of the corpus elsewhere has the
  same fingerprint, one changed token, another seed or another sample count does not.
- Long-document sampling is prefix-stable (more samples = the same first samples), so its
  fingerprint leaves out the sample count, which the reader checks as a minimum instead.
- score_data replaces the training's parallel layout by one process per scorer but keeps the
  vocabulary padding, which megatron computes from --make-vocab-size-divisible-by x TP.
"""

import importlib.util
import json
import shutil

import numpy
import pytest
import torch

from tests.launch import ROOT, TINY_MODEL, TINY_TRAINING, write_random_corpus

pytestmark = pytest.mark.unit
SEQ = 32


def gpt_train(prefix, *, seed=1234, num_samples=20):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_tw.data.preprocess.tokenizer import build_tokenizer, tokenizer_namespace

    tokenizer = build_tokenizer(tokenizer_namespace(tokenizer_type="NullTokenizer", vocab_size=127))
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ, blend=([str(prefix)], None), split="1,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(prefix) + f"_cache{seed}_{num_samples}")
    return BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True,
                                         config).build()[0]


def fingerprint(dataset, seed=1234):
    import argparse

    from megatron_tw.data.short_loss import dataset_fingerprint

    return dataset_fingerprint(argparse.Namespace(seed=seed), dataset, "train")


def test_gpt_fingerprint_follows_content_not_path(tmp_path):
    from megatron_tw.data.short_loss import fingerprint_differences

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_random_corpus(tmp_path / "a" / "corpus", n_docs=40)
    for ext in (".bin", ".idx"):
        shutil.copy(a + ext, tmp_path / "b" / f"moved{ext}")
    base = fingerprint(gpt_train(a))
    assert fingerprint_differences(base, fingerprint(gpt_train(tmp_path / "b" / "moved"))) == []

    diffs = fingerprint_differences(base, fingerprint(gpt_train(a, seed=7)))
    assert any(d.startswith("random_seed: sidecar 1234, this run 7") for d in diffs), diffs
    diffs = fingerprint_differences(base, fingerprint(gpt_train(a, num_samples=40)))
    assert any(d.startswith("num_samples: sidecar 20, this run 40") for d in diffs), diffs

    tokens = numpy.memmap(a + ".bin", dtype=numpy.int32, mode="r+")
    tokens[17] = (tokens[17] + 1) % 120
    tokens.flush()
    diffs = fingerprint_differences(base, fingerprint(gpt_train(a)))
    assert [d.split(":")[0] for d in diffs] == ["dataset_path.bin.md5"], diffs


def test_long_document_samples_are_prefix_stable_so_count_is_not_fingerprinted(tmp_path):
    from megatron_tw.data.long_document import build_long_document_datasets
    from megatron_tw.data.short_loss import fingerprint_differences

    prefix = write_random_corpus(tmp_path / "docs", n_docs=30, min_len=40, max_len=200)

    def build(n):
        return build_long_document_datasets(prefix, seq_length=SEQ, bos_id=126,
                                            min_document_length=0, split="1,0,0",
                                            num_samples=n, seed=3)[0]

    short, long = build(10), build(25)
    for i in range(10):
        assert torch.equal(short[i]["tokens"], long[i]["tokens"])
        assert torch.equal(short[i]["labels"], long[i]["labels"])
    assert fingerprint_differences(fingerprint(short, 3), fingerprint(long, 3)) == []
    assert fingerprint_differences(fingerprint(short, 3), fingerprint(short, 4)) == [
        "seed: sidecar 3, this run 4"]


# -- flags ------------------------------------------------------------------------------------

BASE = [*TINY_MODEL, *TINY_TRAINING, "--train-iters", "2", "--tw-preset", "dense"]


@pytest.fixture
def parse(monkeypatch):
    from megatron_tw.arguments import parse_and_validate_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    return lambda argv: parse_and_validate_args([*BASE, *argv], set_globals=False)


def test_precomputed_with_mock_data_needs_a_path(parse):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"--tw-scorer precomputed with --mock-data: give "
                                          r"--tw-short-loss-path PREFIX"):
        parse(["--tw-scorer", "precomputed"])


def test_flags_parse_without_the_sidecar(parse, tmp_path):
    """Launch scripts are checked off the cluster: a missing sidecar is reported when the
    datasets are built (tests/e2e/test_score_data.py), not by the flag checks."""
    args = parse(["--tw-scorer", "precomputed", "--tw-short-loss-path", str(tmp_path / "none")])
    assert args.tw_short_loss_path == str(tmp_path / "none") and args.tw_short_context is None


def test_short_context_not_given_comes_from_the_sidecar(parse, tmp_path):
    from megatron_tw.data.short_loss import FORMAT

    prefix = tmp_path / "sl"
    for ext in ("bin", "idx"):
        (tmp_path / f"sl_train.{ext}").write_bytes(b"")
    (tmp_path / "sl_train.json").write_text(json.dumps({"format": FORMAT, "fingerprint": {
        "short_context": {"window": 16, "mode": "windows", "stride": 8}}}))
    args = parse(["--tw-scorer", "precomputed", "--tw-short-loss-path", str(prefix)])
    assert (args.tw_short_context, args.tw_short_mode, args.tw_short_stride) == (16, "windows", 8)
    # given flags are kept (and compared with the sidecar's when the datasets are built)
    args = parse(["--tw-scorer", "precomputed", "--tw-short-loss-path", str(prefix),
                  "--tw-short-context", "12", "--tw-short-mode", "sliding"])
    assert (args.tw_short_context, args.tw_short_mode) == (12, "sliding")


def _score_data():
    spec = importlib.util.spec_from_file_location("score_data", ROOT / "tools" / "score_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_data_keeps_the_samples_and_padding_but_not_the_layout():
    tool = _score_data()
    argv = ["--seq-length", "64", "--tensor-model-parallel-size", "2", "--context-parallel-size=2",
            "--sequence-parallel", "--num-layers-per-virtual-pipeline-stage", "1",
            "--make-vocab-size-divisible-by", "64", "--tw-scorer", "precomputed"]
    out = tool.scoring_argv(argv)
    assert "--sequence-parallel" not in out and "--num-layers-per-virtual-pipeline-stage" not in out
    assert out[:2] == ["--seq-length", "64"]
    for flag, value in (("--tensor-model-parallel-size", "1"), ("--context-parallel-size", "1"),
                        ("--pipeline-model-parallel-size", "1"), ("--tw-scorer", "frozen"),
                        ("--make-vocab-size-divisible-by", "128")):
        assert tool._last_value(out, flag, None) == value, flag

    def padded(vocab, divisible, tp):  # megatron's rule, written out
        multiple = divisible * tp
        return -(-vocab // multiple) * multiple

    for vocab in (100, 128, 130, 32000, 128256):
        assert padded(vocab, 64, 2) == padded(vocab, 128, 1)


@pytest.mark.parametrize("drop,message", [
    ("--tw-scorer-load", r"give --tw-scorer-load <HF folder or Megatron checkpoint>"),
    ("--global-batch-size", r"give --global-batch-size as the training run does"),
])
def test_score_data_requires_the_scorer_and_the_global_batch(monkeypatch, drop, message):
    from megatron_tw.arguments import ConfigError

    monkeypatch.setenv("RANK", "0")
    argv = [*BASE, "--tw-short-context", "16", "--tw-scorer-load", "/models/scorer"]
    i = argv.index(drop)
    with pytest.raises(ConfigError, match=message):
        _score_data().parse(argv[:i] + argv[i + 2:])


def test_score_data_validates_windows_as_a_frozen_run(monkeypatch):
    from megatron_tw.arguments import ConfigError

    monkeypatch.setenv("RANK", "0")
    argv = [*BASE, "--tw-preset", "uniform", "--tw-short-context", "17", "--tw-short-mode",
            "windows", "--tw-short-stride", "5", "--tw-scorer-load", "/models/scorer"]
    with pytest.raises(ConfigError, match=r"--tw-short-stride 5 must .* divisible by S"):
        _score_data().parse(argv)
    tool, args = _score_data().parse(argv[:-4] + ["--tw-scorer-load", "/models/scorer"])
    assert args.tw_short_stride == 8  # the default W // 2, as the training run resolves it
    assert args.tensorboard_dir is None
