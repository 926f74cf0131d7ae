"""megatron -> HF exports what the run trained: a model trained from scratch at TP2 with llama3
RoPE scaling and a non-default RoPE base exports a config built from its saved arguments.

- transformers computes the same logits as megatron-core on the checkpoint (two independent
  implementations: the HF folder through ``AutoModelForCausalLM``, the checkpoint through the
  Megatron evaluation backend);
- a transformers 4.x reader gets the same RoPE: the legacy ``rope_theta``/``rope_scaling`` fields,
  turned into frequencies by the 4.x rules written out in the test's helper, equal the
  frequencies transformers 5 uses (from ``rope_parameters``) and megatron's;
- a flag HF cannot represent (partial RoPE) is refused, naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import PYTHON, ROOT, TINY_MODEL, TINY_TRAINING, env, pretrain

pytestmark = pytest.mark.e2e

ROPE = ["--rotary-base", "500000", "--use-rope-scaling", "--rope-scaling-factor", "8",
        "--norm-epsilon", "1e-6"]


def _convert(*argv):
    return subprocess.run([PYTHON, "tools/convert_checkpoint.py", *map(str, argv)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tmp / "ckpt"
    pretrain(2, [*TINY_MODEL, *TINY_TRAINING, *ROPE, "--tensor-model-parallel-size", "2",
                 "--train-iters", "2", "--save", str(ckpt), "--save-interval", "2"])
    out = _convert("megatron-to-hf", "--load", ckpt, "--out", tmp / "hf")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"tmp": tmp, "ckpt": ckpt, "hf": tmp / "hf"}


def test_config_is_built_from_the_saved_arguments(exported):
    config = json.loads((exported["hf"] / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["factor"] == 8.0
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["torch_dtype"] == config["dtype"]
    assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 128  # the tokenizer's vocabulary, without megatron's padding


def test_hf_logits_equal_megatron_logits_and_rope_agrees(exported):
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoModelForCausalLM
from megatron_tw.checkpoint.export_config import legacy_rope_frequencies
from megatron_tw.eval.backends import BACKENDS
hf = AutoModelForCausalLM.from_pretrained({str(exported['hf'])!r}, dtype=torch.float32).eval()
ids = torch.randint(0, 127, (2, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want = hf(input_ids=ids).logits[..., :128].double()
backend = BACKENDS["megatron"]({str(exported['ckpt'])!r}, vocab_size=128, device="cpu")
with torch.no_grad():
    got = backend.logits(ids)[..., :128].double()
config = json.load(open({str(exported['hf'] / 'config.json')!r}))
legacy = {{k: v for k, v in config.items() if k != "rope_parameters"}}
head_dim = config["head_dim"]
f4 = legacy_rope_frequencies(legacy, head_dim)
f5 = hf.model.rotary_emb.inv_freq.double()
fm = backend.model.rotary_pos_emb.inv_freq.double()
print("RESULT", json.dumps({{"logits": float((got - want).abs().max()),
                            "scale": float(want.abs().max()),
                            "f4_f5": float((f4 - f5).abs().max() / f5.abs().max()),
                            "f4_megatron": float((f4 - fm).abs().max() / fm.abs().max()),
                            "scaled": float((f4 - legacy_rope_frequencies({{"rope_theta": 500000.0}},
                                                                       head_dim)).abs().max())}}))
backend.close()
"""
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line.split(" ", 1)[1])
    assert result["logits"] < 1e-4 * max(1.0, result["scale"]), result
    assert result["f4_f5"] < 1e-6 and result["f4_megatron"] < 1e-6, result
    assert result["scaled"] > 0  # the scaling is really in effect (the check can fail)


def test_partial_rope_is_refused(exported, tmp_path):
    from megatron_tw.checkpoint.export_config import hf_config_dict
    from megatron_tw.checkpoint.families import ConversionError
    from megatron_tw.checkpoint.megatron_io import checkpoint_args, checkpoint_data_dir

    args = checkpoint_args(checkpoint_data_dir(str(exported["ckpt"])))
    args.rotary_percent = 0.5
    with pytest.raises(ConversionError, match=r"--rotary-percent 0.5"):
        hf_config_dict(args, vocab_size=128, dtype="float32")
