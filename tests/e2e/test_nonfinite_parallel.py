"""NaN on one rank of a parallel layout: every rank skips (or stops at) that step alike.

The NaN source is the mechanism of test_nonfinite.py's sidecar case: precomputed short-context
losses (``--tw-scorer precomputed``), here scored once by a finite HF scorer
(tools/score_data.py), then poisoned at chosen (sample, position) cells, one NaN each (the
sidecar's record is updated to the new file identity). Sample i is row i; the global batch of
step s is samples 2(s-1) and 2s-1:

    cell (row, position)   step   DP2 (one sample per rank)   CP2 (rank r holds chunks r, 3-r
                                                              of 4: positions 0-15+48-63 | 16-47)
    (2, 40)                2      rank 0                       CP rank 1
    (7, 55)                4      rank 1                       CP rank 0
    (8, 20)                5      rank 0                       CP rank 1
    (11, 3)                6      rank 1                       CP rank 0

The sparse preset ranks a NaN score below every other, so the weights, the loss and the
gradients stay finite: only the finding rank's score check sees the NaN, and the other rank
skips because the guard reduces the verdict over all ranks (without it, replicas would diverge).

- DP2, ``--bf16 --use-distributed-optimizer`` (bf16 parameters, fp32 main parameters and AdamW
  state sharded over the two ranks), ``--tw-nonfinite skip --tw-nonfinite-max-skips 2``: steps
  2, 4, 5 skipped, step 6 the third consecutive one: the run stops (raised on every rank by the
  guard). A skipped step's checkpoint equals the one before, element for element, including the
  AdamW state of both shards (``distrib_optim.pt`` gathers them); a trained one does not.
- CP2, ``skip``: steps 2, 4, 5, 6 skipped on both ranks: rank 0 says so and its checkpoint is
  unchanged; megatron's log line, printed by the last rank (CP rank 1), counts the skip. The
  NaN is reported by the one rank that holds it.
- CP2, ``stop``: the run stops at step 2 on CP rank 1, which holds the NaN (CP rank 0 holds none
  and reports none); no checkpoint of step 2 exists.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from tests.launch import TINY_MODEL, iteration_logs, torchrun, write_random_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

STEPS = 6
CELLS = {(2, 40): 2, (7, 55): 4, (8, 20): 5, (11, 3): 6}  # (row, position) -> step
BASE = [*TINY_MODEL, "--micro-batch-size", "1", "--global-batch-size", "2",
        "--lr", "3e-3", "--lr-decay-style", "constant", "--split", "100,0,0",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--make-vocab-size-divisible-by", "64", "--seed", "1234", "--log-interval", "1",
        "--eval-iters", "0", "--eval-interval", "1000", "--train-iters", str(STEPS),
        "--tw-preset", "sparse", "--tw-short-context", "16"]


def _hf_scorer(path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=10000.0,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus and its sidecar with one NaN in each cell of CELLS."""
    from megatron_tw.data.short_loss import file_identity, split_paths

    tmp = tmp_path_factory.mktemp("nonfinite-parallel")
    corpus = write_random_corpus(tmp / "text", n_docs=120)
    flags = BASE + ["--data-path", corpus]
    torchrun(1, "tools/score_data.py",
             [*flags, "--tw-scorer-load", _hf_scorer(tmp / "scorer"), "--no-progress"],
             timeout=300)
    paths = split_paths(f"{corpus}_short_loss", "train")
    with open(paths["json"]) as f:
        record = json.load(f)
    rows = np.memmap(paths["bin"], dtype=np.float32, mode="r+", shape=(record["rows"], 64))
    assert np.isfinite(rows).all()
    for row, position in CELLS:
        rows[row, position] = np.nan
    rows.flush()
    del rows
    record["files"]["bin"] = file_identity(paths["bin"])
    with open(paths["json"], "w") as f:
        json.dump(record, f, indent=1)
    return flags + ["--tw-scorer", "precomputed"]


def _run(nproc, args):
    return torchrun(nproc, "pretrain_tw.py", args, timeout=300, check=False)


