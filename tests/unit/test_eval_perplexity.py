"""Perplexity by position and context length, short-context log-probabilities and LongPPL, each
against a reference computed here in float64 by running the model on the exact contexts the
definitions name (one forward per target)."""

import json
import math

import pytest
import torch

from megatron_tw.eval import perplexity as ppl
from megatron_tw.eval.backends import HFBackend
from megatron_tw.eval.short_context import short_context_logprobs

pytestmark = pytest.mark.unit

VOCAB = 96


def tiny_llama(seed: int, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger random weights: peaked, context-dependent predictions
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def ref64(model):
    """float64 copy of the model: the reference path (no backend code involved)."""
    import copy

    return copy.deepcopy(model).double()


def ref_logprob(model64, context: torch.Tensor, target: int) -> float:
    """log p(target | context) in float64 from one forward over exactly ``context``."""
    with torch.no_grad():
        logits = model64(input_ids=context.view(1, -1)).logits[0, -1].double()
    return float(torch.log_softmax(logits, -1)[target])


def ref_sequence_logprobs(model64, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model64(input_ids=ids).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def tokens(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_short_context_is_each_targets_own_window(model, ref64, window):
    """Target i is predicted from exactly ids[i - W : i] (W tokens, as --tw-short-context W)."""
    ids = tokens(40)
    got = short_context_logprobs(HFBackend(model, batch_size=4), ids, window, "sliding", batch=7)
    ref = torch.tensor([ref_logprob(ref64, ids[max(0, i - window):i], int(ids[i]))
                        for i in range(1, 40)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(got[:window], HFBackend(model).logprobs(ids)[:window])


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 8), (9, 3)])
def test_strided_windows_keep_each_windows_last_stride_targets(model, ref64, window, stride):
    T = 1 + window + 5 * stride  # megatron's seq_length T - 1 = W + 5 S
    ids = tokens(T)
    got = short_context_logprobs(HFBackend(model), ids, window, "windows", stride)
    ref, contexts = [], []
    for i in range(1, T):
        # the reference code: window j holds inputs [jS, jS + W) and scores its last S labels
        start = 0 if i <= window else ((i - window - 1) // stride + 1) * stride
        contexts.append(i - start)
        ref.append(ref_logprob(ref64, ids[start:i], int(ids[i])))
    assert min(contexts[window:]) == window - stride + 1 and max(contexts) == window
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=0,
                               atol=2e-5)


def test_strided_windows_must_tile(model):
    with pytest.raises(ValueError, match="divisible"):
        short_context_logprobs(HFBackend(model), tokens(30), 8, "windows", 5)
    with pytest.raises(ValueError, match=r"\[1, W=8\]"):
        short_context_logprobs(HFBackend(model), tokens(33), 8, "windows", 9)


def test_loss_by_position_and_context_lengths(model, ref64):
    stream = tokens(4 * 32, seed=5)
    seqs = ppl.cut_sequences(stream, 32)
    got = ppl.loss_by_position(HFBackend(model, batch_size=3), seqs, buckets=4)
    ref = -ref_sequence_logprobs(ref64, seqs)           # [4, 31]
    torch.testing.assert_close(torch.tensor(got["per_position"], dtype=torch.float64), ref.mean(0),
                               rtol=0, atol=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(ref.mean())), rel=1e-5)
    edges = got["bucket_edges"]
    assert edges[0] == 1 and edges[-1] == 32
    for (lo, hi), value in zip(zip(edges[:-1], edges[1:]), got["bucket_loss"]):
        assert value == pytest.approx(float(ref.mean(0)[lo - 1:hi - 1].mean()), abs=1e-5)

    ctx = ppl.ppl_vs_context(HFBackend(model), stream, [8, 16, 32], span=10_000)
    assert ctx["span"] == 128
    for c in (8, 16, 32):
        want = -ref_sequence_logprobs(ref64, stream.view(-1, c))
        assert ctx["by_length"][str(c)]["ppl"] == pytest.approx(math.exp(float(want.mean())),
                                                                rel=1e-5)
        assert ctx["by_length"][str(c)]["tokens"] == want.numel()


def test_sequences_with_bos(model, ref64):
    stream = tokens(50, seed=8)
    seqs = ppl.cut_sequences(stream, 8, bos_id=1)
    assert seqs.shape == (7, 8) and seqs[:, 0].tolist() == [1] * 7
    assert seqs[:, 1:].reshape(-1).tolist() == stream[:49].tolist()
    ctx = ppl.ppl_vs_context(HFBackend(model), stream, [4, 8], span=48, bos_id=1)
    for c in (4, 8):
        body = stream[:48 - 48 % (c - 1)].view(-1, c - 1)
        want = -ref_sequence_logprobs(ref64, torch.cat([torch.ones(len(body), 1).long(), body], 1))
        assert ctx["by_length"][str(c)]["ppl"] == pytest.approx(math.exp(float(want.mean())),
                                                                rel=1e-5)


def _ref_long_ppl(model_lp, scorer_long, scorer_short):
    mask = (scorer_long - scorer_short > 2.0) & (scorer_long > -2.0)
    return mask, math.exp(float(-model_lp[mask].mean()))


@pytest.mark.parametrize("other_scorer", [False, True])
def test_long_ppl(model, ref64, other_scorer):
    W = 4
    seqs = ppl.cut_sequences(tokens(3 * 48, seed=11), 48)
    scorer_model = tiny_llama(5) if other_scorer else model
    scorer64 = scorer_model.double() if other_scorer else ref64
    got = ppl.long_ppl(HFBackend(model), seqs, W,
                       scorer=HFBackend(tiny_llama(5)) if other_scorer else None)
    model_lp = ref_sequence_logprobs(ref64, seqs)
    s_long = ref_sequence_logprobs(scorer64, seqs)
    s_short = torch.tensor([[ref_logprob(scorer64, seq[max(0, i - W):i], int(seq[i]))
                             for i in range(1, 48)] for seq in seqs], dtype=torch.float64)
    mask, want = _ref_long_ppl(model_lp, s_long, s_short)
    assert got["key_tokens"] == int(mask.sum()) > 0, "the fixture should produce key tokens"
    assert got["long_ppl"] == pytest.approx(want, rel=1e-4)
    assert got["other_ppl"] == pytest.approx(math.exp(float(-model_lp[~mask].mean())), rel=1e-4)
    assert got["mean_gain"] == pytest.approx(float((s_long - s_short).mean()), abs=1e-4)


def test_key_token_mask_thresholds():
    long = torch.tensor([-0.5, -0.5, -2.5, -1.0])
    short = torch.tensor([-3.0, -2.4, -5.0, -3.5])
    assert ppl.key_token_mask(long, short).tolist() == [True, False, False, True]


def test_short_ppl(model, ref64):
    stream = tokens(100, seed=2)
    got = ppl.short_ppl(HFBackend(model), stream, 16)
    want = -ref_sequence_logprobs(ref64, stream[:96].view(6, 16))
    assert got["sequences"] == 6
    assert got["ppl"] == pytest.approx(math.exp(float(want.mean())), rel=1e-5)


def test_read_token_stream_jsonl_and_indexed(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    class Chars:  # a stand-in tokenizer: one id per character
        eod_id = 0

        def encode(self, text):
            return [ord(c) for c in text]

    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert ppl.read_token_stream(str(path), Chars()).tolist() == [97, 98, 0, 99, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ppl.read_token_stream(str(bad), Chars())

    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    for doc in ([5, 6, 2], [7, 2]):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "d.idx"))
    assert ppl.read_token_stream(str(tmp_path / "d")).tolist() == [5, 6, 2, 7, 2]
    assert ppl.read_token_stream(str(tmp_path / "d"), max_tokens=4).tolist() == [5, 6, 2, 7]
    with pytest.raises(ValueError, match="neither a .jsonl"):
        ppl.read_token_stream(str(tmp_path / "missing"))
