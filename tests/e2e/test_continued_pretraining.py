"""Continued pretraining from a converted HF checkpoint, with context extension.

An HF Llama (rope_theta 10000, 64-token context) is converted with ``--rotary-base 40000``;
``pretrain_tw.py --pretrained-checkpoint`` then trains on 128-token sequences of an indexed dataset.
Its first-step loss must equal the HF model's loss (rope_theta overridden to 40000 the same way)
on exactly the tokens of that step, which this file rebuilds with the project's dataset provider
when run as a script (a fresh process, so megatron's global state stays out of pytest).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SEQ, MBS, GBS, NEW_BASE = 128, 2, 4, 40000
RUN = ["--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
       "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS), "--train-iters", "1",
       "--lr", "1e-4", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
       "--split", "100,0,0", "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
       "--eval-interval", "1000", "--attention-dropout", "0", "--hidden-dropout", "0"]


def _hf_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)


def test_first_step_loss_equals_hf_loss(tmp_path):
    from tests.launch import env, iteration_logs, pretrain, tensorboard_scalars, write_random_corpus

    hf, meg = tmp_path / "hf", tmp_path / "meg"
    _hf_model(hf)
    data = write_random_corpus(tmp_path / "corpus", n_docs=100, vocab=128, min_len=20, max_len=300)
    conv = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron",
                           "--hf-dir", str(hf), "--out", str(meg), "--rotary-base", str(NEW_BASE),
                           "--make-vocab-size-divisible-by", "64"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert conv.returncode == 0, conv.stdout[-3000:] + conv.stderr[-3000:]
    assert f"--rotary-base {NEW_BASE}" in conv.stdout
    model_flags = (meg / "megatron_args.txt").read_text().split()

    args = [*model_flags, *RUN, "--data-path", data, "--data-cache-path", str(tmp_path / "cache")]
    proc = pretrain(1, [*args, "--pretrained-checkpoint", str(meg),
                        "--tensorboard-dir", str(tmp_path / "tb")], timeout=300)
    assert "loading release distributed checkpoint" in proc.stdout
    assert 1 in iteration_logs(proc.stdout)
    run_loss = tensorboard_scalars(tmp_path / "tb")["lm loss"][1]

    ref = subprocess.run([sys.executable, __file__, str(hf), json.dumps(args)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    losses = json.loads(ref.stdout.strip().splitlines()[-1])
    print(f"first-step loss: run {run_loss:.7f}, HF at rope_theta {NEW_BASE} "
          f"{losses[str(NEW_BASE)]:.7f}, HF at 10000 {losses['10000']:.7f}")
    assert run_loss == pytest.approx(losses[str(NEW_BASE)], rel=1e-5)
    # the override matters: at its own rope_theta the HF model's loss is far outside that tolerance
    assert abs(run_loss - losses["10000"]) > 10 * 1e-5 * run_loss


def first_step_batch(args):
    """tokens, labels, loss_mask [GBS, SEQ] of training step 1, from the project's dataset
    provider built with the run's flags (samples 0..GBS-1: megatron's sequential sampler, DP=1)."""
    import torch
    from megatron.training.training import get_train_valid_test_num_samples

    from megatron_tw.arguments import parse_and_validate_args
    from megatron_tw.data.provider import train_valid_test_datasets_provider

    parse_and_validate_args(args)
    train, _, _ = train_valid_test_datasets_provider(get_train_valid_test_num_samples())
    samples = [train[i] for i in range(GBS)]
    return tuple(torch.stack([torch.as_tensor(s[k]) for s in samples])
                 for k in ("tokens", "labels", "loss_mask"))


def hf_losses(hf_dir, args) -> dict:
    """Mean next-token loss of the HF model over the step's tokens, at both RoPE bases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_tw.checkpoint.families import with_rope_theta

    models = {}
    for base in (10000, NEW_BASE):  # load before megatron touches torch (see test_convert_folders)
        config = with_rope_theta(AutoConfig.from_pretrained(hf_dir), base)
        models[str(base)] = AutoModelForCausalLM.from_pretrained(hf_dir, config=config).eval()
    from megatron_tw.checkpoint.megatron_io import single_process_megatron

    with single_process_megatron():
        tokens, labels, mask = first_step_batch(args)
    out = {}
    for base, model in models.items():
        with torch.no_grad():
            logits = model(tokens).logits.double()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        out[base] = float((ce * mask.flatten()).sum() / mask.sum())
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(hf_losses(sys.argv[1], json.loads(sys.argv[2]))))
