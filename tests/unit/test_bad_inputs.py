"""Bad inputs to the command-line tools, run in-process as a user runs them (``main(argv)``).

Each gives ONE line ``<tool>.py: error: <message>`` on stderr naming the file, line or flag and
the fix, exit status 1, no traceback, and leaves nothing behind (no output, no temporary file, no
folder the run created). docs/reliability.md ("Bad input") lists them with the real lines.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_TOOLS = {}


def tool(name):
    if name not in _TOOLS:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[name] = module
    return _TOOLS[name]


def run(capsys, name, argv):
    """(exit status, stdout, stderr) of ``tools/<name>.py argv``."""
    capsys.readouterr()
    try:
        rc = tool(name).main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(rc, err, name) -> str:
    """The one error line; fails on a traceback, a second error line or a zero exit status."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if f"{name}.py: error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{name}.py: error: "), err
    assert rc == 1, (rc, err)
    return lines[0]


def listing(root) -> list[str]:
    """Everything under ``root``, hidden entries included (to prove nothing was left behind)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def dead_pid() -> int:
    """The id of a process that has exited (an interrupted run's temporary names carry it)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def unwritable_folder(kind, tmp_path) -> Path:
    """A folder where creating a file really fails. ``chmod``: mode 0o555 (not for root, whom
    permissions do not stop); ``sysfs``: /sys, where the kernel refuses new files even to root."""
    if kind == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: a chmod 0o555 folder stays writable (the sysfs case "
                        "covers root)")
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys")
    probe = folder / f"megatron-tw-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError:
        return folder
    probe.unlink()
    pytest.skip("/sys accepts new files here")


def restore(folder):
    if folder != Path("/sys"):
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# tools/preprocess_data.py


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from tests.launch import train_small_sentencepiece

    return train_small_sentencepiece(tmp_path_factory.mktemp("sp") / "tok")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"It was the best of times {i}."}) + "\n"
                            for i in range(5)))
    return path


def preprocess_args(inp, prefix, model, tokenizer_type="SentencePieceTokenizer"):
    return ["--input", inp, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type,
            "--tokenizer-model", model, "--no-progress-bar"]


@pytest.mark.parametrize("kind", ["chmod", "sysfs"])
def test_preprocess_output_prefix_in_read_only_folder(kind, sp_model, corpus, tmp_path, capsys):
    folder = unwritable_folder(kind, tmp_path)
    before = listing(tmp_path)
    prefix = folder / f"mtw-bad-input-{os.getpid()}"
    try:
        rc, _, err = run(capsys, "preprocess_data", preprocess_args(corpus, prefix, sp_model))
        line = error_line(rc, err, "preprocess_data")
        assert f"--output-prefix {prefix}: cannot write {folder}" in line
        assert "choose a folder you can write to" in line
        assert not list(folder.glob(f"{prefix.name}*"))
    finally:
        restore(folder)
    assert listing(tmp_path) == before


