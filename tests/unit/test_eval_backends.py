"""Model backends: log-probabilities and greedy decoding against float64 references written here;
the megatron backend (megatron-core GPTModel on a torch_dist checkpoint) against the HF backend on
the same weights; HF loading stays correct after megatron's CPU measures are applied. Decoding:
HF through ``generate`` and megatron through megatron-core's static KV cache, each against a
full-recompute argmax loop written here; cached chunks (sq < sk) against the full sequence."""

import copy

import pytest
import torch

from megatron_tw.eval.backends import HFBackend, detect_model_type, load_backend, resolve_device

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


def ref_greedy(model, prompt, n, stop=(), vocab=VOCAB):
    """Full recompute in float64: the whole sequence through the model for every new token."""
    m = copy.deepcopy(model).double()
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(m(input_ids=torch.tensor([seq])).logits[0, -1, :vocab].argmax())
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


def test_hf_greedy_is_generate_and_ignores_the_folders_generation_config(hf_model, monkeypatch):
    """One ``generate`` call per answer; the model's own generation_config (a repetition penalty
    and an EOS id here, as a Hub folder may ship) does not change the argmax continuation; ids
    beyond the tokenizer's vocabulary never win."""
    prompt = ids_batch(1, 12, seed=4)[0].tolist()
    want = ref_greedy(hf_model, prompt, 10)
    backend = HFBackend(hf_model, device=torch.device("cpu"))
    calls = []
    original = backend.model.generate
    monkeypatch.setattr(backend.model, "generate",
                        lambda *a, **k: calls.append(k["generation_config"]) or original(*a, **k))
    monkeypatch.setattr(hf_model.generation_config, "repetition_penalty", 3.0)
    monkeypatch.setattr(hf_model.generation_config, "eos_token_id", want[1])
    assert backend.greedy(prompt, 10) == want
    assert len(calls) == 1 and calls[0].do_sample is False and calls[0].max_new_tokens == 10
    assert hf_model.generation_config.repetition_penalty == 3.0  # restored after the call
    assert backend.greedy(prompt, 10, stop_ids=(want[6], 99)) == want[:want.index(want[6])]
    assert backend.greedy(prompt, 0) == []

    small = [t % 60 for t in prompt]
    want_small = ref_greedy(hf_model, small, 10, vocab=60)
    assert want_small != ref_greedy(hf_model, small, 10), "the cut should matter for this prompt"
    assert HFBackend(hf_model, vocab_size=60).greedy(small, 10) == want_small


def test_resolve_device():
    assert resolve_device("auto") == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    fake = torch.device("cuda", 3)
    assert resolve_device(fake) is fake  # taken as given (fake CUDA tests)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")


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


def _full_recompute_greedy(mg, prompt, n, stop=()):
    """The reference: the whole sequence through the megatron GPTModel for every new token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            logits = mg.model(ids, torch.arange(len(seq))[None], None)
            nxt = int(logits[0, -1, :VOCAB].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_megatron_kv_cache_greedy_equals_full_recompute(megatron_ckpt):
    prompt = ids_batch(1, 20, seed=5)[0].tolist()
    with load_backend(megatron_ckpt, vocab_size=VOCAB, device=torch.device("cpu")) as mg:
        want = _full_recompute_greedy(mg, prompt, 10)
        lengths = []  # tokens per forward, and whether a KV cache came with them

        def record(module, args, kwargs):
            lengths.append((args[0].shape[1], kwargs.get("inference_context") is not None))

        hook = mg.model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            got = mg.greedy(prompt, 10)
        finally:
            hook.remove()
        assert got == want
        assert lengths == [(20, True)] + [(1, True)] * 9  # one prefill, then one token a step
        stop = want[5]
        assert mg.greedy(prompt, 10, stop_ids=(stop,)) == want[:want.index(stop)]
        assert mg.greedy(prompt, 0) == []


def test_cached_chunks_equal_the_full_sequence_logits(megatron_ckpt, monkeypatch):
    """Queries shorter than the keys (sq < sk: a KV cache) through the local core attention's
    cp == 1 branch give the full sequence's logits at the last sq positions."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext

    import megatron_tw.model.cp_attention as cp_attention

    seen = []
    original = cp_attention.chunk_causal_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(cp_attention, "chunk_causal_attention", spy)
    ids = ids_batch(2, 24, seed=7)
    with load_backend(megatron_ckpt, vocab_size=VOCAB, device=torch.device("cpu")) as mg:
        with torch.no_grad():
            full = mg.logits(ids)
            context = StaticInferenceContext(max_batch_size=2, max_sequence_length=24)
            parts = []
            for a, e in ((0, 12), (12, 17), (17, 18), (18, 24)):
                positions = torch.arange(a, e).expand(2, -1)
                parts.append(mg._forward(ids[:, a:e], positions, None, inference_context=context))
                context.increment_sequence_len_offset(e - a)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    assert sorted(set(seen)) == [(1, 18), (5, 17), (6, 24)]  # the prefill (sq == sk) is SDPA's
