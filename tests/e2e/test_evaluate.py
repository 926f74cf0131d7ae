"""tools/evaluate.py on the same model as a megatron checkpoint and as an exported HF folder: the two
backends (megatron-core GPTModel vs transformers) give the same perplexities, LongPPL and greedy
answers, and both equal a float64 perplexity computed here from the source weights."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the grass is green the sky is blue the sun is yellow here we go there and back again "
         "one of the special magic numbers for is what are all mentioned in provided text").split()
COMMON = ["--heldout", "HELD", "--ppl-length", "64", "--ppl-sequences", "6",
          "--ppl-context-lengths", "16,32,64", "--short-ppl-length", "16",
          "--longppl-window", "8", "--tasks", "niah_single_1,fwe", "--lengths", "512",
          "--samples", "2", "--max-new-tokens", "6", "--needle-task", "niah_single_1",
          "--needle-lengths", "384,512", "--needle-depths", "0,100", "--needle-samples", "1",
          "--mark-context", "16"]


def _text(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.randint(10**6, 10**7 - 1)}."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random HF Llama with a SentencePiece tokenizer; its megatron checkpoint (hf-to-megatron)
    and the HF export of that checkpoint (megatron-to-hf)."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_tw.checkpoint import convert

    root = tmp_path_factory.mktemp("eval")
    lines = [_text(i, 30) for i in range(300)] + ["0123456789 - . , : ? !"] * 10
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "tok"),
                                   vocab_size=100, model_type="bpe", minloglevel=2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(root / "source")
    ckpt, export = root / "ckpt", root / "export"
    convert.hf_to_megatron(str(root / "source"), str(ckpt), make_vocab_size_divisible_by=32,
                           tokenizer_model=str(root / "tok.model"))
    convert.megatron_to_hf(str(ckpt), str(export), tokenizer_model=str(root / "tok.model"))
    held = root / "held.jsonl"
    held.write_text("".join(json.dumps({"text": _text(1000 + i, 200)}) + "\n" for i in range(3)))
    return {"root": root, "source": model, "ckpt": ckpt, "export": export, "held": held,
            "tokenizer": root / "tok.model"}


def _evaluate(models, model_dir, out, extra=()):
    from tests.launch import env

    args = [a.replace("HELD", str(models["held"])) for a in COMMON]
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(model_dir),
                           "--out", str(out), *args, *extra], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


def _reference_ppl(models, length=64, n=6):
    """float64 perplexity of the source model on the held-out stream cut into ``length`` tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(models["tokenizer"]))
    ids = []
    for line in models["held"].read_text().splitlines():
        ids += sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
    seqs = torch.tensor(ids[:n * length]).view(n, length)
    model = models["source"].double()
    with torch.no_grad():
        logits = model(input_ids=seqs).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    models["source"].float()
    return math.exp(float(-lp.mean()))


