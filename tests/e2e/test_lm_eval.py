"""lm-evaluation-harness reads an exported checkpoint as this project does.

A random tiny Llama becomes a megatron checkpoint (``convert.hf_to_megatron``), which
``tools/convert_checkpoint.py megatron-to-hf --tokenizer-model`` exports with a real SentencePiece
tokenizer. Then, offline:

- ``AutoTokenizer.from_pretrained(export)`` gives the SentencePiece ids (no BOS added: the export's
  tokenizer encodes as preprocessing does);
- the ``lm_eval`` CLI (``--model hf``) scores a custom ``loglikelihood_rolling`` task read from a
  local jsonl file; its per-document log-likelihoods (``--log_samples``) equal those of
  tools/evaluate.py's HF backend (``BACKENDS["hf"].logprobs``) on exactly the tokens lm-eval
  scores: its prefix token (the tokenizer's BOS, else EOS: ``HFLM.prefix_token_id``) followed by
  the text's tokens, every text token a target (the documents fit in one window);
- its aggregate byte and word perplexities are those log-likelihoods' (exp(-sum ll / bytes), ...).

Needs the ``eval`` extra (``pip install -e ".[eval]"``: lm-eval[hf]).
"""

from __future__ import annotations

import glob
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import PYTHON, ROOT, env, train_small_sentencepiece

pytestmark = pytest.mark.e2e
pytest.importorskip("lm_eval", reason='needs lm-eval: pip install -e ".[eval]"')

TASK = "tw_rolling_ll"
VOCAB = 100  # train_small_sentencepiece's vocabulary
WORDS = "it was the best of times worst".split()


def _offline_env(tmp: Path) -> dict:
    e = env()
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_HOME=str(tmp / "hf_home"), HF_DATASETS_CACHE=str(tmp / "hf_home" / "datasets"))
    return e


def _run(cmd, tmp, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_offline_env(tmp),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def _documents() -> list[str]:
    """Texts in the tokenizer's own words (no unknown pieces), of different lengths."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) + f", it was the worst of times {i}."
            for i, n in enumerate((5, 14, 30))]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_tw.checkpoint import convert

    tmp = tmp_path_factory.mktemp("lm_eval")
    spm_model = train_small_sentencepiece(tmp / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peaked, input-dependent distribution, not a near-uniform one
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp / "source")
    # the megatron checkpoint in-process (one interpreter start less); the export is the CLI's
    convert.hf_to_megatron(str(tmp / "source"), str(tmp / "ckpt"), make_vocab_size_divisible_by=32)
    _run([PYTHON, "tools/convert_checkpoint.py", "megatron-to-hf", "--load", tmp / "ckpt",
          "--out", tmp / "hf", "--tokenizer-model", spm_model], tmp)
    return {"tmp": tmp, "hf": tmp / "hf", "spm": spm_model}


@pytest.fixture(scope="module")
def lm_eval_run(export):
    """The lm_eval CLI on a task defined from a local jsonl file; returns (results, samples)."""
    tmp = export["tmp"]
    tasks = tmp / "tasks"
    tasks.mkdir()
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents()))
    (tasks / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""")
    script = Path(sys.executable).with_name("lm_eval")
    cli = [script] if script.exists() else [PYTHON, "-m", "lm_eval"]
    out = tmp / "lm_eval_out"
    _run([*cli, "--model", "hf", "--model_args", f"pretrained={export['hf']},dtype=float32",
          "--tasks", TASK, "--include_path", tasks, "--device", "cpu", "--batch_size", "1",
          "--log_samples", "--output_path", out], tmp)
    results = [json.loads(Path(p).read_text()) for p in glob.glob(f"{out}/**/results_*.json",
                                                                  recursive=True)]
    sample_files = glob.glob(f"{out}/**/samples_{TASK}_*.jsonl", recursive=True)
    assert len(results) == 1 and len(sample_files) == 1, (results, sample_files)
    samples = [json.loads(line) for line in Path(sample_files[0]).read_text().splitlines()]
    return results[0], sorted(samples, key=lambda s: s["doc_id"])


def test_export_ships_the_sentencepiece_tokenizer(export):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=export["spm"])
    tok = AutoTokenizer.from_pretrained(export["hf"], local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    for text in _documents():
        ids = sp.encode(text)
        assert sp.unk_id() not in ids, text
        assert tok.encode(text) == ids  # lm-eval's tok_encode: the tokenizer's defaults
        assert tok.encode(text, add_special_tokens=False) == ids


def test_lm_eval_loglikelihoods_equal_evaluate_hf_backend(export, lm_eval_run):
    import torch
    from transformers import AutoTokenizer

    from megatron_tw.eval.backends import BACKENDS

    results, samples = lm_eval_run
    docs = _documents()
    assert [s["doc"]["text"] for s in samples] == docs
    tok = AutoTokenizer.from_pretrained(export["hf"], local_files_only=True)
    # HFLM.prefix_token_id: the BOS token, else EOS; the first window is [prefix] + text[:-1]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    backend = BACKENDS["hf"](str(export["hf"]), vocab_size=VOCAB, device="cpu")
    try:
        ours = []
        for text in docs:
            ids = tok.encode(text)
            assert len(ids) <= results["max_length"]  # one rolling window: no context cut
            seq = torch.tensor([prefix, *ids])
            ours.append(float(backend.logprobs(seq).double().sum()))
    finally:
        backend.close()
    theirs = [float(s["resps"][0][0]) for s in samples]
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    print(f"lm-eval vs HF backend log-likelihoods: {theirs} vs {ours}; max rel diff {max(rel):.2e}")
    assert max(rel) < 1e-4, (theirs, ours)
    # the scores are informative: far from uniform over the vocabulary
    assert all(abs(ll + len(tok.encode(t)) * math.log(VOCAB)) > 1.0 for ll, t in zip(ours, docs))

    metrics = results["results"][TASK]
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    n_words = sum(len(re.split(r"\s+", t)) for t in docs)
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-sum(ours) / n_bytes),
                                                            rel=1e-4)
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-sum(ours) / n_words),
                                                            rel=1e-4)
