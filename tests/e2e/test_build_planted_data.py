"""tools/build_planted_data.py as the study runs it: a set with drills mixed in, its plant
table checked against the written documents, and a bad flag as one line."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A SentencePiece BPE model with a few hundred whole-word pieces (choose_alphabet needs
    200 + alphabet + 1) and a natural-text IndexedDataset of 60 documents in it."""
    import sentencepiece

    from megatron_tw.data.preprocess.writer import AtomicDatasetWriter, token_dtype

    root = tmp_path_factory.mktemp("planted")
    rng = numpy.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = sorted({"".join(rng.choice(letters, size=rng.integers(5, 8))) for _ in range(400)})
    text = [" ".join(rng.choice(words, size=40)) + "." for _ in range(600)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model,
                                             vocab_size=1000, model_type="bpe", num_threads=1,
                                             minloglevel=2)
    (root / "tok.model").write_bytes(model.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    writer = AtomicDatasetWriter(str(root / "text"), token_dtype(sp.get_piece_size()))
    for i in range(60):
        writer.add(numpy.asarray(sp.encode(" ".join(text[10 * i:10 * i + 10]))))
    writer.commit()
    return root


def _build(corpus, out, *flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_planted_data.py"), "--source",
         str(corpus / "text"), "--tokenizer-model", str(corpus / "tok.model"), "--out", str(out),
         "--length", "128", "--records", "2", "--value-length", "5", "--alphabet-size", "16",
         "--min-distance", "7", "--max-distance", "100", "--num-docs", "40", "--seed", "3",
         *flags], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_mixed_set_table_lists_every_record_where_it_was_written(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tw.data.planted import PlantTable

    proc = _build(corpus, tmp_path / "mixed", "--drill-share", "0.25", "--drill-filler",
                  "random", "--drill-records", "3", "--drill-value-length", "5",
                  "--drill-min-distance", "7", "--drill-max-distance", "100")
    assert proc.returncode == 0, proc.stderr
    assert "40 documents x 128 tokens (10 drills), 90 records" in proc.stdout
    ds = IndexedDataset(str(tmp_path / "mixed"))
    docs = numpy.stack([ds[i] for i in range(len(ds))]).astype(numpy.int64)
    table = PlantTable.load(str(tmp_path / "mixed_plants.npz"))
    with numpy.load(tmp_path / "mixed_plants.npz") as z:
        marker, alphabet, drill_docs = int(z["marker"]), set(z["alphabet"].tolist()), z["drill_docs"]
    assert len(table.doc) == 30 * 2 + 10 * 3 and len(drill_docs) == 10
    for doc, key, first, recur, values in zip(table.doc, table.key, table.first, table.recur,
                                              table.values):
        assert docs[doc, first:first + 7].tolist() == [marker, key, *values]
        assert docs[doc, recur:recur + 7].tolist() == [marker, key, *values]
    counts = numpy.bincount(table.doc, minlength=40)
    is_drill = numpy.zeros(40, bool)
    is_drill[drill_docs] = True
    assert (counts[is_drill] == 3).all() and (counts[~is_drill] == 2).all()
    # a drill's filler is alphabet words; a natural document's is mostly other text
    assert all(set(docs[d].tolist()) <= alphabet | {marker} for d in drill_docs)
    assert all(len(set(docs[d].tolist()) - alphabet - {marker}) > 20
               for d in numpy.flatnonzero(~is_drill))


def test_mixed_value_lengths_write_no_table_and_bad_share_is_one_line(corpus, tmp_path):
    proc = _build(corpus, tmp_path / "train", "--drill-share", "0.5", "--drill-filler", "random")
    assert proc.returncode == 0, proc.stderr
    assert "(20 drills), no plant table" in proc.stdout
    with numpy.load(tmp_path / "train_plants.npz") as z:
        assert "doc" not in z.files and int(z["drills"]) == 20 and len(z["drill_docs"]) == 20
    bad = _build(corpus, tmp_path / "bad", "--drill-share", "1.5")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "build_planted_data.py: error: --drill-share must be in [0, 1), got 1.5"]
    assert not (tmp_path / "bad.bin").exists()
