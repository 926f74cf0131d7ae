"""The micro-batch path on (fake) CUDA: every tensor the project allocates is on the compute
device, and the hot path reads nothing back to the host.

PyTorch's ``FakeTensorMode`` makes tensors with ``device="cuda"`` on a CPU-only build; it raises
``FakeTensorDeviceMismatchError`` when a CPU and a CUDA tensor meet, and
``DataDependentOutputException`` when a value is read back to the host (``bool(t)``, ``.item()``,
``nonzero``, boolean indexing). So a buffer left on the CPU, or a host sync, fails these tests.

Covered: the batch path (a real CPU dataset sample -> get_batch on the compute device), the
windows-mode span scoring (with BOS substitution), every weighting preset, the weight statistics
and the loss function (with the non-finite checks off: their one host read per checked tensor is
what ``--tw-nonfinite`` costs, counted in ``test_nonfinite_checks_read_once_per_tensor``).
Not covered here: megatron's own modules under fake tensors (GPTModel construction reads the
CUDA RNG tracker and device properties, which a CPU build cannot fake), the NCCL collectives and
the frozen scorer's checkpoint load; their device handling is pinned by the machine profile
(tests/unit/test_machine.py) and by the code: the frozen scorer is moved with
``model.to(runtime.compute_device())`` (scoring/frozen.py).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

pytestmark = pytest.mark.fake_cuda  # run by test_device_path.py in a fresh process

CUDA = torch.device("cuda", 0)
B, S = 2, 64


@pytest.fixture
def fake():
    return FakeTensorMode(allow_non_fake_inputs=True)


def _sample(seed: int = 0) -> dict:
    """One sample as the datasets yield it: CPU tensors."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (B, S), generator=g)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
            "loss_mask": (torch.rand(B, S, generator=g) > 0.1).float(),
            "position_ids": torch.arange(S).expand(B, S).clone(),
            "sample_id": torch.arange(B), "short_loss": torch.rand(B, S, generator=g)}


def _batch(keys=None, device=CUDA):
    from megatron_tw.data.batch import BATCH_KEYS, get_batch

    keys = [BATCH_KEYS[k] for k in (keys or ("tokens", "labels", "loss_mask", "position_ids",
                                              "sample_id", "short_loss"))]
    return get_batch(iter([_sample()]), keys=keys, micro_batch_size=B, seq_length=S,
                     tp_group=None, tp_src_rank=0, cp_group=None, device=device,
                     keep_full=("tokens", "labels"))


def test_the_batch_reaches_the_compute_device(fake):
    with fake:
        batch = _batch()
        assert {name: t.device for name, t in batch.items()} == {
            name: CUDA for name in batch}, "a batch tensor stayed on the CPU"
        embedding = torch.nn.Embedding(100, 8, device="cuda")
        assert embedding(batch["tokens"]).device == CUDA  # CPU indices would raise here


def test_a_cpu_batch_meeting_a_cuda_model_raises(fake):
    """The check itself can fail: a batch left on the CPU is caught by the first layer."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fake:
        batch = _batch(device=torch.device("cpu"))
        layer = torch.nn.Linear(S, 4, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            layer(batch["loss_mask"])


PRESETS = ["uniform", "dense", "sparse", "longce", "ppmi", "npmi"]


def _args(preset: str):
    from megatron_tw.weighting import build_weighting_config

    return argparse.Namespace(tw_weighting=build_weighting_config(preset), seed=3,
                              curr_iteration=5, tw_short_context=16,
                              check_for_nan_in_loss_and_grad=False, tw_check_nonfinite=False)


@pytest.mark.parametrize("preset", PRESETS)
def test_weights_and_loss_stay_on_the_device_without_host_reads(fake, preset, monkeypatch):
    import megatron.training.global_vars as gv

    from megatron_tw.loss import token_weighted_loss
    from megatron_tw.weighting import compute_token_weights, weight_statistics

    args = _args(preset)
    monkeypatch.setattr(gv, "_GLOBAL_ARGS", args, raising=False)
    with fake:
        batch = _batch()
        long_loss = torch.rand(B, S, device="cuda", requires_grad=True)
        config = args.tw_weighting

        def weight_fn(long):
            short = None if config.is_uniform else batch["short_loss"]
            w = compute_token_weights(long, short, batch["loss_mask"], batch["position_ids"],
                                      batch["sample_id"], config=config, seed=3, iteration=5)
            stats = weight_statistics(w, long, short, batch["loss_mask"], batch["position_ids"],
                                      short_context=16)
            assert w.device == CUDA and all(v.device == CUDA for v in stats.values())
            return w, stats

        loss, tokens, report = token_weighted_loss(batch["loss_mask"], weight_fn, long_loss)
        assert loss.device == CUDA and tokens.device == CUDA
        assert all(v.device == CUDA for v in report.values())
        # (no backward: the autograd engine needs a real device)


def test_nonfinite_checks_read_once_per_tensor(fake, monkeypatch):
    """With --tw-nonfinite checks on, each checked tensor costs one host read (and only one):
    the loss, the short-context losses and the weights of a micro-batch."""
    import megatron.training.global_vars as gv

    from megatron_tw.reliability import check_finite

    args = _args("dense")
    args.tw_check_nonfinite = True
    monkeypatch.setattr(gv, "_GLOBAL_ARGS", args, raising=False)
    with fake:
        batch = _batch()
        with pytest.raises(DataDependentOutputException):
            check_finite("loss", torch.rand(B, S, device="cuda"), batch["loss_mask"])


class _TinyLM(torch.nn.Module):
    """A stand-in scoring model with megatron's call signature (the component under test is the
    span scoring around it): per-token cross-entropy [n, L]."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8, device="cuda")
        self.head = torch.nn.Linear(8, 100, device="cuda")

    def forward(self, ids, position_ids, attention_mask, labels):
        logits = self.head(self.embed(ids) + position_ids.unsqueeze(-1).float())
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                 reduction="none")


@pytest.mark.parametrize("bos", [None, 1])
def test_window_scoring_allocates_on_the_device_without_host_reads(fake, bos):
    from megatron_tw.scoring.model import score_spans
    from megatron_tw.scoring.spans import plan_spans

    spans = plan_spans("windows", seq_length=S, window=17, stride=8, cp_size=1, cp_rank=0,
                       skip_below=16)
    with fake:
        batch = _batch()
        losses, scored = score_spans(_TinyLM(), batch["tokens_full"], batch["labels_full"],
                                     spans, seq_length=S, cp_size=1, cp_rank=0, bos_id=bos,
                                     max_tokens=3 * 16 * B)
        assert losses.device == CUDA and scored.device == CUDA
