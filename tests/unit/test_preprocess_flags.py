"""Megatron-LM's preprocess_data.py flags: each accepted with its meaning there, or refused.

In-process ``tools/preprocess_data.py`` ``main(argv)`` calls on tiny inputs. References are
independent of the code under test: the ``sentencepiece`` processor on literal strings,
megatron.core's IndexedDataset reading the files, byte comparison with ``--partitions 1``.
Sentence splitting runs nltk's real punkt algorithm on a small punkt_tab model written here
(the real data is not downloadable offline): the expected sentences are written literally.
"""

import gzip
import json
import os
import sys

import pytest

from tests.unit.test_bad_inputs import error_line, run
from tests.unit.test_preprocess import make_text, read_documents, write_jsonl

pytestmark = pytest.mark.unit

TEXTS = make_text(23, seed=11)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from megatron_tw.data.preprocess.spm_trainer import train_sentencepiece

    root = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(root / "corpus.jsonl", make_text(300) + [
        "Dr. Smith went home. He slept!\nThe end.", "Mr. Brown came late. Everyone waited."])
    return train_sentencepiece([str(corpus)], root / "tok", vocab_size=350, num_threads=1)[0]


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture
def punkt_english(tmp_path, monkeypatch):
    """A small real punkt_tab model (abbreviations dr, mr) in a data folder nltk searches."""
    nltk = pytest.importorskip("nltk")
    model = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    (model / "abbrev_types.txt").write_text("dr\nmr\n")
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (model / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    return model


def args(inputs, prefix, model, *extra):
    return ["--input", *map(str, inputs), "--output-prefix", str(prefix),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--append-eod", "--no-progress", *extra]


def files_of(prefix, level="document"):
    return [open(f"{prefix}_text_{level}.{ext}", "rb").read() for ext in ("bin", "idx")]


def mixed_input(folder):
    """Two JSON-lines files (one with a blank line) and a text file: 25 records."""
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", TEXTS[:10])
    with open(folder / "a.jsonl", "a") as f:
        f.write("\n")
    (folder / "b.txt").write_text("A whole text file. It is one document.")
    write_jsonl(folder / "c.jsonl", TEXTS[10:])
    return [folder / "a.jsonl", folder / "b.txt", folder / "c.jsonl"]


def test_gzip_input_file_and_folder_same_as_uncompressed(sp_model, tmp_path, capsys):
    plain = mixed_input(tmp_path / "plain")
    packed = tmp_path / "packed"
    (packed / "sub").mkdir(parents=True)
    for path, target in zip(plain, ["a.jsonl.gz", "b.txt.gz", "sub/c.jsonl.gz"]):
        with gzip.open(packed / target, "wb") as f:
            f.write(path.read_bytes())

    assert run(capsys, "preprocess_data", args([plain[0]], tmp_path / "p1", sp_model))[0] == 0
    assert run(capsys, "preprocess_data",
               args([packed / "a.jsonl.gz"], tmp_path / "g1", sp_model))[0] == 0
    assert files_of(tmp_path / "g1") == files_of(tmp_path / "p1")

    # a folder: .gz files are read, not skipped (sorted: a.jsonl.gz, b.txt.gz, sub/c.jsonl.gz)
    assert run(capsys, "preprocess_data", args(plain, tmp_path / "p", sp_model))[0] == 0
    rc, out, _ = run(capsys, "preprocess_data", args([packed], tmp_path / "g", sp_model))
    assert rc == 0 and "documents written: 24" in out
    assert files_of(tmp_path / "g") == files_of(tmp_path / "p")

    (tmp_path / "bad.jsonl.gz").write_bytes(b'{"text": "not compressed"}\n')
    rc, _, err = run(capsys, "preprocess_data",
                     args([tmp_path / "bad.jsonl.gz"], tmp_path / "bad", sp_model))
    assert "bad.jsonl.gz: not a readable gzip file" in error_line(rc, err, "preprocess_data")
    assert not list(tmp_path.glob("bad_*"))


def test_input_glob_pattern(sp_model, tmp_path, capsys):
    inputs = mixed_input(tmp_path / "in")
    run(capsys, "preprocess_data", args([inputs[0], inputs[2]], tmp_path / "listed", sp_model))
    rc, _, _ = run(capsys, "preprocess_data",
                   args([tmp_path / "in" / "*.jsonl"], tmp_path / "glob", sp_model))
    assert rc == 0 and files_of(tmp_path / "glob") == files_of(tmp_path / "listed")


@pytest.mark.parametrize("partitions,workers", [(3, 3), (2, 4)])
def test_partitions_output_identical_to_one_partition(partitions, workers, sp_model, tmp_path,
                                                      capsys):
    inputs = mixed_input(tmp_path / "in")
    assert run(capsys, "preprocess_data", args(inputs, tmp_path / "one", sp_model))[0] == 0
    rc, out, err = run(capsys, "preprocess_data", args(
        inputs, tmp_path / "out" / "n", sp_model, "--partitions", partitions,
        "--workers", workers))
    assert rc == 0, err
    assert "documents written: 24" in out and "blank lines: 1" in out
    assert files_of(tmp_path / "out" / "n") == files_of(tmp_path / "one")
    # no partition or temporary file left, next to the output or the input
    assert sorted(os.listdir(tmp_path / "out")) == ["n_text_document.bin",
                                                    "n_text_document.idx"]
    assert sorted(os.listdir(tmp_path / "in")) == ["a.jsonl", "b.txt", "c.jsonl"]


def test_keep_sequential_samples_keeps_input_order(sp_model, sp, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    rc, _, err = run(capsys, "preprocess_data", args(
        [inp], tmp_path / "out", sp_model, "--partitions", 4, "--workers", 4,
        "--keep-sequential-samples"))
    assert rc == 0, err
    documents, _ = read_documents(tmp_path / "out_text_document")
    assert documents == [sp.encode(text) + [sp.eos_id()] for text in TEXTS]


def test_partitions_bad_line_named_as_with_one_partition(sp_model, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines[19] = '{"text": "unterminated'
    inp.write_text("\n".join(lines) + "\n")
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "one", sp_model))
    expected = error_line(rc, err, "preprocess_data")
    assert "in.jsonl:20: malformed JSON" in expected
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "n", sp_model,
                                                     "--partitions", 3, "--workers", 3))
    assert error_line(rc, err, "preprocess_data") == expected.replace("/one_", "/n_")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_partitions_refused_when_workers_not_a_multiple(sp_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "out", sp_model,
                                                     "--partitions", 2, "--workers", 3))
    line = error_line(rc, err, "preprocess_data")
    assert "--workers 3 is not a multiple of --partitions 2" in line