def test_preprocess_output_prefix_under_a_file(sp_model, corpus, tmp_path, capsys):
    (tmp_path / "somefile").write_text("not a folder\n")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "preprocess_data",
                     preprocess_args(corpus, tmp_path / "somefile" / "sub" / "out", sp_model))
    line = error_line(rc, err, "preprocess_data")
    assert f"--output-prefix {tmp_path}/somefile/sub/out: {tmp_path}/somefile is a file" in line
    assert "choose a prefix inside a folder" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("tokenizer_type,target,fragment", [
    ("SentencePieceTokenizer", "notes.txt", "not a SentencePiece model"),
    ("HuggingFaceTokenizer", "notes.txt", "a file, but --tokenizer-type HuggingFaceTokenizer "
                                          "takes a tokenizer folder"),
    ("SentencePieceTokenizer", "photos", "a folder, but --tokenizer-type SentencePieceTokenizer "
                                         "takes a .model file"),
    ("HuggingFaceTokenizer", "photos", "no tokenizer files in this folder"),
])
def test_preprocess_tokenizer_model_not_a_tokenizer(tokenizer_type, target, fragment, corpus,
                                                     tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("shopping list\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "preprocess_data",
                     preprocess_args(corpus, tmp_path / "out", tmp_path / target, tokenizer_type))
    line = error_line(rc, err, "preprocess_data")
    assert f"--tokenizer-model {tmp_path / target}: {fragment}" in line
    assert listing(tmp_path) == before


def test_preprocess_hf_folder_without_tokenizer_files(corpus, tmp_path, capsys):
    """A model folder whose tokenizer.json was not copied: transformers would blame a missing
    sentencepiece/tiktoken install; the error names the missing files instead."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "eos_token": "</s>"}))
    before = listing(tmp_path)
    rc, _, err = run(capsys, "preprocess_data", preprocess_args(
        corpus, tmp_path / "out", folder, "HuggingFaceTokenizer"))
    line = error_line(rc, err, "preprocess_data")
    assert f"--tokenizer-model {folder}: no tokenizer files in this folder" in line
    assert "tokenizer.json" in line and "without its tokenizer" in line
    assert "sentencepiece" not in line.lower() and "tiktoken" not in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("content,fragment", [
    ("", "the input is empty (0 bytes)"),
    ("\n   \n\n", "no non-empty document for key 'text' (3 records: 3 blank lines"),
    ('{"text": ""}\n{"text": ""}\n', "no non-empty document for key 'text' (2 records: 0 blank "
                                     "lines, 2 empty documents"),
], ids=["zero_bytes", "blank_lines", "empty_documents"])
def test_preprocess_empty_input_is_refused(content, fragment, sp_model, tmp_path, capsys):
    inp = tmp_path / "empty.jsonl"
    inp.write_text(content)
    before = listing(tmp_path)
    rc, _, err = run(capsys, "preprocess_data",
                     preprocess_args(inp, tmp_path / "data" / "out", sp_model))
    line = error_line(rc, err, "preprocess_data")
    assert f"--input {inp}: {fragment}" in line
    assert listing(tmp_path) == before  # no dataset, no temporary file, no data/ folder


def test_preprocess_rerun_removes_an_interrupted_runs_temporaries(sp_model, corpus, tmp_path,
                                                                  capsys):
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f"out_text_document.tmp-{dead}.{ext}" for ext in ("bin", "idx")]
    running = tmp_path / f"out_text_document.tmp-{alive}.bin"  # a concurrent run's: kept
    for path in (*stale, running):
        path.write_bytes(b"partial")
    rc, out, err = run(capsys, "preprocess_data", preprocess_args(corpus, tmp_path / "out",
                                                                  sp_model))
    assert rc == 0, err
    assert "removed 2 temporary files of an interrupted earlier run" in out
    assert not any(p.exists() for p in stale) and running.exists()
    assert sorted(p.name for p in tmp_path.glob("out_*")) == [
        "out_text_document.bin", "out_text_document.idx", running.name]


# ---------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers: config.json, weights, no tokenizer."""
    from tests.distributed.convert_cases import make_hf_model

    path = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_model("llama-gqa2-tied").save_pretrained(path)
    return path


def hf_copy(hf_dir, dest, config_text=None):
    dest.mkdir()
    for f in os.listdir(hf_dir):
        (dest / f).write_bytes((hf_dir / f).read_bytes())
    if config_text is not None:
        (dest / "config.json").write_text(config_text)
    return dest


def import_args(src, out):
    return ["hf-to-megatron", "--hf-dir", src, "--out", out, "--make-vocab-size-divisible-by",
            "32"]


def test_convert_config_json_empty_object(hf_dir, tmp_path, capsys):
    src = hf_copy(hf_dir, tmp_path / "src", "{}")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "convert_checkpoint", import_args(src, tmp_path / "out"))
    line = error_line(rc, err, "convert_checkpoint")
    assert f"{src}/config.json: no 'model_type' or 'architectures' field (an empty object)" in line
    assert "use the config.json saved with the model" in line
    assert listing(tmp_path) == before


def test_convert_config_json_malformed(hf_dir, tmp_path, capsys):
    text = (hf_dir / "config.json").read_text()
    broken = text.replace('"hidden_size": 64,', '"hidden_size": 64,,', 1)
    assert broken != text
    line_no = broken[:broken.index(",,")].count("\n") + 1
    src = hf_copy(hf_dir, tmp_path / "src", broken)
    before = listing(tmp_path)
    rc, _, err = run(capsys, "convert_checkpoint", import_args(src, tmp_path / "out"))
    line = error_line(rc, err, "convert_checkpoint")
    assert f"{src}/config.json:{line_no}:" in line and "malformed JSON" in line
    assert "fix the file" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("head_dim", [None, 16], ids=["no_head_dim", "head_dim_16"])
def test_convert_hidden_size_not_divisible_by_heads(head_dim, hf_dir, tmp_path, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(hidden_size=50, head_dim=head_dim)
    if head_dim is None:
        del config["head_dim"]
    src = hf_copy(hf_dir, tmp_path / "src", json.dumps(config, indent=2))
    before = listing(tmp_path)
    rc, _, err = run(capsys, "convert_checkpoint", import_args(src, tmp_path / "out"))
    line = error_line(rc, err, "convert_checkpoint")
    assert line.startswith(f"convert_checkpoint.py: error: {src}/config.json: ")
    if head_dim is None:  # our own check: the head size would be silently rounded down
        assert "hidden_size 50 is not divisible by num_attention_heads 4" in line
    else:  # transformers' own validation, named and on one line
        assert "The hidden size (50) is not a multiple of the number of attention heads (4)" in line
    assert "fix" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["chmod", "sysfs"])
