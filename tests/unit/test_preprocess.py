"""preprocess(): token round trip, ids equal to training's tokenizer, megatron reads the output.

References are independent of the code under test: the ``sentencepiece`` processor and the
``tokenizers`` object used directly, the tokenizer megatron.training builds from its own
argument parser, and megatron.core's IndexedDataset/GPTDataset reading the files.
"""

import argparse
import json

import numpy
import pytest

pytestmark = pytest.mark.unit

WORDS = ("the whale ship sea captain long voyage harbour morning letter sister house garden "
         "road river evening quiet storm sail rope deck island").split()

# Documents with what a lossless tokenizer must keep: newlines, runs of spaces, tabs,
# non-ASCII letters, characters outside any small vocabulary (byte fallback), leading and
# trailing whitespace.
DOCUMENTS = [
    "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014I went to sea.",
    "CHAPTER 1\n\nIt is a truth universally acknowledged.\n\n\n  Indented  line\twith tab.\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u6f22\u5b57 and an emoji \U0001f40b at the end ",
    " leading space, digits 1790 and 2021; \"quotes\" and 'apostrophes'.",
]


def make_text(n_sentences: int, seed: int = 0) -> list[str]:
    rng = numpy.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))).capitalize() + "."
            for _ in range(n_sentences)]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "source": "test"}) + "\n")
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece BPE model trained by the project's trainer."""
    from megatron_tw.data.preprocess.spm_trainer import train_sentencepiece

    root = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(root / "corpus.jsonl", make_text(400) + DOCUMENTS[:2])
    model, trained = train_sentencepiece([str(corpus)], root / "tok", vocab_size=400,
                                         num_threads=1)
    assert trained
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A byte-level BPE built offline with `tokenizers`, saved as a HuggingFace folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_text(400), trainer)
    folder = tmp_path_factory.mktemp("hf") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def training_tokenizer(tokenizer_type, model):
    """The tokenizer megatron.training builds: its own argument group, its build function."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import _add_tokenizer_args

    parser = _add_tokenizer_args(argparse.ArgumentParser())
    args = parser.parse_args(["--tokenizer-type", tokenizer_type, "--tokenizer-model",
                              str(model)])
    args.pad_vocab_size = False
    return build_tokenizer(args)


def run_preprocess(inputs, prefix, tokenizer_type, model, **kw):
    from megatron_tw.data.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_tw.data.preprocess.tokenizer import tokenizer_namespace

    args = tokenizer_namespace(tokenizer_type=tokenizer_type, tokenizer_model=str(model))
    return preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix),
                                       tokenizer_args=args, progress=False, **kw))


def read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].astype(numpy.int64).tolist() for i in range(len(ds))], ds


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_round_trip_and_ids_equal_training_tokenizer(kind, sp_model, hf_folder, tmp_path):
    if kind == "sentencepiece":
        import sentencepiece

        tokenizer_type, model = "SentencePieceTokenizer", sp_model
        reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
        ref_encode, ref_decode, ref_eod = reference.encode, reference.decode, reference.eos_id()
    else:
        from tokenizers import Tokenizer

        tokenizer_type, model = "HuggingFaceTokenizer", hf_folder
        reference = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
        ref_encode = lambda t: reference.encode(t).ids  # noqa: E731
        ref_decode = reference.decode
        ref_eod = reference.token_to_id("<|endoftext|>")

    inp = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    summary = run_preprocess([inp], tmp_path / "out", tokenizer_type, model, append_eod=True)
    docs, ds = read_documents(tmp_path / "out_text_document")

    assert len(docs) == len(DOCUMENTS) == summary.documents["text"]
    assert summary.tokens["text"] == sum(map(len, docs))
    assert ds.index.dtype == numpy.uint16  # Megatron-LM's choice for a small vocabulary
    training = training_tokenizer(tokenizer_type, model)
    for text, ids in zip(DOCUMENTS, docs):
        assert ids[-1] == ref_eod == training.eod
        assert ids[:-1] == ref_encode(text)            # the library itself
        assert ids[:-1] == training.tokenize(text)     # what the training run produces
        assert ref_decode(ids[:-1]) == text            # lossless round trip
        assert training.detokenize(ids[:-1]) == text


def test_workers_output_is_byte_identical(sp_model, tmp_path):
    texts = make_text(300, seed=1)
    docs = [" ".join(texts[i:i + 3]) for i in range(0, 300, 3)] + DOCUMENTS
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    run_preprocess([inp], tmp_path / "w1", "SentencePieceTokenizer", sp_model, workers=1)
    run_preprocess([inp], tmp_path / "w2", "SentencePieceTokenizer", sp_model, workers=2,
                   chunksize=3)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        two = (tmp_path / f"w2_text_document{suffix}").read_bytes()
        assert len(one) > 0 and one == two


def test_text_files_folder_and_multiple_keys(sp_model, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(DOCUMENTS[1], encoding="utf-8")
    (folder / "sub" / "a.txt").write_text(DOCUMENTS[0], encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read", encoding="utf-8")
    run_preprocess([folder], tmp_path / "txt", "SentencePieceTokenizer", sp_model)
    docs, _ = read_documents(tmp_path / "txt_text_document")
    # sorted path order: b.txt < sub/a.txt; one document per file, content kept exactly
    assert docs == [sp.encode(DOCUMENTS[1]), sp.encode(DOCUMENTS[0])]

    with open(tmp_path / "two.jsonl", "w") as f:
        for a, b in zip(DOCUMENTS, reversed(DOCUMENTS)):
            f.write(json.dumps({"text": a, "title": b}) + "\n")
    summary = run_preprocess([tmp_path / "two.jsonl"], tmp_path / "k", "SentencePieceTokenizer",
                             sp_model, json_keys=["text", "title"])
    assert read_documents(tmp_path / "k_text_document")[0] == [sp.encode(t) for t in DOCUMENTS]
    assert read_documents(tmp_path / "k_title_document")[0] == \
        [sp.encode(t) for t in reversed(DOCUMENTS)]
    assert set(summary.outputs) == {"text", "title"}


def test_gpt_dataset_reads_the_output(sp_model, tmp_path):
    """megatron.core's GPTDataset packs the documents: sample i is tokens [i*s, i*s+s] of
    the document stream in its document order (reference written from that definition)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    texts = make_text(200, seed=2)
    inp = write_jsonl(tmp_path / "docs.jsonl", [" ".join(texts[i:i + 4])
                                                for i in range(0, 200, 4)])
    run_preprocess([inp], tmp_path / "g", "SentencePieceTokenizer", sp_model, append_eod=True)
    docs, _ = read_documents(tmp_path / "g_text_document")
    tokenizer = training_tokenizer("SentencePieceTokenizer", sp_model)
    seq = 32
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([str(tmp_path / "g_text_document")], None),
        split="1,0,0", tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
        create_attention_mask=False)
    num = sum(map(len, docs)) // seq - 1
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [num, None, None], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= num
    stream = numpy.concatenate([docs[d] for d in train.document_index])
    for i in numpy.random.default_rng(0).choice(len(train), size=8, replace=False):
        sample = train[int(i)]
        # the sample index is shuffled: find the unshuffled position it came from
        j = int(train.shuffle_index[i])
        assert sample["tokens"].tolist() == stream[j * seq:(j + 1) * seq].tolist()
        assert sample["labels"].tolist() == stream[j * seq + 1:(j + 1) * seq + 1].tolist()
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