def test_split_sentences_without_nltk_says_how_to_install(sp_model, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # `import nltk` raises ImportError
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS[:2])
    rc, _, err = run(capsys, "preprocess_data",
                     args([inp], tmp_path / "out", sp_model, "--split-sentences"))
    line = error_line(rc, err, "preprocess_data")
    assert "--split-sentences needs nltk" in line and "pip install nltk" in line
    assert "python -m nltk.downloader punkt_tab" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_split_sentences_without_punkt_data_says_how_to_install(sp_model, tmp_path, capsys,
                                                                monkeypatch):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty_nltk_data")])
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS[:2])
    rc, _, err = run(capsys, "preprocess_data",
                     args([inp], tmp_path / "out", sp_model, "--split-sentences"))
    line = error_line(rc, err, "preprocess_data")
    assert "needs nltk's punkt data, which is not installed" in line
    assert "python -m nltk.downloader punkt_tab" in line and "NLTK_DATA" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_split_sentences_one_sequence_per_sentence(punkt_english, sp_model, sp, tmp_path,
                                                   capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        "Dr. Smith went home. He slept!\nThe end.", "One sentence only", "   "])
    rc, out, err = run(capsys, "preprocess_data",
                       args([inp], tmp_path / "out", sp_model, "--split-sentences"))
    assert rc == 0, err
    assert "documents written: 2, sentences: 4" in out and "empty documents (not written): 1" in out
    assert not list(tmp_path.glob("out_text_document.*"))  # Megatron-LM's name: _sentence
    _, ds = read_documents(tmp_path / "out_text_sentence")
    sentences = [["Dr. Smith went home.", "He slept!", "The end."], ["One sentence only"]]
    ids = [[sp.encode(s) for s in doc] for doc in sentences]
    for doc in ids:
        doc[-1] = doc[-1] + [sp.eos_id()]  # EOD ends the document's last sentence
    assert ds.document_indices.tolist() == [0, 3, 4]
    assert ds.sequence_lengths.tolist() == [len(s) for doc in ids for s in doc]
    assert [ds[i].tolist() for i in range(len(ds))] == [s for doc in ids for s in doc]