def test_convert_out_in_read_only_folder(kind, hf_dir, tmp_path, capsys):
    folder = unwritable_folder(kind, tmp_path)
    before = listing(tmp_path)
    out = folder / f"mtw-bad-input-{os.getpid()}"
    try:
        rc, _, err = run(capsys, "convert_checkpoint", import_args(hf_dir, out))
        line = error_line(rc, err, "convert_checkpoint")
        assert f"--out {out}: cannot create {folder}/.{out.name}.tmp-{os.getpid()}" in line
        assert "choose a folder you can write to" in line
        assert not list(folder.glob(f"*{out.name}*"))
    finally:
        restore(folder)
    assert listing(tmp_path) == before


def test_convert_tracker_file_holds_garbage(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (ckpt / "iter_0000010").mkdir()
    (ckpt / "iter_0000020").mkdir()
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    tracker.write_text("<<<<<<< HEAD\n20\n=======\n")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "convert_checkpoint",
                     ["megatron-to-hf", "--load", ckpt, "--out", tmp_path / "out"])
    line = error_line(rc, err, "convert_checkpoint")
    assert f"{tracker}: holds '<<<<<<< HEAD" in line and "not an iteration number" in line
    assert "(the newest saved: 20) or pass --iteration N" in line
    assert listing(tmp_path) == before


def test_convert_hf_source_without_tokenizer(hf_dir, tmp_path, capsys):
    """The conversion succeeds, and the printed load command names no --tokenizer-model that does
    not exist: it says there is no tokenizer and how to ship one. A killed earlier run's temporary
    folders are removed on the way."""
    out = tmp_path / "meg"
    stale = [tmp_path / f".meg.tmp-{dead_pid()}", tmp_path / f".meg.tmp-{dead_pid()}.old"]
    for folder in stale:
        (folder / "release").mkdir(parents=True)
        (folder / "release" / "partial.distcp").write_bytes(b"x")
    rc, printed, err = run(capsys, "convert_checkpoint", import_args(hf_dir, out))
    assert rc == 0, err
    assert f"--tokenizer-model {out}" not in printed
    assert f"no tokenizer: {hf_dir} has no tokenizer files" in printed
    assert "rerun with --tokenizer-model FILE.model" in printed
    assert not [f for f in os.listdir(out) if f.startswith(("tokenizer", "vocab"))]
    assert json.loads((out / "megatron_args.json").read_text())["has_tokenizer"] is False
    assert "removed 2 temporary folders of an interrupted earlier run" in printed
    assert sorted(os.listdir(tmp_path)) == ["meg"]


# ---------------------------------------------------------------------------------------------
# tools/evaluate.py


def tiny_hf_model(path, vocab_size):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"vocab128": tiny_hf_model(root / "vocab128", 128),
            "vocab64": tiny_hf_model(root / "vocab64", 64)}


def eval_args(model, tokenizer, heldout, out):
    return ["--model", model, "--tokenizer", tokenizer, "--heldout", heldout, "--ppl-length", "16",
            "--out", out]


def test_evaluate_heldout_line_is_a_json_array(eval_models, sp_model, tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "It was the best of times."}) + "\n"
                    + json.dumps(["It was", "the worst of times"]) + "\n")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "evaluate",
                     eval_args(eval_models["vocab128"], sp_model, held, tmp_path / "out"))
    line = error_line(rc, err, "evaluate")
    assert f"{held}:2: expected a JSON object with a 'text' string, got a JSON array" in line
    assert "fix the line" in line
    assert listing(tmp_path) == before


def test_evaluate_hf_tokenizer_larger_than_model_vocabulary(eval_models, sp_model, tmp_path,
                                                            capsys):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "It was the best of times, it was the worst. " * 8}) + "\n")
    before = listing(tmp_path)
    rc, _, err = run(capsys, "evaluate",
                     eval_args(eval_models["vocab64"], sp_model, held, tmp_path / "out"))
    line = error_line(rc, err, "evaluate")
    assert (f"--tokenizer: the tokenizer has 100 tokens but the model {eval_models['vocab64']} "
            "embeds only 64") in line
    assert "pass the tokenizer the model was trained with" in line
    assert listing(tmp_path) == before
