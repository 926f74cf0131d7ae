"""Weighted training steps against an independent computation of their loss.

The run: ``torchrun --nproc-per-node 2 pretrain_tw.py`` (two data-parallel ranks, 2 micro-batches
of 2 sequences each per rank: global batch 8 = 2 x micro-batch x DP), ``--eod-mask-loss`` on a
corpus of documents shorter than the 64-token sequence and of runs of EOD tokens (a sequence
holds from 0 to 64 loss tokens), self scorer in the sliding mode with W = 16, starting from an
HF Llama converted with tools/convert_checkpoint.py hf-to-megatron (``--pretrained-checkpoint``). Step 1 uses the
``dense`` preset (lambda 0.75), step 2 ``sparse`` (kappa 0.25), switched by
preset_per_step_worker.py through pretrain_tw.main's ``wrap_forward_step`` hook; ``--lr 0``
keeps the weights of step 2 those of step 1 (one launch for both presets). Each step's logged
"weighted loss" must equal

    sum_i w_i * mask_i * L_long[i] / sum_i mask_i        (sums over the step's 8 sequences)

computed by the oracle below, which imports nothing from megatron_tw (it runs in a fresh process
that asserts so at the end). What is independent of the code under test:

- L_long and L_short: Hugging Face transformers' LlamaForCausalLM (eager attention, float64) on
  the HF weights the run was converted from; L_short of position p with an explicit 4D mask in
  which p sees keys p-W+2..p and key 0 (the attention sink), L_short = L_long for p < W (the self
  scorer does not rescore where the short context is the whole prefix);
- the weighting (|d|, L1 over the sequence's loss tokens, interpolation; top-k with
  k = floor(kappa N)) and the global normalisation: plain float64 torch, written here from
  docs/method.md;
- the loss mask (tokens == EOD -> 0, checked against the dataset's);
- the tokens: samples 8(s-1)..8s-1 of megatron-core's own GPTDataset built with the run's
  settings (the data source, not megatron_tw: its provider, batch split and sampler are under
  test).

The sparse oracle needs no tie-break (the hash is the implementation's): it asserts that the
k-th and (k+1)-th scores of every sequence differ. Each wrong normalisation (per-sequence mean,
per micro-batch, per data-parallel rank, each then averaged) is far outside the tolerance, so
the comparison tells them apart. "lm loss" and "long-context gain" are checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
SEQ, W, EOD, SEED, DP, MBS, GBS = 64, 16, 127, 1234, 2, 2, 8
DENSE_LAMBDA, SPARSE_KAPPA = 0.75, 0.25
STEPS = {"dense": 1, "sparse": 2}  # the preset of each step (preset_per_step_worker.py)
# Measured: the run's float32 steps agree with the float64 oracle to ~1e-7 (lm loss, both
# presets' weighted loss); the wrong normalisations are >= 9e-5 away.
REL = 2e-6


def _hf_model(path):
    """A tiny HF Llama of TINY_MODEL's shape, perturbed away from its near-uniform init so that
    the long and short losses differ visibly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def _uneven_corpus(prefix) -> str:
    """Random documents of 5-60 tokens ending in EOD; every third one is a run of 24 EODs
    instead, so that with --eod-mask-loss the sequences hold from 0 (runs shuffled next to each
    other) to 64 loss tokens."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in range(200):
        if i % 3 == 2:
            doc = np.full(24, EOD, dtype=np.int32)
        else:
            n = int(rng.integers(5, 60))
            doc = np.append(rng.integers(0, EOD, n - 1), EOD).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.launch import env, tensorboard_scalars, torchrun

    tmp = tmp_path_factory.mktemp("oracle")
    hf, meg = tmp / "hf", tmp / "meg"
    _hf_model(hf)
    conv = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron",
                           "--hf-dir", str(hf), "--out", str(meg),
                           "--make-vocab-size-divisible-by", "64"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert conv.returncode == 0, conv.stdout[-3000:] + conv.stderr[-3000:]
    corpus = _uneven_corpus(tmp / "corpus")
    cache = str(tmp / "cache")
    args = [*(meg / "megatron_args.txt").read_text().split(),
            "--seq-length", str(SEQ), "--micro-batch-size", str(MBS),
            "--global-batch-size", str(GBS), "--train-iters", str(len(STEPS)),
            "--lr", "0", "--min-lr", "0", "--lr-decay-style", "constant",
            "--attention-dropout", "0", "--hidden-dropout", "0",
            "--data-path", corpus, "--split", "100,0,0", "--data-cache-path", cache,
            "--eod-mask-loss", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--seed", str(SEED), "--log-interval", "1", "--eval-iters", "0",
            "--eval-interval", "1000", "--pretrained-checkpoint", str(meg),
            "--tw-preset", "dense", "--tw-scorer", "self", "--tw-short-mode", "sliding",
            "--tw-short-context", str(W), "--tensorboard-dir", str(tmp / "tb")]
    torchrun(DP, "tests/e2e/preset_per_step_worker.py",
             [f"dense;sparse:sparsity={SPARSE_KAPPA}", *args], timeout=300)
    logged = tensorboard_scalars(tmp / "tb")
    logged = {preset: {tag: values[step] for tag, values in logged.items() if step in values}
              for preset, step in STEPS.items()}  # ("... vs samples" tags count samples)
    # the oracle builds its own dataset index (another cache folder), not the run's
    ref = subprocess.run([sys.executable, __file__, str(hf), corpus, cache + "-oracle"],
                         cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return logged, json.loads(ref.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", sorted(STEPS))
def test_weighted_step_equals_oracle(runs, preset):
    logged, oracle = runs
    got, want = logged[preset], oracle[preset]
    print(f"{preset}: weighted loss run {got['weighted loss']:.7f} oracle "
          f"{want['weighted loss']:.7f}; lm loss run {got['lm loss']:.7f} oracle "
          f"{want['lm loss']:.7f}")
    assert got["lm loss"] == pytest.approx(want["lm loss"], rel=REL)
    assert got["weighted loss"] == pytest.approx(want["weighted loss"], rel=REL)
    assert got["long-context gain"] == pytest.approx(want["long-context gain"], rel=1e-3,
                                                     abs=1e-5)
    # the comparison has teeth: the weighting moves the loss, and every other normalisation
    # of the same weighted sum is far outside the tolerance
    assert abs(want["weighted loss"] - want["lm loss"]) > 20 * REL * want["lm loss"]
    for alt in ("per-sequence mean", "per-micro-batch mean", "per-rank mean"):
        print(f"  {alt}: {want[alt]:.7f}")
        assert abs(want[alt] - want["weighted loss"]) > 10 * REL * want["weighted loss"], alt


def test_batches_are_uneven(runs):
    _, oracle = runs
    for preset in STEPS:
        counts = oracle[preset]["tokens per sequence"]
        assert len(counts) == GBS and max(counts) - min(counts) >= 10, counts


# -- the oracle (run as a script: a fresh process that never imports megatron_tw) ----------------

def step_samples(corpus: str, cache: str):
    """{step: (tokens, labels, loss_mask) [GBS, SEQ]}: samples GBS(s-1)..GBS s-1 of megatron-core's
    GPTDataset with the run's settings (megatron's sampler hands step s the next GBS samples,
    spread over the ranks; the loss is a sum over them, so their order does not matter)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    config = GPTDatasetConfig(random_seed=SEED, sequence_length=SEQ, blend=([corpus], None),
                              split="100,0,0", path_to_cache=cache, tokenizer=NullTokenizer(128),
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=True)
    n = GBS * len(STEPS)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True,
                                                config).build()
    out = {}
    for step in STEPS.values():
        samples = [train[i] for i in range(GBS * (step - 1), GBS * step)]
        out[step] = tuple(torch.stack([torch.as_tensor(s[k]) for s in samples])
                          for k in ("tokens", "labels", "loss_mask"))
    return out


