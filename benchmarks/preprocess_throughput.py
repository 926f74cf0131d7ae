#!/usr/bin/env python
"""Preprocessing throughput (MB/s per worker) on the built-in corpus.

    python benchmarks/preprocess_throughput.py            # needs tools/build_demo_data.py first
    python benchmarks/preprocess_throughput.py --limit-mb 8 --workers 1 2

The goal is "not slower than Megatron-LM's tools/preprocess_data.py". That script is not
shipped in the megatron-core wheel, so the baseline here is the loop it runs per document,
written out in one process: json.loads -> tokenizer.tokenize -> append EOD ->
IndexedDatasetBuilder.add_document, with the same megatron tokenizer and builder. Its
output must equal ours byte for byte (checked), so both do the same work.
Numbers on a shared machine are noisy: each configuration runs --repeats times, best kept.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_tw.data.preprocess.pipeline import PreprocessConfig, preprocess  # noqa: E402
from megatron_tw.data.preprocess.tokenizer import (  # noqa: E402
    build_tokenizer,
    tokenizer_namespace,
)
from megatron_tw.data.preprocess.writer import token_dtype  # noqa: E402


def baseline(jsonl: Path, prefix: str, tokenizer_args) -> float:
    """Megatron-LM's per-document work, single process, no pool. Returns seconds."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = build_tokenizer(tokenizer_args)
    start = time.perf_counter()  # as preprocess(): tokenizer loading not timed
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(tokenizer.vocab_size))
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer.tokenize(json.loads(line)["text"])
            if ids:
                ids.append(tokenizer.eod)
                builder.add_document(numpy.array(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return time.perf_counter() - start


def subset(src: Path, dst: Path, limit_mb: float) -> int:
    """The first lines of src up to limit_mb (whole documents); returns bytes."""
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            if limit_mb and size + len(line) > limit_mb * 1e6 and size:
                break
            fout.write(line)
            size += len(line)
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="data/demo/train.jsonl")
    parser.add_argument("--tokenizer-model", default="data/demo/tokenizer/tokenizer.model")
    parser.add_argument("--limit-mb", type=float, default=8.0, help="0: the whole input")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results-file", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    for path in (args.input, args.tokenizer_model):
        if not os.path.exists(path):
            print(f"error: {path} not found; run python tools/build_demo_data.py --out data/demo",
                  file=sys.stderr)
            return 1
    tok_args = tokenizer_namespace(tokenizer_type="SentencePieceTokenizer",
                                   tokenizer_model=args.tokenizer_model)
    results = {"cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.jsonl"
        mb = subset(Path(args.input), data, args.limit_mb) / 1e6
        print(f"input: {mb:.1f} MB of {args.input}; tokenizer {args.tokenizer_model}; "
              f"{os.cpu_count()} CPUs")
        seconds = min(baseline(data, f"{tmp}/base", tok_args) for _ in range(args.repeats))
        results["runs"].append({"name": "baseline (Megatron-LM loop, 1 process)", "workers": 1,
                                "seconds": seconds, "mb_per_s": mb / seconds})
        for workers in args.workers:
            best = min(preprocess(PreprocessConfig(
                inputs=[str(data)], output_prefix=f"{tmp}/ours{workers}", tokenizer_args=tok_args,
                append_eod=True, workers=workers, progress=False)).seconds
                for _ in range(args.repeats))
            results["runs"].append({"name": f"tools/preprocess_data.py --workers {workers}",
                                    "workers": workers, "seconds": best, "mb_per_s": mb / best})
            for suffix in (".bin", ".idx"):
                same = Path(f"{tmp}/base{suffix}").read_bytes() == \
                    Path(f"{tmp}/ours{workers}_text_document{suffix}").read_bytes()
                if not same:
                    print(f"error: output differs from the baseline ({suffix})", file=sys.stderr)
                    return 1
    base = results["runs"][0]["mb_per_s"]
    print(f"{'configuration':48s} {'s':>7s} {'MB/s':>7s} {'MB/s/worker':>12s} {'vs base':>8s}")
    for run in results["runs"]:
        print(f"{run['name']:48s} {run['seconds']:7.2f} {run['mb_per_s']:7.2f} "
              f"{run['mb_per_s'] / run['workers']:12.2f} {run['mb_per_s'] / base:7.2f}x")
    print("outputs identical to the baseline: yes")
    if args.results_file:
        Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_file).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
