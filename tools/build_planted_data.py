"""Build a document set with planted long-range key-value records (megatron_tw/data/planted.py).

    python tools/build_planted_data.py --source data/demo/train_text_document \
        --tokenizer-model data/demo/tokenizer/tokenizer.model --out data/planted/extend \
        --length 1024 --records 3 --value-length 8 --min-distance 320 --max-distance 900 \
        --num-docs 2000 --seed 1

writes ``OUT.bin/.idx`` (one document of exactly --length tokens each, for
``--tw-long-document-sampling --seq-length LENGTH``) and ``OUT_plants.npz`` (where every record
is, its key and values, the marker and the alphabet).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tw.data.planted import (  # noqa: E402
    PlantLayout,
    choose_alphabet,
    document_bounds,
    drill_layout,
    mix_documents,
    mix_order,
    mix_tables,
    natural_chunks,
    plant_documents,
    random_chunks,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="natural text: an IndexedDataset prefix")
    p.add_argument("--tokenizer-model", required=True, help="its SentencePiece model")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--length", type=int, required=True, help="tokens per document")
    p.add_argument("--records", type=int, default=3, help="records per planted document")
    p.add_argument("--value-length", type=int, default=8, help="value tokens per record")
    p.add_argument("--min-distance", type=int, required=True)
    p.add_argument("--max-distance", type=int, required=True)
    p.add_argument("--near-share", type=float, default=0.0,
                   help="this share of the records recur at most --near-max-distance tokens "
                        "later, the others further (default 0: uniform over the whole range)")
    p.add_argument("--near-max-distance", type=int, default=0,
                   help="the near records' largest distance, with --near-share")
    p.add_argument("--planted-share", type=float, default=1.0,
                   help="fraction of documents with records")
    p.add_argument("--num-docs", type=int, required=True)
    p.add_argument("--skip-docs", type=int, default=0,
                   help="natural chunks to skip first (another part of the text)")
    p.add_argument("--alphabet-size", type=int, default=128)
    p.add_argument("--random-filler", action="store_true",
                   help="fill the documents around the records with random alphabet tokens "
                        "instead of natural text (a synthetic copying task)")
    p.add_argument("--drill-share", type=float, default=0.0,
                   help="this share of the documents are drills instead (one record filling the "
                        "document, recurring after half of it; data/planted.py drill_layout), "
                        "shuffled among the others; the plant table lists the records of both when "
                        "they have one value length (else it holds no records)")
    p.add_argument("--drill-records", type=int, default=None,
                   help="records per drill document (default 1)")
    p.add_argument("--drill-value-length", type=int, default=None,
                   help="a drill record's value tokens (default: length/4 - 2)")
    p.add_argument("--drill-min-distance", type=int, default=None,
                   help="default: length/4")
    p.add_argument("--drill-max-distance", type=int, default=None,
                   help="default: 3 length/4")
    p.add_argument("--drill-filler", choices=("natural", "random"), default="natural",
                   help="what fills a drill document around its record: natural text, or random "
                        "alphabet tokens (the synthetic copying task, which keeps rewarding a copy "
                        "mechanism while the rest of the documents are natural text)")
    p.add_argument("--seed", type=int, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.drill_share < 1.0:
        raise SystemExit(f"build_planted_data.py: error: --drill-share must be in [0, 1), got "
                         f"{args.drill_share}")
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tw.data.preprocess.writer import AtomicDatasetWriter, token_dtype

    layout = PlantLayout(length=args.length, records=args.records,
                         value_length=args.value_length, min_distance=args.min_distance,
                         max_distance=args.max_distance, planted_share=args.planted_share,
                         near_share=args.near_share, near_max_distance=args.near_max_distance)
    try:
        layout.validate()
    except ValueError as err:
        raise SystemExit(f"build_planted_data.py: error: {err}")
    sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    source = IndexedDataset(args.source, mmap=True)
    tokens = numpy.memmap(args.source + ".bin", dtype=source.index.dtype, mode="r")
    scores = [sp.get_score(i) for i in range(len(pieces))]
    marker, alphabet = choose_alphabet(pieces, scores, args.alphabet_size)
    bounds = document_bounds(source.sequence_lengths, source.document_indices)
    chunks = natural_chunks(tokens, bounds, args.length)
    if args.random_filler:
        chunks = random_chunks(alphabet, args.length, [args.seed, 7])
    for _ in range(args.skip_docs):
        next(chunks, None)
    drills = int(round(args.drill_share * args.num_docs))
    default = drill_layout(args.length)
    drill = dataclasses.replace(default, **{
        name: value for name, value in (("records", args.drill_records),
                                        ("value_length", args.drill_value_length),
                                        ("min_distance", args.drill_min_distance),
                                        ("max_distance", args.drill_max_distance))
        if value is not None})
    try:
        drill.validate()
    except ValueError as err:
        raise SystemExit(f"build_planted_data.py: error: the drill layout (--drill-*): {err}")
    try:
        docs, table = plant_documents(chunks, args.num_docs - drills, layout, marker=marker,
                                      alphabet=alphabet, seed=args.seed)
        if drills:
            if args.drill_filler == "random":
                chunks = random_chunks(alphabet, args.length, [args.seed, 8])
            drill_docs, drill_table = plant_documents(chunks, drills, drill,
                                            marker=marker, alphabet=alphabet, seed=args.seed + 1)
    except ValueError as err:
        raise SystemExit(f"build_planted_data.py: error: {args.source}: {err}")
    drill_index = numpy.zeros(0, dtype=numpy.int64)
    if drills:
        parts = [docs, drill_docs]
        docs = mix_documents(parts, seed=args.seed)
        drill_index = numpy.flatnonzero(mix_order(len(docs), args.seed) >= len(parts[0]))
        if drill.value_length == layout.value_length:
            table = mix_tables([table, drill_table], [len(parts[0]), drills], seed=args.seed)
        else:  # one table holds one value length: a set for training only
            table = None
    writer = AtomicDatasetWriter(args.out, token_dtype(len(pieces)))
    try:
        for doc in docs:
            writer.add(doc)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    meta = dict(marker=marker, alphabet=numpy.asarray(alphabet), length=args.length,
                seed=args.seed, drill_docs=drill_index)
    if table is not None:
        table.save(args.out + "_plants.npz", **meta)
    else:
        numpy.savez(args.out + "_plants.npz", drills=drills, **meta)
    records = "no plant table" if table is None else f"{len(table.doc)} records"
    print(f"{args.out}: {len(docs)} documents x {args.length} tokens ({drills} drills), {records} "
          f"(marker {pieces[marker]!r}, alphabet of {len(alphabet)} words from "
          f"{pieces[alphabet[0]]!r} to {pieces[alphabet[-1]]!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
