"""Model backends: log-probabilities and greedy decoding against float64 references written here;
the megatron backend (megatron-core GPTModel on a torch_dist checkpoint) against the HF backend on
the same weights; HF loading stays correct after megatron's CPU measures are applied."""

import copy

import pytest
import torch

from megatron_tw.eval.backends import HFBackend, detect_model_type, load_backend

pytestmark = pytest.mark.unit

VOCAB = 100  # pads to 128 in megatron (--make-vocab-size-divisible-by 32)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    hf_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def megatron_ckpt(hf_dir, tmp_path_factory):
    from megatron_tw.checkpoint import convert

    out = tmp_path_factory.mktemp("mg") / "ckpt"
    convert.hf_to_megatron(hf_dir, str(out), make_vocab_size_divisible_by=32)
    return str(out)


def ids_batch(b=3, s=40, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def ref_logprobs(model, ids, vocab):
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=ids).logits[..., :vocab]
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def ref_greedy(model, prompt, n, stop=()):
    m = copy.deepcopy(model).double()
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(m(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_hf_logprobs_match_float64(hf_model):
    ids = ids_batch()
    backend = HFBackend(hf_model, batch_size=2)
    torch.testing.assert_close(backend.logprobs(ids).double(), ref_logprobs(hf_model, ids, VOCAB),
                               rtol=0, atol=2e-5)
    torch.testing.assert_close(backend.logprobs(ids, last=5), backend.logprobs(ids)[:, -5:])
    assert backend.logprobs(ids[0]).shape == (39,)


def test_logits_are_cut_to_the_tokenizer_vocabulary(hf_model):
    ids = ids_batch() % 60
    got = HFBackend(hf_model, vocab_size=60).logprobs(ids)
    torch.testing.assert_close(got.double(), ref_logprobs(hf_model, ids, 60), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFBackend(hf_model, vocab_size=60).logprobs(ids_batch())


def test_hf_greedy_with_kv_cache_matches_full_forward_argmax(hf_model):
    prompt = ids_batch(1, 12, seed=4)[0].tolist()
    want = ref_greedy(hf_model, prompt, 10)
    backend = HFBackend(hf_model)
    assert backend.greedy(prompt, 10) == want
    stop = want[3]
    assert backend.greedy(prompt, 10, stop_ids=(stop,)) == want[:want.index(stop)]


def test_hf_load_is_correct_after_megatron_cpu_measures(hf_model, hf_dir):
    """megatron_tw.runtime wraps torch's tensor factories on CPU machines; transformers'
    from_pretrained must still produce the saved model (RoPE buffers included)."""
    from megatron_tw import runtime

    runtime.prepare()
    loaded = load_backend(hf_dir, "hf", vocab_size=VOCAB)
    ids = ids_batch()
    torch.testing.assert_close(loaded.logprobs(ids), HFBackend(hf_model).logprobs(ids))


def test_megatron_backend_equals_hf_backend(hf_model, megatron_ckpt):
    assert detect_model_type(megatron_ckpt) == "megatron"
    ids = ids_batch(s=80)  # longer than max_position_embeddings: RoPE extrapolates in both
    hf = HFBackend(hf_model)
    with load_backend(megatron_ckpt, vocab_size=VOCAB, max_length=80) as mg:
        assert mg.info["padded_vocab_size"] == 128
        got = mg.logprobs(ids)
        torch.testing.assert_close(got.double(), ref_logprobs(hf_model, ids, VOCAB), rtol=0,
                                   atol=1e-4)
        # only the last positions reach the output layer: same values
        torch.testing.assert_close(mg.logprobs(ids, last=3), got[:, -3:])
        prompt = ids[0, :20].tolist()
        assert mg.greedy(prompt, 8) == hf.greedy(prompt, 8) == ref_greedy(hf_model, prompt, 8)


def test_detect_model_type_errors(tmp_path):
    with pytest.raises(ValueError, match="--model-type"):
        detect_model_type(str(tmp_path))
