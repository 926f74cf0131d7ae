"""Long-document sampling: BOS + one window of one document, never crossing documents.

Documents are written with megatron's IndexedDatasetBuilder with tokens that encode
(document, position), so the reference windows are computed from the definition in the
module docstring with plain Python.
"""

import argparse
import pickle
from collections import Counter

import numpy
import pytest
import torch

pytestmark = pytest.mark.unit

BOS = 1
SEQ = 8


def doc_tokens(d: int, length: int) -> list[int]:
    return [10 + 100_000 * d + p for p in range(length)]


def write_dataset(prefix, lengths, leading_bos=()):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    docs = []
    for d, length in enumerate(lengths):
        tokens = doc_tokens(d, length)
        if d in leading_bos:
            tokens = [BOS] + tokens
        docs.append(doc_tokens(d, length))
        builder.add_document(numpy.array(tokens, dtype=numpy.int32), [len(tokens)])
    builder.finalize(f"{prefix}.idx")
    return docs


def reference_windows(docs, seq, min_len, documents):
    """(doc, offset) of every window, from the definition: offsets j*(s-1), need o+s <= L."""
    out = []
    for d in documents:
        length = len(docs[d])
        if length < max(min_len, seq):
            continue
        o = 0
        while o + seq <= length:
            out.append((d, o))
            o += seq - 1
    return out


def decode_window(sample):
    """Recover (doc, offset) from the token values; check it is one run of one document."""
    labels = sample["labels"].tolist()
    d, o = (labels[0] - 10) // 100_000, (labels[0] - 10) % 100_000
    assert labels == doc_tokens(d, o + len(labels))[o:], "labels cross a document or skip"
    return d, o


LENGTHS = [5, 8, 9, 15, 22, 7, 28, 14, 40, 3]  # 10 documents: some < SEQ, some L % (SEQ-1) == 0


def build(tmp_path, **kw):
    from megatron_tw.data.long_document import build_long_document_datasets

    tmp_path.mkdir(parents=True, exist_ok=True)
    prefix = tmp_path / "docs"
    docs = write_dataset(prefix, kw.pop("lengths", LENGTHS), kw.pop("leading_bos", ()))
    args = dict(seq_length=SEQ, bos_id=BOS, min_document_length=0, split="8,2,0",
                num_samples=None, seed=1234)
    args.update(kw)
    return docs, build_long_document_datasets(str(prefix), **args)


@pytest.mark.parametrize("min_len", [0, 16, 25])
def test_windows_start_with_bos_and_stay_in_one_document(tmp_path, min_len):
    docs, (train, valid, test) = build(tmp_path, min_document_length=min_len)
    assert test is None
    for dataset, documents in ((train, range(0, 8)), (valid, range(8, 10))):
        expected = reference_windows(docs, SEQ, min_len, documents)
        seen = []
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample["tokens"][0].item() == BOS
            d, o = decode_window(sample)
            assert o % (SEQ - 1) == 0                      # a window boundary
            assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
            assert len(docs[d]) >= max(min_len, SEQ)       # minimum length respected
            seen.append((d, o))
        assert sorted(seen) == sorted(expected)            # one epoch: each window once


