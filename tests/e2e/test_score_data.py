"""tools/score_data.py end to end: the sidecar holds a frozen scorer's short-context losses of
exactly the training samples, and training with them equals training with the online scorer.

- The sidecar rows, read back through the training's own dataset provider (``--tw-scorer
  precomputed``: sample i gets row i), equal a plain float64 Llama forward written from the
  formulas, run on each sample's windows from the HF weights (``windows`` mode, train and valid).
- ``--tw-scorer precomputed`` after score_data gives the same lm loss, weighted loss and grad norm
  at every step (and the same validation loss) as ``--tw-scorer frozen`` with the same scorer.
- A missing sidecar stops the training run before any step, naming --tw-short-loss-path and the
  score_data command.

Run as a script (``reference``), this file rebuilds the samples with the project's provider in a
fresh process, so megatron's global state stays out of pytest.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SEQ, W, STRIDE = 64, 33, 16  # windows of 33 tokens every 16 tile the 65 tokens of a sample


def tiny_hf_scorer(path, seed: int = 0, max_positions: int = 128) -> str:
    """A tiny random HF Llama (vocab 128 = the tests' NullTokenizer vocabulary), a frozen scorer
    with its own architecture (hidden 32, 2 layers) unlike the trainee's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so positions and context matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path)


def run_flags(data: str) -> list[str]:
    from tests.launch import TINY_MODEL, TINY_TRAINING

    model = list(TINY_MODEL)
    training = [a for a in TINY_TRAINING if a != "--mock-data"]
    i = training.index("--eval-iters")
    training[i + 1] = "1"  # one validation batch at iteration 2: the valid split is read too
    i = training.index("--eval-interval")
    training[i + 1] = "2"
    return model + training + ["--train-iters", "2", "--data-path", data, "--split", "80,20,0",
                               "--tw-preset", "dense", "--tw-short-context", str(W),
                               "--tw-short-mode", "windows", "--tw-short-stride", str(STRIDE)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.launch import torchrun, write_random_corpus

    tmp = tmp_path_factory.mktemp("score")
    scorer = tiny_hf_scorer(tmp / "scorer")
    data = write_random_corpus(tmp / "corpus", n_docs=120, min_len=5, max_len=60)
    flags = run_flags(data)
    proc = torchrun(1, "tools/score_data.py",
                    [*flags, "--tw-scorer-load", scorer, "--score-chunk-rows", "5"])
    return {"tmp": tmp, "scorer": scorer, "data": data, "flags": flags, "output": proc.stdout}


def test_sidecar_rows_equal_float64_reference(setup):
    out = setup["output"]
    assert f"wrote {setup['data']}_short_loss_train.{{bin,idx,json}}: 16 x {SEQ} float32" in out
    assert f"wrote {setup['data']}_short_loss_valid.{{bin,idx,json}}: 16 x {SEQ} float32" in out
    flags = setup["flags"] + ["--tw-scorer", "precomputed"]
    from tests.launch import env

    ref = subprocess.run([sys.executable, __file__, "reference", setup["scorer"],
                          json.dumps(flags)], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=240)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    result = json.loads(ref.stdout.strip().splitlines()[-1])
    print(result)
    assert result["rows"] == {"train": 16, "valid": 16}
    for split in ("train", "valid"):
        assert result["max_abs_diff"][split] < 2e-5, result
    # the short context is really short: the reference at full context differs
    assert result["full_context_diff"] > 1e-2


def test_precomputed_training_equals_online_frozen(setup):
    from tests.launch import assert_same_run, train

    tmp = setup["tmp"]
    frozen = train(1, setup["flags"] + ["--tw-scorer", "frozen", "--tw-scorer-load",
                                        setup["scorer"]], tmp / "tb_frozen")
    pre = train(1, setup["flags"] + ["--tw-scorer", "precomputed"], tmp / "tb_pre")
    assert_same_run(pre, frozen, tags=("lm loss", "weighted loss", "grad-norm",
                                       "long-context gain"), rel=1e-5)
    assert_same_run(pre, frozen, tags=("lm loss validation",), rel=1e-5)
    assert any(abs(frozen["weighted loss"][s] - frozen["lm loss"][s]) > 1e-4
               for s in frozen["lm loss"])


def test_missing_sidecar_stops_before_training(setup):
    from tests.launch import pretrain

    proc = pretrain(1, setup["flags"] + ["--tw-scorer", "precomputed", "--tw-short-loss-path",
                                         str(setup["tmp"] / "nowhere")], check=False)
    assert proc.returncode != 0
    assert "--tw-short-loss-path" in proc.stdout and "nowhere_train" in proc.stdout
    assert "tools/score_data.py" in proc.stdout and "--tw-scorer-load" in proc.stdout
    assert " iteration " not in proc.stdout
    assert "Traceback" not in proc.stdout.split("pretrain_tw.py: error:")[0][-2000:]


# -- the float64 reference (run as a script) ------------------------------------------------------

def llama_nll(w: dict, cfg: dict, tokens, labels, allowed):
    """Per-position -log p(labels[p]) of an HF Llama in float64, from the formulas.

    tokens, labels: [L] int64; allowed: [L, L] bool (query p may attend key j). Returns [L].
    """
    import torch

    f = {k: v.double() for k, v in w.items()}
    L, nh, nkv = len(tokens), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rope(x):  # [heads, L, hd], HF's rotate-half convention
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    h = f["model.embed_tokens.weight"][tokens]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms(h, f[p + "input_layernorm.weight"])
        q = (x @ f[p + "self_attn.q_proj.weight"].T).view(L, nh, hd).transpose(0, 1)
        k = (x @ f[p + "self_attn.k_proj.weight"].T).view(L, nkv, hd).transpose(0, 1)
        v = (x @ f[p + "self_attn.v_proj.weight"].T).view(L, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + (attn @ v).transpose(0, 1).reshape(L, nh * hd) @ f[p + "self_attn.o_proj.weight"].T
        x = rms(h, f[p + "post_attention_layernorm.weight"])
        gate, up = x @ f[p + "mlp.gate_proj.weight"].T, x @ f[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ f[p + "mlp.down_proj.weight"].T
    logits = rms(h, f["model.norm.weight"]) @ f["lm_head.weight"].T
    return -logits.log_softmax(-1)[torch.arange(L), labels]


def windows_reference(w, cfg, tokens, labels, window: int, stride: int):
    """The reference's windows of W tokens: tokens[kS : kS+W] scored alone, i.e. the W - 1
    inputs at positions kS .. kS+W-2 with their labels; window 0 supplies positions 0..W-2,
    window k >= 1 its last S positions (no BOS: the NullTokenizer has none)."""
    import torch

    s = len(tokens)
    out = torch.full((s,), float("nan"), dtype=torch.float64)
    n = window - 1  # inputs per window
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for k in range((s + 1 - window) // stride + 1):
        a = k * stride
        nll = llama_nll(w, cfg, tokens[a:a + n], labels[a:a + n], causal)
        keep = 0 if k == 0 else n - stride
        out[a + keep:a + n] = nll[keep:]
    assert not torch.isnan(out).any(), "the windows do not cover every position"
    return out


def reference(scorer: str, flags: list[str]) -> dict:
    import torch
    from megatron.training.training import get_train_valid_test_num_samples
    from safetensors.torch import load_file

    from megatron_tw.arguments import parse_and_validate_args
    from megatron_tw.checkpoint.megatron_io import single_process_megatron
    from megatron_tw.data.provider import train_valid_test_datasets_provider

    weights = load_file(str(Path(scorer) / "model.safetensors"))
    cfg = json.loads((Path(scorer) / "config.json").read_text())
    diffs, rows, full_diff = {}, {}, 0.0
    with single_process_megatron():
        parse_and_validate_args(flags)
        datasets = train_valid_test_datasets_provider(get_train_valid_test_num_samples())
        for split, dataset in zip(("train", "valid"), datasets):
            n = dataset.dataset.sidecar.rows  # WithSampleId(WithShortLoss(...))
            rows[split], diffs[split] = n, 0.0
            for i in range(n):
                sample = dataset[i]
                tokens, labels = sample["tokens"], sample["labels"]
                want = windows_reference(weights, cfg, tokens, labels, W, STRIDE)
                got = sample["short_loss"].double()
                diffs[split] = max(diffs[split], float((got - want).abs().max()))
                if i == 0:
                    full = llama_nll(weights, cfg, tokens, labels,
                                     torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
                    full_diff = float((full - want)[W:].abs().max())
    return {"rows": rows, "max_abs_diff": diffs, "full_context_diff": full_diff}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "reference":
        print(json.dumps(reference(sys.argv[2], json.loads(sys.argv[3]))))
