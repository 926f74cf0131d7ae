"""NaN/Inf from real inputs is caught at the step where it appears and never reaches the weights.

Each case drives a real ``torchrun pretrain_tw.py`` into non-finite numbers through what a user
controls, never by patching a check:

- the loss: a learning rate that overflows (``--lr 1e15``: after one step the attention scores
  overflow and the loss of step 2 is NaN), under ``--tw-nonfinite stop``;
- the scores: a frozen scorer loaded from that overflowed checkpoint (finite trainee, NaN
  short-context losses), under ``stop``;
- the weights: a softmax temperature that overflows (``--tw-temperature 1e-320``: finite scores,
  NaN weights), under ``skip`` with ``--tw-nonfinite-max-skips 2``;
- an empty batch: a corpus of which some sequences are EOD only, with ``--eod-mask-loss``: the
  loss of such a step is 0/0, under ``skip``.

"Never applied" is read off the checkpoints: the one saved after a skipped iteration equals the
one before it, parameters, optimizer state and LR-schedule step count, element for element.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from tests.launch import TINY_MODEL, pretrain, write_random_corpus

pytestmark = pytest.mark.e2e

BASE = [*TINY_MODEL, "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-decay-style", "constant", "--split", "100,0,0",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--make-vocab-size-divisible-by", "64", "--seed", "1234", "--log-interval", "1",
        "--eval-iters", "0", "--eval-interval", "1000"]


def _with(args: list[str], **flags) -> list[str]:
    """``args`` with the given ``--flag value`` pairs replaced or added (flag_name -> value)."""
    out = list(args)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def _run(args):
    return pretrain(1, args, check=False, timeout=300)


def _logged(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"iteration\s+(\d+)/", output)]


def _state(ck, iteration: int) -> dict:
    path = os.path.join(ck, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_state(a: dict, b: dict) -> bool:
    ma, mb = a["model"], b["model"]
    model = ma.keys() == mb.keys() and all(
        torch.equal(ma[k], mb[k]) for k in ma if torch.is_tensor(ma[k]))
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    opt = sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    steps = a["opt_param_scheduler"]["num_steps"] == b["opt_param_scheduler"]["num_steps"]
    return model and opt and steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_random_corpus(tmp_path_factory.mktemp("corpus") / "text", n_docs=300)


@pytest.fixture(scope="module")
def overflowed(corpus, tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("overflow") / "ck")
    args = _with(BASE + ["--data-path", corpus], lr="1e15", train_iters=3, save=ck,
                 save_interval=1, ckpt_format="torch_dist")
    return ck, _run(args)


def test_overflowing_lr_stops_at_the_nan_loss(overflowed):
    ck, run = overflowed
    out = run.stdout
    assert run.returncode != 0
    assert "NonFiniteError: non-finite loss at iteration 2: 128 NaN, 0 Inf of 128 values on " \
           "rank 0" in out, out[-5000:]
    assert _logged(out) == [1]  # step 1 trained and logged; step 2 never finished
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "1"
    assert sorted(os.listdir(ck)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_broken_scorer_checkpoint_stops_at_the_nan_scores(overflowed, corpus):
    ck, _ = overflowed  # its iteration-1 weights give NaN losses: a broken frozen scorer
    run = _run(BASE + ["--data-path", corpus, "--train-iters", "3", "--tw-preset", "sparse",
                       "--tw-scorer", "frozen", "--tw-scorer-load", ck,
                       "--tw-short-context", "32"])
    out = run.stdout
    assert run.returncode != 0
    assert "NonFiniteError: non-finite short-context losses at iteration 1" in out, out[-5000:]
    assert "--tw-scorer-load" in out  # the likely cause is named
    assert _logged(out) == []


def test_overflowing_temperature_skips_then_stops(corpus, tmp_path):
    ck = str(tmp_path / "ck")
    run = _run(BASE + ["--data-path", corpus, "--train-iters", "6", "--tw-preset", "dense",
                       "--tw-normalization", "softmax", "--tw-temperature", "1e-320",
                       "--tw-short-context", "32", "--tw-nonfinite", "skip",
                       "--tw-nonfinite-max-skips", "2", "--save", ck, "--save-interval", "1",
                       "--ckpt-format", "torch"])
    out = run.stdout
    assert run.returncode != 0
    for it in (1, 2):
        assert f"non-finite token weights at iteration {it}: 64 NaN, 0 Inf of 128 values" in out
        assert f"skipped iteration {it}: non-finite token weights" in out, out[-5000:]
    assert "non-finite token weights, non-finite gradients at iteration 3" in out
    assert "3 consecutive iterations skipped, more than --tw-nonfinite-max-skips 2" in out
    first, second = _state(ck, 1), _state(ck, 2)
    assert _same_state(first, second)
    # neither step moved anything: AdamW never stepped, the LR schedule never advanced
    assert first["optimizer"]["state"] == {} and first["opt_param_scheduler"]["num_steps"] == 0
    assert first["model"].keys() and all(
        torch.isfinite(v).all() for v in first["model"].values() if torch.is_tensor(v))


def _eod_corpus(prefix) -> str:
    """Documents of 100 random tokens alternating with documents of 200 EOD tokens: with
    --eod-mask-loss every sequence drawn from inside an EOD document has no token in the loss."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in range(40):
        if i % 2:
            doc = np.full(200, 127, dtype=np.int32)
        else:
            doc = np.append(rng.integers(0, 127, 99), 127).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_empty_batches_are_skipped_and_training_goes_on(tmp_path):
    ck, steps = str(tmp_path / "ck"), 8
    args = _with(BASE, micro_batch_size=1, global_batch_size=1)
    run = _run(args + ["--data-path", _eod_corpus(tmp_path / "eod"), "--eod-mask-loss",
                       "--train-iters", str(steps), "--tw-nonfinite", "skip", "--save", ck,
                       "--save-interval", "1", "--ckpt-format", "torch"])
    out = run.stdout
    assert run.returncode == 0, out[-5000:]
    skipped = {int(i) for i in re.findall(r"skipped iteration (\d+): no token of the global "
                                          r"batch in the loss", out)}
    clean = set(range(2, steps + 1)) - skipped
    assert skipped - {1} and clean, (skipped, out[-3000:])  # both kinds of step happened
    for it in range(2, steps + 1):
        before, after = _state(ck, it - 1), _state(ck, it)
        if it in skipped:
            assert _same_state(before, after), f"skipped iteration {it} changed the state"
        else:
            assert not _same_state(before, after), f"iteration {it} did not train"
            assert after["opt_param_scheduler"]["num_steps"] == \
                before["opt_param_scheduler"]["num_steps"] + 1