def test_sample_layout_matches_gpt_dataset(tmp_path):
    """Same keys, dtypes and shapes as megatron.core's GPTDataset, plus sample_id."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_tw.data.preprocess.tokenizer import build_tokenizer, tokenizer_namespace

    tokenizer = build_tokenizer(tokenizer_namespace(tokenizer_type="NullTokenizer",
                                                    vocab_size=5_000_000))
    for create_mask in (True, False):
        _, (train, _, _) = build(tmp_path, create_attention_mask=create_mask)
        config = GPTDatasetConfig(
            random_seed=1, sequence_length=SEQ, blend=([str(tmp_path / "docs")], None),
            split="1,0,0", tokenizer=tokenizer, reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=create_mask,
            path_to_cache=str(tmp_path / f"cache{create_mask}"))
        gpt = BlendedMegatronDatasetBuilder(GPTDataset, [4, None, None], lambda: True,
                                            config).build()[0]
        ours, theirs = train[0], gpt[0]
        assert list(ours) == list(theirs) + ["sample_id"]
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype, key
            assert ours[key].shape == theirs[key].shape, key
            if key in ("attention_mask", "position_ids"):
                assert torch.equal(ours[key], theirs[key]), key
        assert ours["loss_mask"].tolist() == [1.0] * SEQ
        assert ours["sample_id"].dtype == torch.int64 and ours["sample_id"].dim() == 0


def test_sample_id_is_the_global_window_index(tmp_path):
    docs, (train, valid, _) = build(tmp_path, num_samples=[50, 7, 0])
    all_windows = reference_windows(docs, SEQ, 0, range(len(docs)))
    for dataset in (train, valid):
        for i in range(len(dataset)):
            sample = dataset[i]
            assert all_windows[sample["sample_id"].item()] == decode_window(sample)
    # independent of seed and split
    _, (other, _, _) = build(tmp_path / "x", seed=99, split="1,0,0", num_samples=None)
    ids = {other[i]["sample_id"].item(): decode_window(other[i]) for i in range(len(other))}
    assert ids == dict(enumerate(all_windows))


def test_epochs_repeat_and_seed_shuffles(tmp_path):
    docs = write_dataset(tmp_path / "probe", LENGTHS)
    n = len(reference_windows(docs, SEQ, 0, range(len(docs))))
    total = 3 * n + 5
    _, (train, _, _) = build(tmp_path, num_samples=[total, 0, 0], split="1,0,0")
    assert len(train) == total
    order = [train[i]["sample_id"].item() for i in range(total)]
    for epoch in range(3):  # every window exactly once per full epoch
        assert sorted(order[n * epoch:n * (epoch + 1)]) == list(range(n))
    assert len(set(order[3 * n:])) == 5
    assert order[:n] != order[n:2 * n]  # each epoch is a new permutation
    _, (same, _, _) = build(tmp_path / "a", num_samples=[total, 0, 0], split="1,0,0")
    _, (other, _, _) = build(tmp_path / "b", num_samples=[total, 0, 0], split="1,0,0", seed=7)
    assert [same[i]["sample_id"].item() for i in range(total)] == order
    other_order = [other[i]["sample_id"].item() for i in range(total)]
    assert other_order != order and Counter(other_order[:3 * n]) == Counter(order[:3 * n])


def test_leading_bos_is_not_doubled(tmp_path):
    docs, (train, _, _) = build(tmp_path, leading_bos=set(range(10)), split="1,0,0")
    expected = reference_windows(docs, SEQ, 0, range(10))
    seen = sorted(decode_window(train[i]) for i in range(len(train)))
    assert seen == sorted(expected)
    assert all(train[i]["tokens"][1].item() != BOS for i in range(len(train)))


def test_no_training_windows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--tw-min-document-length 1000"):
        build(tmp_path, min_document_length=1000)


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    _, (train, _, _) = build(tmp_path)
    clone = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 20_000  # the tokens are not pickled
    for i in range(len(train)):
        assert all(torch.equal(train[i][k], clone[i][k]) for k in train[i])
    padding = train[None]  # GPTDataset's padding sample: zero loss mask
    assert padding["loss_mask"].sum().item() == 0.0


def test_data_args():
    from megatron_tw.data.arguments import add_data_args, validate_data_args

    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--tw-long-document-sampling", "--tw-min-document-length", "64"])
    assert args.tw_long_document_sampling and args.tw_min_document_length == 64
    args.data_path = ["data/demo/train_text_document"]
    validate_data_args(args)
    default = parser.parse_args([])
    assert not default.tw_long_document_sampling and default.tw_min_document_length is None
    with pytest.raises(ValueError, match="--tw-long-document-sampling"):
        validate_data_args(parser.parse_args(["--tw-min-document-length", "5"]))
    args.data_path = ["0.5", "a", "0.5", "b"]
    with pytest.raises(ValueError, match="one --data-path prefix"):
        validate_data_args(args)


def test_lead_token_for_tokenizers_without_bos():
    """--tw-lead-token-id names the token windows start with when the tokenizer has no BOS (as
    Qwen2's); without it such a tokenizer gets one line naming the flag."""
    import argparse
    import types

    from megatron_tw.data.provider import lead_token

    class NoBos:
        vocab_size = 100

        @property
        def bos(self):
            raise NotImplementedError

    with pytest.raises(SystemExit, match="--tw-lead-token-id ID"):
        lead_token(argparse.Namespace(tw_lead_token_id=None), NoBos())
    assert lead_token(argparse.Namespace(tw_lead_token_id=7), NoBos()) == 7
    with pytest.raises(SystemExit, match="outside the tokenizer's vocabulary"):
        lead_token(argparse.Namespace(tw_lead_token_id=100), NoBos())
    with_bos = types.SimpleNamespace(bos=1, vocab_size=100)
    assert lead_token(argparse.Namespace(tw_lead_token_id=None), with_bos) == 1


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    """Data tokenized with a larger tokenizer: one line naming the .bin, the id and the fix."""
    from megatron_tw.data.checks import check_token_ids, data_prefixes, max_token_id
    from tests.launch import write_random_corpus

    ok = write_random_corpus(tmp_path / "ok", n_docs=20, vocab=128)
    big = write_random_corpus(tmp_path / "big", n_docs=20, vocab=300)
    assert max_token_id(ok) == 127 and max_token_id(big) == 299
    check_token_ids([ok], 128)
    with pytest.raises(ValueError, match=r"big\.bin holds token id 299, but the model's "
                                         r"vocabulary has 128 entries.*preprocess_data\.py"):
        check_token_ids(data_prefixes(([ok, big], None), None), 128)