def hf_losses(hf_dir: str, tokens, labels):
    """L_long and L_short [b, s], float64, from transformers on the HF weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64,
                                                 attn_implementation="eager").eval()

    def losses(mask=None):
        kwargs = {}
        if mask is not None:  # [s, s] bool, True = visible -> additive 4D mask
            bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(
                ~mask, torch.finfo(torch.float64).min)
            kwargs["attention_mask"] = bias[None, None].expand(tokens.shape[0], 1, -1, -1)
        with torch.no_grad():
            logits = model(input_ids=tokens, **kwargs).logits.double()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                 reduction="none")

    q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    sliding = (k <= q) & ((k >= q - (W - 2)) | (k == 0))
    long, short = losses(), losses(sliding)
    short[:, :W] = long[:, :W]  # the short context of p < W is the whole prefix
    return long, short


def dense_weights(d, mask):
    """lambda + (1 - lambda) * N |d_i| / sum_j |d_j| on the loss tokens of each sequence."""
    a = d.abs() * mask
    n, total = mask.sum(1, keepdim=True), a.sum(1, keepdim=True)
    w = torch.where(total > 0, n * a / total, mask)
    return (DENSE_LAMBDA + (1 - DENSE_LAMBDA) * w) * mask


def sparse_weights(d, mask):
    """N / k on the k = floor(kappa N) loss tokens of largest |d| of each sequence, 0 elsewhere."""
    a = torch.where(mask > 0, d.abs(), float("-inf"))
    w = torch.zeros_like(d)
    for b in range(d.shape[0]):
        n = int(mask[b].sum())
        if n == 0:  # no loss token (inside a run of EODs): nothing to weigh
            continue
        k = max(1, int(SPARSE_KAPPA * n))
        top = torch.sort(a[b], descending=True).values
        assert top[k - 1] > top[k], f"sequence {b}: a tie at the top-{k} threshold"
        w[b] = (a[b] >= top[k - 1]).double() * n / k
    return w * mask


def oracle(hf_dir: str, corpus: str, cache: str) -> dict:
    samples = step_samples(corpus, cache)
    out = {}
    # megatron's sampler: rank r takes samples [2r, 2r+1] of each block of MBS x DP = 4
    ranks = [[0, 1, 4, 5], [2, 3, 6, 7]]
    for name, weigh in (("dense", dense_weights), ("sparse", sparse_weights)):
        tokens, labels, dataset_mask = samples[STEPS[name]]
        mask = (tokens != EOD).double()  # --eod-mask-loss: no loss for the token after an EOD
        assert torch.equal(mask, dataset_mask.double()), "loss mask differs from the dataset's"
        long, short = hf_losses(hf_dir, tokens, labels)
        d = torch.where(mask > 0, long - short, 0.0)
        terms = weigh(d, mask) * mask * long
        micro = terms.view(-1, MBS, SEQ).sum((1, 2)) / mask.view(-1, MBS, SEQ).sum((1, 2))
        out[name] = {
            "tokens per sequence": [int(n) for n in mask.sum(1)],
            "weighted loss": float(terms.sum() / mask.sum()),
            "lm loss": float((mask * long).sum() / mask.sum()),
            "long-context gain": float((mask * (short - long)).sum() / mask.sum()),
            # what a wrong normalisation would give
            "per-sequence mean": float((terms.sum(1)[mask.sum(1) > 0]
                                        / mask.sum(1)[mask.sum(1) > 0]).mean()),
            "per-micro-batch mean": float(micro.mean()),
            "per-rank mean": float(sum(terms[r].sum() / mask[r].sum() for r in ranks) / DP),
        }
    assert not [m for m in sys.modules if m.split(".")[0] == "megatron_tw"], "imported megatron_tw"
    return out


if __name__ == "__main__":
    print(json.dumps(oracle(*sys.argv[1:4])))
