"""tools/visualize_weights.py: tokens coloured by weight (green > 1, red < 1) with their losses, for
the paper's Table 1 and for a model; weights against the presets' closed forms in float64."""

import html
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from megatron_tw.eval.token_view import TABLE1, colour, token_strings, weights_for

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def tool():
    spec = importlib.util.spec_from_file_location("visualize_weights",
                                                  ROOT / "tools/visualize_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table1():
    long = torch.tensor([r[1] for r in TABLE1], dtype=torch.float64)
    short = torch.tensor([r[2] for r in TABLE1], dtype=torch.float64)
    return long, short


def test_dense_weights_of_table1_match_the_closed_form():
    long, short = table1()
    d = (long - short).abs()
    want = 0.75 + 0.25 * len(d) * d / d.sum()              # lambda + (1 - lambda) N|d| / sum|d|
    got = weights_for(long, short, "dense")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    by_token = dict(zip([r[0].strip() for r in TABLE1], got.tolist()))
    # the paper's reading of Table 1: long-range tokens up, trivial and inherently hard ones down
    assert by_token["Mel"] > 1 and by_token["prints"] > 1
    assert by_token["ades"] < 1 and by_token["one"] < 1


def test_longce_weights_of_table1_match_the_closed_form():
    long, short = table1()
    got = weights_for(long, short, "longce", truncation=1.5)
    torch.testing.assert_close(got.double(), torch.exp(short - long).clamp(max=1.5), rtol=0,
                               atol=1e-6)


def test_colours():
    assert colour(1.0) == (1.0, 1.0, 1.0)
    r, g, b = colour(3.0)
    assert g > r and g > b                  # green above 1
    r, g, b = colour(0.3)
    assert r > g and r > b                  # red below 1
    assert colour(0.0) == colour(0.25)      # saturates at a factor of 4


def test_table1_html_png_json(tmp_path):
    out = tmp_path / "t1"
    assert tool().main(["--example", "table1", "--preset", "dense", "--out", str(out)]) == 0
    page = (tmp_path / "t1.html").read_text()
    data = json.loads((tmp_path / "t1.json").read_text())
    long, short = table1()
    want = weights_for(long, short, "dense")
    spans = re.findall(r'<span class="t" style="background:(#[0-9a-f]{6})" title="([^"]*)"[^>]*>'
                       r"([^<]*)</span>", page)
    assert [html.unescape(s[2]) for s in spans] == [r[0] for r in TABLE1]
    for (bg, tip, _), w, lo, sh in zip(spans, want.tolist(), long.tolist(), short.tolist()):
        assert tip.startswith(f"w = {w:.3f} | long loss {lo:.3f} | short loss {sh:.3f}")
        red, green = int(bg[1:3], 16), int(bg[3:5], 16)
        assert (green > red) == (w > 1) or abs(w - 1) < 1e-3
    assert data["weights"] == pytest.approx(want.tolist(), abs=1e-6)
    from PIL import Image

    with Image.open(tmp_path / "t1.png") as im:
        assert im.size[0] > 400 and im.size[1] > 100


def test_sparse_zero_weights_render_red(tmp_path):
    out = tmp_path / "sp"
    assert tool().main(["--example", "table1", "--preset", "sparse", "--set", "sparsity=0.25",
                        "--out", str(out)]) == 0
    data = json.loads((tmp_path / "sp.json").read_text())
    kept = [w for w in data["weights"] if w > 0]
    assert len(kept) == 3 and kept == pytest.approx([13 / 3] * 3)  # floor(0.25 * 13) = 3 tokens


def test_model_scores_and_token_strings(tmp_path):
    """With a model: the long losses are the model's, the short ones its sliding-window losses."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_tw.eval.backends import HFBackend
    from megatron_tw.eval.short_context import short_context_logprobs
    from megatron_tw.eval.tokenizer import load_tokenizer

    text = "It was the best of times, it was the worst of times. " * 4
    prefix = tmp_path / "tok"
    spm.SentencePieceTrainer.train(sentence_iterator=iter([text] * 50), model_prefix=str(prefix),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(prefix) + ".model")
    model_dir = tmp_path / "m"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(model_dir)
    import shutil

    shutil.copy(str(prefix) + ".model", model_dir / "tokenizer.model")
    out = tmp_path / "w"
    assert tool().main(["--model", str(model_dir), "--text", text, "--short-context", "8",
                        "--preset", "longce", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "w.json").read_text())
    ids = tok.encode(text)
    assert "".join(data["tokens"]) == tok.decode(ids) == token_strings_joined(tok, ids)
    backend = HFBackend.from_pretrained(str(model_dir))
    t = torch.tensor(ids)
    long = -backend.logprobs(t)
    short = -short_context_logprobs(backend, t, 8)
    assert data["long_loss"] == pytest.approx(long.tolist(), abs=1e-5)
    assert data["short_loss"] == pytest.approx(short.tolist(), abs=1e-5)
    assert data["weights"] == pytest.approx(torch.exp(short - long).clamp(max=5).tolist(),
                                            abs=1e-5)
    assert data["weights"][:8] == pytest.approx([1.0] * 8)  # within the short window: d = 0


def token_strings_joined(tok, ids):
    return "".join(token_strings(tok, ids))