def test_keep_newlines_keeps_whitespace_after_sentences(punkt_english, sp_model, sp, tmp_path,
                                                        capsys):
    from megatron_tw.data.preprocess.sentences import load_splitter, split_sentences

    text = "Dr. Smith went home.  He slept!\n\nThe end."
    assert split_sentences(load_splitter("english"), text) == [
        "Dr. Smith went home.", "He slept!", "The end."]
    assert split_sentences(load_splitter("english", keep_newlines=True), text) == [
        "Dr. Smith went home.  ", "He slept!\n\n", "The end."]

    inp = write_jsonl(tmp_path / "in.jsonl", [text])
    rc, _, err = run(capsys, "preprocess_data", args(
        [inp], tmp_path / "out", sp_model, "--split-sentences", "--keep-newlines"))
    assert rc == 0, err
    _, ds = read_documents(tmp_path / "out_text_sentence")
    assert ds.document_indices.tolist() == [0, 3]
    assert [ds[i].tolist() for i in range(3)] == [
        sp.encode("Dr. Smith went home.  "), sp.encode("He slept!\n\n"),
        sp.encode("The end.") + [sp.eos_id()]]
    assert sp.encode("He slept!\n\n") != sp.encode("He slept!")  # the newlines are in the ids


def test_lang_and_sentence_flags_validated(punkt_english, sp_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS[:2])
    cases = [
        (["--split-sentences", "--lang", "../german"], "--lang '../german': not a punkt language"),
        (["--split-sentences", "--lang", "klingon"],
         "--lang klingon: no punkt model for this language in nltk's data folders "
         "(installed: english)"),
        (["--lang", "english"], "--lang applies only with --split-sentences"),
        (["--keep-newlines"], "--keep-newlines applies only with --split-sentences"),
    ]
    for extra, fragment in cases:
        rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "out", sp_model,
                                                         *extra))
        assert fragment in error_line(rc, err, "preprocess_data")
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "out", sp_model,
                                                     "--split-sentences", "--lang", "english"))
    assert rc == 0, err


def test_megatron_lm_command_line_accepted_and_old_flags(sp_model, tmp_path, capsys):
    from tests.unit.test_bad_inputs import tool

    # every flag of Megatron-LM's tool parses, with its meaning
    parsed = tool("preprocess_data").get_args([
        "--input", "x.jsonl", "--json-keys", "text", "title", "--split-sentences",
        "--keep-newlines", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json",
        "--merge-file", "m.txt", "--vocab-size", "100", "--vocab-extra-ids", "0",
        "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "10",
        "--tiktoken-special-tokens", "<unk>", "<s>", "</s>", "--append-eod", "--lang", "german",
        "--output-prefix", "out", "--workers", "4", "--partitions", "2", "--log-interval", "7",
        "--keep-sequential-samples"])
    assert parsed.special_tokens == ["<unk>", "<s>", "</s>"]  # = --tokenizer-special-tokens
    assert (parsed.partitions, parsed.workers, parsed.lang, parsed.log_interval) == (2, 4,
                                                                                     "german", 7)
    inp = write_jsonl(tmp_path / "in.jsonl", TEXTS[:2])
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "out", sp_model,
                                                     "--legacy-tokenizer"))
    assert "--legacy-tokenizer: refused" in error_line(rc, err, "preprocess_data")
    rc, _, err = run(capsys, "preprocess_data", args([inp], tmp_path / "out", sp_model,
                                                     "--vocab-extra-ids", "0"))
    assert rc == 0, err
