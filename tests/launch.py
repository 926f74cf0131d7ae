"""Helpers for tests that run the training entry point as a user does (torchrun + gloo)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A tiny Llama-style model: every test that trains uses it unless it needs otherwise.
TINY_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--rotary-base", "10000",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0",
]
TINY_TRAINING = [
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "3e-3", "--min-lr", "3e-3", "--lr-decay-style", "constant",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--make-vocab-size-divisible-by", "64", "--seed", "1234",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def torchrun(nproc: int, script: str, args: list[str], timeout: float = 240,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc-per-node nproc script args`` from the repo root; return the result
    (stdout+stderr merged). A hung gloo collective is killed by ``timeout``."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def pretrain(nproc: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return torchrun(nproc, "pretrain_tw.py", args, **kwargs)


_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_FIELD = re.compile(r"([a-zA-Z][a-zA-Z0-9 ._-]*?):\s+([-+0-9.eEnaif]+)\s*\|")


def iteration_logs(output: str) -> dict[int, dict[str, float]]:
    """Parse megatron's console lines into {iteration: {field: value}}."""
    logs = {}
    for line in output.splitlines():
        m = _ITER.search(line)
        if m:
            fields = {k.strip(): float(v) for k, v in _FIELD.findall(m.group(2) + "|")}
            logs[int(m.group(1))] = fields
    return logs


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files under ``logdir`` (full precision,
    one value per step, unlike the console, which megatron averages over logged intervals)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def train(nproc: int, args: list[str], logdir, **kwargs) -> dict[str, dict[int, float]]:
    """Run pretrain_tw.py with TensorBoard logging to ``logdir``; return its scalars."""
    pretrain(nproc, [*args, "--tensorboard-dir", str(logdir)], **kwargs)
    return tensorboard_scalars(logdir)


def assert_same_run(got: dict, ref: dict, tags=("lm loss", "grad-norm"), rel=1e-5, steps=None):
    """Per-step equality of the given scalars between two runs (within float tolerance)."""
    import pytest

    for tag in tags:
        want = ref[tag] if steps is None else {s: ref[tag][s] for s in steps}
        assert sorted(got[tag]) == sorted(want), (tag, sorted(got[tag]), sorted(want))
        for step, value in want.items():
            assert got[tag][step] == pytest.approx(value, rel=rel, abs=1e-6), (tag, step)


def write_random_corpus(prefix, *, n_docs: int = 200, vocab: int = 128, min_len: int = 5,
                        max_len: int = 60, seed: int = 0) -> str:
    """A small indexed dataset of random documents ending in EOD (= vocab - 1, NullTokenizer's),
    for runs that need uneven loss masks (``--eod-mask-loss``) or real --data-path handling.
    Returns the prefix to pass as ``--data-path``."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(n_docs):
        n = int(rng.integers(min_len, max_len))
        doc = np.append(rng.integers(0, vocab - 1, n - 1), vocab - 1).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def train_small_sentencepiece(prefix) -> str:
    """A real 100-piece BPE SentencePiece model trained on a few lines, written to
    ``prefix``.model; returns that path (for tests that need a tokenizer file, not its quality)."""
    import sentencepiece as spm

    lines = [f"It was the best of times, it was the worst of times {i}." for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=100, model_type="bpe", minloglevel=2)
    return f"{prefix}.model"
