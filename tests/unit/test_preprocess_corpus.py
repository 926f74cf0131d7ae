"""The corpus side: R lazy-load reader, source text cleaning, corpus split and caching.

No network: the R database is written here from the serialization format (R internals
manual, "Serialization formats"), and the corpus is built from a source registered by the
test (the registry is the extension point; the build code under test is the real one).
"""

import gzip
import json
import struct
import zlib

import pytest

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- an XDR writer for the test
def _int(v):
    return struct.pack(">i", v)


def _charsxp(s, latin1=False):
    if s is None:
        return _int(9) + _int(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    levels = (1 << 2) if latin1 else (1 << 3)
    return _int(9 | (levels << 12)) + _int(len(raw)) + raw


def _strsxp(values, attrs=b""):
    flags = 16 | ((1 << 9) if attrs else 0)
    return _int(flags) + _int(len(values)) + b"".join(_charsxp(v) for v in values) + attrs


def _realsxp(values):
    return _int(14) + _int(len(values)) + struct.pack(f">{len(values)}d", *values)


def _symbol(name, refs):
    """A SYMSXP the first time; a REFSXP (index packed in the flags) afterwards."""
    if name in refs:
        return _int(255 | (refs[name] << 8))
    refs[name] = len(refs) + 1
    return _int(1) + _charsxp(name)


def _names_attr(names, refs):
    # pairlist cell: LISTSXP with a tag, CAR = names STRSXP, CDR = NILVALUE
    return _int(2 | (1 << 10)) + _symbol("names", refs) + _strsxp(names) + _int(254)


def _named_list(items, refs):
    body = b"".join(items.values())
    return (_int(19 | (1 << 9)) + _int(len(items)) + body + _names_attr(list(items), refs))


def _stream(obj):
    return b"X\n" + _int(3) + _int(0x040300) + _int(0x030500) + _int(5) + b"UTF-8" + obj


def write_lazyload_db(prefix, variables: dict[str, bytes]):
    blob, index = b"", {}
    for name, payload in variables.items():
        data = _stream(payload)
        entry = struct.pack(">I", len(data)) + zlib.compress(data)
        index[name] = _realsxp([float(len(blob)), float(len(entry))])
        blob += entry
    refs = {}
    rdx = _named_list({"variables": _named_list(index, refs),
                       "references": _int(254),  # NULL
                       "compressed": _int(10) + _int(1) + _int(1)}, refs)
    (prefix.parent / (prefix.name + ".rdb")).write_bytes(blob)
    (prefix.parent / (prefix.name + ".rdx")).write_bytes(gzip.compress(_stream(rdx)))


def test_rdata_reader_reads_character_vectors(tmp_path):
    from megatron_tw.data.preprocess.rdata import read_lazyload_db

    novel = ["PERSUASION", "", "Chapter 1", "Sir Walter Elliot, of Kellynch Hall,", None,
             "caf\u00e9 \u2014 \u6f22"]
    refs = {}
    named = _strsxp(["x", "y"], attrs=_names_attr(["first", "second"], refs))
    write_lazyload_db(tmp_path / "Rdata", {"persuasion": _strsxp(novel), "pair": named})
    db = read_lazyload_db(tmp_path / "Rdata")
    assert sorted(db) == ["pair", "persuasion"]
    assert db["persuasion"].value == novel
    assert db["pair"].value == ["x", "y"] and db["pair"].names == ["first", "second"]


def test_rdata_reader_rejects_what_it_cannot_read(tmp_path):
    from megatron_tw.data.preprocess.rdata import RDataError, unserialize

    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n1\n")
    with pytest.raises(RDataError, match="type 99"):
        unserialize(_stream(_int(99)))
    with pytest.raises(RDataError, match="truncated"):
        unserialize(_stream(_int(16) + _int(3) + _charsxp("only one")))


def test_text_cleaning():
    from megatron_tw.data.preprocess.sources import detag_brown, unwrap_paragraphs

    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
           "It/pps wasn't/bedz* ,/, he/pps said/vbd (/( twice/rb )/) ./.\n\n\n"
           "\tNew/jj paragraph/nn ;/. Atlanta's/np$ mayor/nn ./.\n")
    assert detag_brown(raw) == ('The jury said "no evidence" was found. It wasn\'t, he said '
                                "(twice).\n\nNew paragraph; Atlanta's mayor.")
    lines = ["CHAPTER I", "", "", "It is a truth universally", "acknowledged, that a single",
             "man.  ", "", "Next paragraph."]
    assert unwrap_paragraphs(lines) == ("CHAPTER I\n\nIt is a truth universally acknowledged, "
                                        "that a single man.\n\nNext paragraph.")


