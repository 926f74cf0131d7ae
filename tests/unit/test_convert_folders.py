"""Whole folders: HF folder -> megatron torch_dist checkpoint -> HF folder (tools/convert_checkpoint.py
in-process). The way back is exact, the output loads offline with AutoModelForCausalLM and
AutoTokenizer, and a failed conversion leaves nothing at the output path."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tw.checkpoint import convert
from megatron_tw.checkpoint.families import ConversionError, megatron_args_from_hf_config
from tests.distributed.convert_cases import make_hf_model
from tests.launch import train_small_sentencepiece

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools/convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return train_small_sentencepiece(tmp_path_factory.mktemp("spm") / "tok")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_model("llama-gqa2-tied").save_pretrained(path)
    return path


def test_hf_to_megatron_to_hf(hf_dir, tmp_path, sentencepiece_model, capsys):
    cli = _cli()
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(meg),
                     "--make-vocab-size-divisible-by", "32", "--target-tensor-parallel-size", "2",
                     "--tokenizer-model", sentencepiece_model]) == 0
    printed = capsys.readouterr().out
    info = json.loads((meg / "megatron_args.json").read_text())
    from transformers import AutoConfig

    want_flags = megatron_args_from_hf_config(AutoConfig.from_pretrained(hf_dir),
                                              make_vocab_size_divisible_by=32)
    assert info["flags"] == want_flags
    assert " ".join(want_flags) in printed and (meg / "megatron_args.txt").read_text().split() == want_flags
    assert info["padded_vocab_size"] == 128 and info["compatible_tensor_parallel_sizes"] == [1, 2, 4]
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "release"
    from megatron_tw.checkpoint.megatron_io import checkpoint_args

    saved = checkpoint_args(str(meg / "release"))  # what --use-checkpoint-args / the scorer read
    assert saved.padded_vocab_size == 128 and saved.tokenizer_type is None
    assert (saved.num_layers, saved.num_query_groups, saved.rotary_base) == (2, 2, 10000)

    assert cli.main(["--direction", "megatron-to-hf", "--load", str(meg), "--out", str(back)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    result = _load_in_fresh_process(hf_dir, back)
    assert result["same_class"] and result["max_logit_diff"] == 0.0
    import sentencepiece as spm

    assert result["ids"] == spm.SentencePieceProcessor(model_file=sentencepiece_model).encode(TEXT)


TEXT = "the worst of times"
_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, back = (AutoModelForCausalLM.from_pretrained(p, local_files_only=True) for p in sys.argv[1:3])
tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    diff = (src(tokens).logits - back(tokens).logits).abs().max().item()
ids = AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)(sys.argv[3], add_special_tokens=False).input_ids
print(json.dumps({"same_class": type(src) is type(back), "max_logit_diff": diff, "ids": ids}))
"""


def _load_in_fresh_process(src, back) -> dict:
    """Load both folders with AutoModelForCausalLM / AutoTokenizer as a user would: in a process
    where megatron_tw's CPU measures are not applied (they wrap torch's tensor factories, which
    leaves transformers' from_pretrained rotary buffers uninitialised in transformers 5.24)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(src), str(back), TEXT], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "generation_config.json"):
        (broken / f).write_bytes((hf_dir / f).read_bytes())
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, broken / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        convert.hf_to_megatron(str(broken), str(out), make_vocab_size_divisible_by=32)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_existing_output_needs_overwrite(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert.hf_to_megatron(str(hf_dir), str(out))
    assert (out / "keep.txt").exists()


def test_unsupported_architecture_cli(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    rc = _cli().main(["hf-to-megatron", "--hf-dir", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sharded_pytorch_bin_source_and_sharded_safetensors_output(hf_dir, tmp_path):
    """pytorch_model-*.bin shards (with their index) convert like safetensors; an output above
    the shard size is written in huggingface_hub's layout, which transformers loads."""
    from safetensors.torch import load_file

    from megatron_tw.checkpoint import convert, hf_io

    original = load_file(hf_dir / "model.safetensors")
    bins = tmp_path / "bins"
    bins.mkdir()
    for name in os.listdir(hf_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(hf_dir / name, bins / name)
    names = sorted(original)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: original[k] for k in part}, bins / fname)
        weight_map.update({k: fname for k in part})
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(hf_io.open_hf_weights(str(bins))) == set(original)

    meg, back = tmp_path / "meg", tmp_path / "back"
    convert.hf_to_megatron(str(bins), str(meg), make_vocab_size_divisible_by=32)
    convert.megatron_to_hf(str(meg), str(back))
    roundtrip = load_file(back / "model.safetensors")
    assert all(torch.equal(roundtrip[k], original[k]) for k in original)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    total = sum(t.numel() * t.element_size() for t in original.values())
    files = hf_io.save_safetensors(dict(original), str(sharded), max_shard_bytes=total // 3)
    assert len(files) >= 3 and (sharded / "model.safetensors.index.json").exists()
    shutil.copy(hf_dir / "config.json", sharded / "config.json")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded, local_files_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original if k in state)