def test_megatron_checkpoint_and_hf_export_evaluate_alike(models, tmp_path):
    mg, mg_log = _evaluate(models, models["ckpt"], tmp_path / "megatron", ["--device", "cpu"])
    hf, _ = _evaluate(models, models["export"], tmp_path / "hf")  # --device auto
    assert mg["model"]["type"] == "megatron" and hf["model"]["type"] == "hf"
    assert "ppl @ 64" in mg_log and "LongPPL" in mg_log and " on cpu" in mg_log

    want = _reference_ppl(models)
    assert mg["loss_by_position"]["ppl"] == pytest.approx(want, rel=1e-4)
    assert hf["loss_by_position"]["ppl"] == pytest.approx(want, rel=1e-4)
    assert mg["loss_by_position"]["per_position"] == pytest.approx(
        hf["loss_by_position"]["per_position"], abs=1e-4)
    for c in ("16", "32", "64"):
        assert mg["ppl_vs_context"]["by_length"][c]["ppl"] == pytest.approx(
            hf["ppl_vs_context"]["by_length"][c]["ppl"], rel=1e-4)
    assert mg["short_ppl"]["ppl"] == pytest.approx(hf["short_ppl"]["ppl"], rel=1e-4)
    assert mg["long_ppl"]["key_tokens"] > 0, "the fixture model should have key tokens"
    for key in ("key_tokens", "long_ppl", "other_ppl", "mean_gain"):
        a, b = mg["long_ppl"][key], hf["long_ppl"][key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-5), key

    for task in ("niah_single_1", "fwe"):
        a, b = mg["tasks"][task]["512"], hf["tasks"][task]["512"]
        assert a["score"] == b["score"]
        assert [e["prediction"] for e in a["examples"]] == [e["prediction"] for e in b["examples"]]
    assert mg["needle_grid"]["scores"] == hf["needle_grid"]["scores"]
    assert len(mg["needle_grid"]["scores"]) == 2 and len(mg["needle_grid"]["scores"][0]) == 2

    from PIL import Image

    for name in ("loss_by_position.png", "ppl_vs_context.png", "needle_heatmap.png"):
        with Image.open(tmp_path / "megatron" / name) as im:
            im.verify()
    md = (tmp_path / "megatron" / "results.md").read_text()
    assert "| niah_single_1 |" in md and "LongPPL" in md

    proc = subprocess.run([sys.executable, "tools/evaluate.py", "compare", "--runs",
                           f"megatron={tmp_path / 'megatron' / 'results.json'}",
                           f"hf={tmp_path / 'hf' / 'results.json'}", "--out",
                           str(tmp_path / "cmp")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cmp" / "loss_by_position.png").exists()
    tables = (tmp_path / "cmp" / "comparison.md").read_text().split("\n\n")
    assert len(tables) >= 5  # summary, ppl vs context, loss by position, tasks, needle grid
    for table in tables:
        rows = [r for r in table.splitlines() if r.startswith(("| megatron", "| hf"))]
        if rows:
            assert len(rows) == 2 and rows[0].split("|")[2:] == rows[1].split("|")[2:], table


def test_bad_inputs_are_named_errors(models, tmp_path):
    from tests.launch import env

    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(models["export"]),
                           "--tasks", "cwe", "--lengths", "64", "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "too short" in proc.stdout  # reported and skipped
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(tmp_path),
                           "--out", str(tmp_path / "y")], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--model-type" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    from tests.launch import env

    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(tmp_path),
                           "--device", "cuda", "--out", str(tmp_path / "x")], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: --device cuda"), \
        proc.stderr


@pytest.mark.slow
def test_checkpoint_written_by_pretrain_tw(models, tmp_path):
    """A checkpoint saved by a 1-step pretrain_tw.py run (its own saved training arguments, not the
    converter's) evaluates like its HF export."""
    from transformers import LlamaConfig

    from megatron_tw.checkpoint import convert
    from tests.launch import TINY_MODEL, TINY_TRAINING, pretrain

    training = [a if a != "128" else "100" for a in TINY_TRAINING]  # --vocab-size 100
    pretrain(1, [*TINY_MODEL, *training, "--train-iters", "1", "--save", str(tmp_path / "run"),
                 "--save-interval", "1", "--ckpt-format", "torch_dist"])
    template = tmp_path / "template"
    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=False).save_pretrained(template)
    convert.megatron_to_hf(str(tmp_path / "run"), str(tmp_path / "export"), hf_config=str(template),
                           tokenizer_model=str(models["tokenizer"]))
    args = ["--tokenizer", str(models["tokenizer"]), "--heldout", str(models["held"]),
            "--ppl-length", "64", "--ppl-context-lengths", "16,64"]
    results = []
    for model, out in ((tmp_path / "run", "mg"), (tmp_path / "export", "hf")):
        proc = subprocess.run([sys.executable, "tools/evaluate.py", "--model", str(model),
                               "--out", str(tmp_path / out), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads((tmp_path / out / "results.json").read_text()))
    mg, hf = results
    assert mg["model"]["trained_seq_length"] == 64
    assert mg["loss_by_position"]["ppl"] == pytest.approx(hf["loss_by_position"]["ppl"], rel=1e-4)
    for c in ("16", "64"):
        assert mg["ppl_vs_context"]["by_length"][c]["ppl"] == pytest.approx(
            hf["ppl_vs_context"]["by_length"][c]["ppl"], rel=1e-4)
