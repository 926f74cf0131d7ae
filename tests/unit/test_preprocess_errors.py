"""Bad input loses nothing silently: each case names file and line, or is counted.

On an error nothing may exist under the final names (``<prefix>_text_document.*``), a
dataset already there stays byte-identical, and no temporary file is left behind.
"""

import json

import pytest

from tests.unit.test_preprocess import make_text, read_documents, run_preprocess, write_jsonl

pytestmark = pytest.mark.unit

GOOD = make_text(6, seed=3)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from megatron_tw.data.preprocess.spm_trainer import train_sentencepiece

    root = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(root / "corpus.jsonl", make_text(300))
    return train_sentencepiece([str(corpus)], root / "tok", vocab_size=350, num_threads=1)[0]


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


def lines_file(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(i):
    return json.dumps({"text": GOOD[i]}).encode()


BAD_CASES = {
    # name: (bad line bytes, expected message fragment)
    "malformed_json": (b'{"text": "unterminated', "malformed JSON"),
    "missing_key": (json.dumps({"body": "no text key"}).encode(), "missing key 'text'"),
    "not_a_string": (json.dumps({"text": 42}).encode(), "key 'text' holds int, not a string"),
    "not_an_object": (b'["a", "list"]', "expected a JSON object, got list"),
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}', "invalid UTF-8 at byte 13"),
    "lone_surrogate": (b'{"text": "half \\ud800 pair"}', "not valid Unicode"),
}


def assert_nothing_written(tmp_path, prefix="out"):
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(prefix))
    assert leftovers == [], leftovers


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_is_an_error_naming_file_and_line(case, sp_model, tmp_path):
    from megatron_tw.data.preprocess.pipeline import PreprocessError

    bad, fragment = BAD_CASES[case]
    inp = lines_file(tmp_path / "in.jsonl", [good_line(0), good_line(1), bad, good_line(2)])
    with pytest.raises(PreprocessError) as info:
        run_preprocess([inp], tmp_path / "out", "SentencePieceTokenizer", sp_model)
    message = str(info.value)
    assert f"{inp}:3:" in message and fragment in message
    assert "--skip-bad-lines" in message  # the fix is named
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_bad_lines_counts_and_reports(case, sp_model, sp, tmp_path):
    bad, fragment = BAD_CASES[case]
    inp = lines_file(tmp_path / "in.jsonl", [good_line(0), bad, good_line(1), bad, good_line(2)])
    summary = run_preprocess([inp], tmp_path / "out", "SentencePieceTokenizer", sp_model,
                             skip_bad_lines=True)
    assert summary.skipped_bad == 2 and summary.records == 5
    assert summary.documents["text"] == 3
    assert f"{inp}:2:" in summary.bad_examples[0] and f"{inp}:4:" in summary.bad_examples[1]
    assert "skipped bad lines: 2" in summary.format() and fragment in summary.format()
    docs, _ = read_documents(tmp_path / "out_text_document")
    assert docs == [sp.encode(GOOD[i]) for i in range(3)]


def test_invalid_utf8_replace_rule(sp_model, sp, tmp_path):
    inp = lines_file(tmp_path / "in.jsonl", [good_line(0), b'{"text": "caf\xe9 au lait"}'])
    summary = run_preprocess([inp], tmp_path / "out", "SentencePieceTokenizer", sp_model,
                             invalid_utf8="replace")
    assert summary.replaced_utf8 == 1 and summary.documents["text"] == 2
    docs, _ = read_documents(tmp_path / "out_text_document")
    assert docs[1] == sp.encode("caf\ufffd au lait")


def test_invalid_utf8_in_text_file_names_the_file(sp_model, tmp_path):
    from megatron_tw.data.preprocess.pipeline import PreprocessError

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(GOOD[0])
    bad = tmp_path / "docs" / "b.txt"
    bad.write_bytes(b"fine start \xff\xfe then garbage")
    with pytest.raises(PreprocessError, match=rf"{bad}: invalid UTF-8 at byte 11"):
        run_preprocess([tmp_path / "docs"], tmp_path / "out", "SentencePieceTokenizer", sp_model)
    assert_nothing_written(tmp_path)


def test_empty_documents_and_blank_lines_are_counted(sp_model, sp, tmp_path):
    inp = lines_file(tmp_path / "in.jsonl", [
        good_line(0), json.dumps({"text": ""}).encode(), b"", b"   ", good_line(1)])
    summary = run_preprocess([inp], tmp_path / "out", "SentencePieceTokenizer", sp_model,
                             append_eod=True)
    assert summary.empty["text"] == 1 and summary.blank_lines == 2
    assert summary.documents["text"] == 2 and summary.records == 5
    text = summary.format()
    assert "empty documents (not written): 1" in text and "blank lines: 2" in text
    docs, _ = read_documents(tmp_path / "out_text_document")
    assert docs == [sp.encode(GOOD[i]) + [sp.eos_id()] for i in range(2)]  # no EOD-only doc


def test_failed_rerun_keeps_the_previous_dataset(sp_model, tmp_path):
    from megatron_tw.data.preprocess.pipeline import PreprocessError

    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    run_preprocess([good], tmp_path / "out", "SentencePieceTokenizer", sp_model)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out_*")}
    assert set(before) == {"out_text_document.bin", "out_text_document.idx"}

    bad = lines_file(tmp_path / "bad.jsonl", [good_line(0), b"{not json"])
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: malformed JSON"):
        run_preprocess([bad], tmp_path / "out", "SentencePieceTokenizer", sp_model)
    after = {p.name: p.read_bytes() for p in tmp_path.glob("out_*")}
    assert after == before  # untouched, and no temporary files


def test_configuration_errors_name_the_flag(sp_model, tmp_path):
    from megatron_tw.data.preprocess.pipeline import PreprocessError

    (tmp_path / "a.txt").write_text(GOOD[0])
    with pytest.raises(PreprocessError, match="--json-keys"):
        run_preprocess([tmp_path / "a.txt"], tmp_path / "out", "SentencePieceTokenizer",
                       sp_model, json_keys=["text", "title"])
    with pytest.raises(PreprocessError, match="--input .*missing.jsonl: no such file"):
        run_preprocess([tmp_path / "missing.jsonl"], tmp_path / "out", "SentencePieceTokenizer",
                       sp_model)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        run_preprocess([tmp_path / "a.txt"], tmp_path / "out", "SentencePieceTokenizer",
                       tmp_path / "nope.model")
    assert_nothing_written(tmp_path)
