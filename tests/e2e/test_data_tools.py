"""The data tools as a user runs them: train_tokenizer -> preprocess_data -> megatron reads.

Subprocesses on small temporary files; the real corpus only when it is already built
(``data/demo``), and then with npm/apt-get off the PATH to prove a rerun needs no network.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
WORDS = "sea ship whale morning letter garden storm river island captain quiet long".split()


def run_tool(name, *args, env=None, timeout=180):
    return subprocess.run([PYTHON, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def make_docs(n, words_per_doc, seed=0):
    rng = numpy.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words_per_doc)) + ".\n\nThe end." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(200, 30)))
    result = run_tool("train_tokenizer.py", "--input", corpus, "--out", root / "tok",
                      "--vocab-size", 320, "--num-threads", 1)
    assert result.returncode == 0, result.stderr
    assert "trained in" in result.stdout
    again = run_tool("train_tokenizer.py", "--input", corpus, "--out", root / "tok",
                     "--vocab-size", 320, "--num-threads", 1)
    assert again.returncode == 0 and "up to date" in again.stdout
    return root / "tok" / "tokenizer.model"


def test_preprocess_cli_progress_summary_and_output(tokenizer_model, tmp_path):
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = make_docs(12, 50, seed=1)
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    result = run_tool("preprocess_data.py", "--input", inp, "--output-prefix", tmp_path / "out",
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      tokenizer_model, "--append-eod", "--workers", 2, "--log-interval", 4)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("processed")]
    assert len(progress) == 3 and all("docs/s" in p and "MB/s" in p for p in progress)
    assert "Processed 12 records" in result.stdout
    assert "documents written: 12" in result.stdout and "skipped bad lines: 0" in result.stdout

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()]
                                                        for t in docs]
    assert f"tokens: {sum(len(ds[i]) for i in range(len(ds)))}" in result.stdout


def test_preprocess_cli_bad_line_exit_code(tokenizer_model, tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "wrong key"}\n')
    args = ["--input", inp, "--output-prefix", tmp_path / "out", "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model]
    result = run_tool("preprocess_data.py", *args)
    assert result.returncode == 1
    assert f"{inp}:3: missing key 'text'" in result.stderr
    assert not list(tmp_path.glob("out*"))  # (--skip-bad-lines: tests/unit)


def test_interrupted_run_leaves_nothing(tokenizer_model, tmp_path):
    """SIGINT in the middle of a run: no file under the final names, temp files removed."""
    inp = tmp_path / "big.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(5000, 400)))
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(inp),
         "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(tokenizer_model), "--workers", "2", "--no-progress",
         "--log-interval", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell's background job ignores SIGINT and the child would inherit that: restore the
        # default, so Python turns SIGINT into KeyboardInterrupt as it does for a user's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # wait until documents are being written
        if line.startswith("processed"):
            break
    assert proc.poll() is None and list(tmp_path.glob("out_text_document.tmp-*.bin"))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert not list(tmp_path.glob("out*")), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.skipif(not (ROOT / "data/demo/summary.json").exists(),
                    reason="run `python tools/build_demo_data.py --out data/demo` first")
def test_demo_data_rerun_is_cached_and_offline(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()  # no npm, apt-get or dpkg-deb: any fetch would fail
    result = run_tool("build_demo_data.py", "--out", "data/demo",
                      env={"PATH": str(empty_bin)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "nothing fetched" in result.stdout and result.stdout.count("up to date") == 4
    summary = json.loads((ROOT / "data/demo/summary.json").read_text())
    assert summary["heldout_titles"] == ["Persuasion"] and summary["train_documents"] > 0