# -- NaN scores in a precomputed sidecar, two data-parallel ranks --------------------------------

POISON = 5  # the token whose input embedding the scorer holds as NaN


def _poisoned_hf_scorer(path) -> str:
    """A tiny HF Llama whose input embedding of token POISON is NaN: every window that holds the
    token scores NaN from it on (attention carries it forward), every other window is finite."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=10000.0,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    model.save_pretrained(path)
    return str(path)


def _rare_token_corpus(prefix) -> str:
    """Random documents without POISON, except every fourth, which holds it once."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    vocab = np.array([t for t in range(127) if t != POISON])
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in range(80):
        doc = rng.choice(vocab, int(rng.integers(30, 60)))
        if i % 4 == 0:
            doc[int(rng.integers(0, len(doc)))] = POISON
        doc = np.append(doc, 127).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_nan_in_precomputed_scores_skips_those_steps_on_every_rank(tmp_path):
    """DP2, one sample per rank and step. The oracle is the sidecar file itself: step s reads
    rows 2(s-1) (rank 0) and 2(s-1)+1 (rank 1); it must be skipped exactly when one of them holds
    NaN, also when only one rank saw it, and leave the weights as they were."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tests.launch import torchrun

    steps, ck = 8, str(tmp_path / "ck")
    data = _rare_token_corpus(tmp_path / "text")
    flags = _with(BASE, micro_batch_size=1, global_batch_size=2) + [
        "--data-path", data, "--train-iters", str(steps), "--tw-preset", "dense",
        "--tw-short-context", "32"]
    torchrun(1, "tools/score_data.py",
             [*flags, "--tw-scorer-load", _poisoned_hf_scorer(tmp_path / "scorer"),
              "--no-progress"], timeout=300)
    rows = IndexedDataset(f"{data}_short_loss_train")
    bad = [not np.isfinite(rows[i]).all() for i in range(2 * steps)]
    expected = {s for s in range(1, steps + 1) if bad[2 * s - 2] or bad[2 * s - 1]}
    one_rank = {s: 0 if bad[2 * s - 2] else 1 for s in expected if bad[2 * s - 2] != bad[2 * s - 1]}
    # both ranks alone see a NaN once, and clean steps remain
    assert set(one_rank.values()) == {0, 1} and set(range(2, steps + 1)) - expected, bad

    run = torchrun(2, "pretrain_tw.py",
                   [*flags, "--tw-scorer", "precomputed", "--tw-nonfinite", "skip", "--save", ck,
                    "--save-interval", "1", "--ckpt-format", "torch"], timeout=300, check=False)
    out = run.stdout
    assert run.returncode == 0, out[-5000:]
    skipped = {int(i) for i in re.findall(
        r"skipped iteration (\d+): non-finite short-context losses", out)}
    assert skipped == expected, (skipped, expected)
    for s, rank in one_rank.items():  # found on the rank that read the row, skipped on both
        assert re.search(rf"non-finite short-context losses at iteration {s}: \d+ NaN, 0 Inf of "
                         rf"64 values on rank {rank}", out), out[-5000:]
    for it in range(2, steps + 1):
        before, after = _state(ck, it - 1), _state(ck, it)
        assert _same_state(before, after) == (it in expected), it
