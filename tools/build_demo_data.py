#!/usr/bin/env python
"""Build the demo data set: fetch the corpus -> train a tokenizer -> preprocess both splits.

    python tools/build_demo_data.py --out data/demo

Outputs (all under --out):
  tokenizer/tokenizer.model          SentencePiece BPE, byte fallback, vocab 8000
  train_text_document.{bin,idx}      megatron IndexedDataset of the training documents
  heldout_text_document.{bin,idx}    the held-out documents (Austen's Persuasion)
  train.jsonl, heldout.jsonl         the documents as text
  summary.json                       documents, tokens and paths, for scripts
Idempotent: every step is skipped when its output is up to date (the corpus is cached, the
tokenizer and datasets carry a hash of their inputs), so a second run does no network work
and rewrites nothing. Needs `npm`, `apt-get` and `dpkg-deb` (a Debian machine, as root).
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_tw.data.corpus import DEFAULT_HELDOUT, CorpusError, build_corpus  # noqa: E402
from megatron_tw.data.preprocess.sources import default_sources  # noqa: E402
from megatron_tw.data.preprocess.spm_trainer import train_sentencepiece  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument("--sources", nargs="+", default=default_sources(),
                        help="corpus sources (see tools/fetch_corpus.py --help)")
    parser.add_argument("--heldout", nargs="+", default=list(DEFAULT_HELDOUT),
                        help="titles of the held-out documents")
    parser.add_argument("--allow-missing-sources", action="store_true",
                        help="go on without a source that fails (reported), instead of stopping")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="tokenizer processes for preprocessing")
    return parser.parse_args(argv)


def _stamp(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def preprocess_split(jsonl: Path, prefix: Path, model: Path, workers: int) -> dict:
    """Tokenize one split unless its stamp (input, tokenizer, options) is unchanged."""
    final = Path(f"{prefix}_text_document")  # Megatron-LM's <prefix>_<key>_document
    stamp_path = final.with_name(final.name + ".stamp")
    stamp = _stamp(jsonl, model, "append_eod=True", "SentencePieceTokenizer")
    if stamp_path.exists() and final.with_suffix(".idx").exists():
        recorded = json.loads(stamp_path.read_text())
        if recorded["stamp"] == stamp:
            return {**recorded["summary"], "cached": True}
    # Imported only when there is work: megatron and torch take seconds to import.
    from megatron_tw.data.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_tw.data.preprocess.tokenizer import tokenizer_namespace
    tokenizer_args = tokenizer_namespace(tokenizer_type="SentencePieceTokenizer",
                                         tokenizer_model=str(model))
    summary = preprocess(PreprocessConfig(
        inputs=[str(jsonl)], output_prefix=str(prefix), tokenizer_args=tokenizer_args,
        append_eod=True, workers=workers, log_interval=200))
    result = {"documents": summary.documents["text"], "tokens": summary.tokens["text"],
              "seconds": round(summary.seconds, 1), "prefix": str(final)}
    stamp_path.write_text(json.dumps({"stamp": stamp, "summary": result}))
    return {**result, "cached": False}


def main(argv=None) -> int:
    args = get_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    print(f"[1/3] corpus -> {out}", flush=True)
    try:
        corpus = build_corpus(out, args.sources, tuple(args.heldout), args.allow_missing_sources)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(corpus.format(), flush=True)

    print(f"[2/3] tokenizer -> {out / 'tokenizer'}", flush=True)
    t0 = time.perf_counter()
    model, trained = train_sentencepiece([str(corpus.train_path)], out / "tokenizer",
                                         vocab_size=args.vocab_size)
    state = f"trained in {time.perf_counter() - t0:.1f} s" if trained else "up to date"
    print(f"  {model} ({state})", flush=True)

    print("[3/3] preprocess (SentencePieceTokenizer, --append-eod)", flush=True)
    splits = {}
    for name, jsonl in (("train", corpus.train_path), ("heldout", corpus.heldout_path)):
        splits[name] = preprocess_split(jsonl, out / name, model, args.workers)
        s = splits[name]
        print(f"  {name}: {s['documents']} documents, {s['tokens']} tokens"
              f"{' (up to date)' if s['cached'] else ', %.1f s' % s['seconds']} -> "
              f"{s['prefix']}.bin/.idx", flush=True)

    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    summary = {
        "tokenizer_model": str(model), "tokenizer_type": "SentencePieceTokenizer",
        "vocab_size": processor.get_piece_size(), "bos_id": processor.bos_id(),
        "eod_id": processor.eos_id(),
        "train_prefix": splits["train"]["prefix"], "heldout_prefix": splits["heldout"]["prefix"],
        "train_documents": splits["train"]["documents"], "train_tokens": splits["train"]["tokens"],
        "heldout_documents": splits["heldout"]["documents"],
        "heldout_tokens": splits["heldout"]["tokens"], "heldout_titles": corpus.heldout_titles,
        "heldout_jsonl": str(corpus.heldout_path), "sources": corpus.sources,
        "missing_sources": corpus.failed,
    }
    summary_text = json.dumps(summary, indent=1)
    summary_path = out / "summary.json"
    if not summary_path.exists() or summary_path.read_text() != summary_text:
        summary_path.write_text(summary_text)
    print(f"done in {time.perf_counter() - start:.1f} s. Use:\n"
          f"  --tokenizer-type SentencePieceTokenizer --tokenizer-model {model}\n"
          f"  --data-path {splits['train']['prefix']}\n"
          f"  held-out: {splits['heldout']['prefix']} and {corpus.heldout_path}\n"
          f"  summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