def _tensors(obj, prefix=""):
    """{path: tensor} of every tensor in a nested checkpoint object."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _state(ck, iteration: int) -> dict:
    """Model, optimizer (and, with the distributed optimizer, every shard's main parameters and
    AdamW state) and the LR-schedule step count of one checkpoint (--ckpt-format torch)."""
    folder = os.path.join(ck, f"iter_{iteration:07d}", "mp_rank_00")
    main = torch.load(os.path.join(folder, "model_optim_rng.pt"), map_location="cpu",
                      weights_only=False)
    state = {"model": _tensors(main["model"]), "optimizer": _tensors(main["optimizer"]),
             "steps": main["opt_param_scheduler"]["num_steps"]}
    shards = os.path.join(folder, "distrib_optim.pt")
    if os.path.exists(shards):
        state["shards"] = _tensors(torch.load(shards, map_location="cpu", weights_only=False))
    return state


def _same_state(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return a["steps"] == b["steps"] and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        for k in a if k != "steps")


def _skipped(out: str) -> set[int]:
    return {int(i) for i in re.findall(
        r"skipped iteration (\d+): non-finite short-context losses", out)}


def _found(out: str) -> dict[int, set[int]]:
    """{iteration: ranks that reported a NaN score in it}."""
    found = {}
    for it, rank in re.findall(r"non-finite short-context losses at iteration (\d+): 1 NaN, 0 Inf "
                               r"of \d+ values on rank (\d+)", out):
        found.setdefault(int(it), set()).add(int(rank))
    return found


def test_dp2_bf16_distributed_optimizer_skips_then_stops(data, tmp_path):
    ck = str(tmp_path / "ck")
    run = _run(2, data + ["--bf16", "--use-distributed-optimizer", "--tw-nonfinite", "skip",
                          "--tw-nonfinite-max-skips", "2", "--save", ck, "--save-interval", "1",
                          "--ckpt-format", "torch"])
    out = run.stdout
    assert run.returncode != 0, out[-5000:]
    assert _skipped(out) == {2, 4, 5}, out[-5000:]
    # each NaN reported by the one data-parallel rank that read its row
    assert _found(out) == {2: {0}, 4: {1}, 5: {0}, 6: {1}}, _found(out)
    assert "3 consecutive iterations skipped, more than --tw-nonfinite-max-skips 2" in out
    assert re.search(r"NonFiniteError: non-finite short-context losses at iteration 6", out)
    logs = iteration_logs(out)  # megatron's line, from the last rank (DP rank 1)
    assert sorted(logs) == [1, 2, 3, 4, 5], sorted(logs)
    assert [int(logs[i].get("number of skipped iterations", 0)) for i in range(1, 6)] == \
        [0, 1, 0, 1, 1]
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "5"  # step 6 stopped before its save
    states = {it: _state(ck, it) for it in range(1, 6)}
    assert "shards" in states[1] and states[1]["shards"], "no distributed-optimizer state saved"
    assert {t.dtype for t in states[1]["model"].values()} == {torch.bfloat16}
    for it in range(2, 6):
        assert _same_state(states[it - 1], states[it]) == (it in {2, 4, 5}), it
    assert states[3]["steps"] == states[1]["steps"] + 2  # one step of the 2-sample global batch


def test_cp2_nan_on_one_rank_is_skipped_on_both(data, tmp_path):
    ck = str(tmp_path / "ck")
    run = _run(2, data + ["--context-parallel-size", "2", "--tw-nonfinite", "skip",
                          "--save", ck, "--save-interval", "1", "--ckpt-format", "torch"])
    out = run.stdout
    assert run.returncode == 0, out[-5000:]
    assert _skipped(out) == {2, 4, 5, 6}, out[-5000:]  # rank 0's verdict (it prints)
    # each NaN reported by the CP rank that holds its position only (32 values: half a row)
    assert _found(out) == {2: {1}, 4: {0}, 5: {1}, 6: {0}}, _found(out)
    assert re.search(r"of 32 values on rank 1", out)
    logs = iteration_logs(out)  # CP rank 1's own count of skipped steps
    assert [int(logs[i].get("number of skipped iterations", 0)) for i in range(1, 7)] == \
        [0, 1, 0, 1, 1, 1]
    states = {it: _state(ck, it) for it in range(1, 7)}
    for it in range(2, 7):
        assert _same_state(states[it - 1], states[it]) == (it in {2, 4, 5, 6}), it


def test_cp2_nan_on_one_rank_stops_the_run(data, tmp_path):
    ck = str(tmp_path / "ck")
    run = _run(2, data + ["--context-parallel-size", "2", "--tw-nonfinite", "stop",
                          "--save", ck, "--save-interval", "1", "--ckpt-format", "torch"])
    out = run.stdout
    assert run.returncode != 0
    assert re.search(r"NonFiniteError: non-finite short-context losses at iteration 2: 1 NaN, "
                     r"0 Inf of 32 values on rank 1\. Stopped before the optimizer step", out), \
        out[-5000:]
    assert not re.search(r"non-finite .* on rank 0", out)  # CP rank 0 holds no NaN
    assert sorted(iteration_logs(out)) == [1]
    assert sorted(os.listdir(ck)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