def test_training_sentences_are_short():
    from megatron_tw.data.preprocess.spm_trainer import iter_training_sentences

    long_line = " ".join(f"Sentence number {i} is here." for i in range(200))
    text = f"Title\n\n{long_line}\n" + "x" * 2500
    pieces = list(iter_training_sentences([text], max_chars=1000))
    assert all(0 < len(p) <= 1000 for p in pieces)
    assert pieces[0] == "Title" and pieces[1] == "Sentence number 0 is here."
    assert "".join(pieces[-3:]) == "x" * 2500


@pytest.fixture
def fake_sources():
    """Register two offline sources (one can be told to fail); unregister afterwards."""
    from megatron_tw.data.preprocess.sources import SOURCES, Document, SourceError, Source

    calls = {"books": 0, "flaky": 0}
    state = {"fail": False}

    def books(downloads):
        calls["books"] += 1
        return [Document(f"Text of book {i}.\n\nSecond paragraph.", "books", f"Book {i}")
                for i in range(4)]

    def flaky(downloads):
        calls["flaky"] += 1
        if state["fail"]:
            raise SourceError("`npm pack flaky@1.0` failed: registry unreachable")
        return [Document("A flaky document.", "flaky", "Flaky")]

    SOURCES["test-books"] = Source("test-books", "four books", books, default=False)
    SOURCES["test-flaky"] = Source("test-flaky", "sometimes fails", flaky, default=False)
    yield calls, state
    del SOURCES["test-books"], SOURCES["test-flaky"]


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_corpus_split_by_document_and_cached(fake_sources, tmp_path):
    from megatron_tw.data.corpus import build_corpus

    calls, _ = fake_sources
    logs = []
    result = build_corpus(tmp_path, ["test-books", "test-flaky"], ("Book 2",), log=logs.append)
    train, heldout = _read(result.train_path), _read(result.heldout_path)
    assert [d["title"] for d in heldout] == ["Book 2"]
    assert [d["title"] for d in train] == ["Book 0", "Book 1", "Book 3", "Flaky"]
    assert set(train[0]) == {"text", "source", "title"}
    assert result.counts["train"]["documents"] == 4 and not result.cached

    before = {p: p.read_bytes() for p in (result.train_path, result.heldout_path)}
    again = build_corpus(tmp_path, ["test-books", "test-flaky"], ("Book 2",), log=logs.append)
    assert again.cached and calls == {"books": 1, "flaky": 1}  # nothing fetched again
    assert {p: p.read_bytes() for p in before} == before


def test_failing_source_stops_unless_allowed(fake_sources, tmp_path):
    from megatron_tw.data.corpus import CorpusError, build_corpus

    calls, state = fake_sources
    state["fail"] = True
    with pytest.raises(CorpusError, match=r"source 'test-flaky' failed: `npm pack flaky@1.0`"
                                          r"(.|\n)*--allow-missing-sources"):
        build_corpus(tmp_path / "a", ["test-books", "test-flaky"], ("Book 1",), log=print)
    assert not (tmp_path / "a" / "train.jsonl").exists()

    logs = []
    result = build_corpus(tmp_path / "b", ["test-books", "test-flaky"], ("Book 1",),
                          allow_missing=True, log=logs.append)
    assert list(result.failed) == ["test-flaky"] and result.sources == ["test-books"]
    assert any("WARNING" in line and "test-flaky" in line for line in logs)
    assert "MISSING source test-flaky" in result.format()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "test-flaky" in manifest["failed"]
    with pytest.raises(CorpusError, match="unknown source"):
        build_corpus(tmp_path / "c", ["no-such-source"], log=print)
