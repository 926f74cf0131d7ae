"""The built-in corpus: fetch the registered sources, split by document, write JSON lines.

``build_corpus(out_dir)`` writes
- ``out_dir/train.jsonl`` and ``out_dir/heldout.jsonl``: one document per line,
  ``{"text": ..., "source": ..., "title": ...}``; the held-out split is whole documents
  (by default Austen's *Persuasion*, a ~110k-token novel for long-context evaluation);
- ``out_dir/manifest.json``: sources, counts, bytes, and the sources that failed.

Idempotent: each source's documents are cached in ``out_dir/cache/<source>.v<N>.jsonl``
and its downloads in ``out_dir/downloads``; a second run with the same arguments does no network
work and rewrites nothing. A source that fails stops the build naming the source and the
cause, unless ``allow_missing`` (``--allow-missing-sources``): then it is left out, said so
loudly, and recorded in the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_tw.data.preprocess.sources import (
    SOURCES,
    Document,
    SourceError,
    default_sources,
)

DEFAULT_HELDOUT = ("Persuasion",)
# Bump when a source's text cleaning changes: cached documents of older versions are then
# rebuilt from the (still cached) downloads.
MANIFEST_VERSION = 1


class CorpusError(RuntimeError):
    """The corpus cannot be built as asked; the message names the source and the fix."""


@dataclass
class CorpusResult:
    out_dir: Path
    train_path: Path
    heldout_path: Path
    sources: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    heldout_titles: list[str] = field(default_factory=list)
    cached: bool = False

    def format(self) -> str:
        lines = [f"corpus in {self.out_dir}" + (" (up to date, nothing fetched)"
                                                 if self.cached else "")]
        for split in ("train", "heldout"):
            c = self.counts.get(split, {})
            lines.append(f"  {split}: {c.get('documents', 0)} documents, "
                         f"{c.get('bytes', 0) / 1e6:.1f} MB")
        lines.append(f"  held out: {', '.join(self.heldout_titles)}")
        for name in self.sources:
            c = self.counts.get(name, {})
            lines.append(f"  source {name}: {c.get('documents', 0)} documents, "
                         f"{c.get('bytes', 0) / 1e6:.1f} MB")
        for name, reason in self.failed.items():
            lines.append(f"  MISSING source {name}: {reason}")
        lines.append(f"  -> {self.train_path}\n  -> {self.heldout_path}")
        return "\n".join(lines)


def _write_jsonl(path: Path, docs: list[Document]) -> int:
    """Write atomically (temp name, then rename); returns the bytes of text written."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(doc.to_json() + "\n")
            nbytes += len(doc.text.encode("utf-8"))
    os.replace(tmp, path)
    return nbytes


def _read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def load_source(name: str, cache_dir: Path, downloads: Path) -> list[Document]:
    """A source's documents, from the cache or fetched (then cached)."""
    cached = cache_dir / f"{name}.v{MANIFEST_VERSION}.jsonl"
    if cached.exists():
        return _read_jsonl(cached)
    docs = SOURCES[name].fetch(downloads)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SourceError(f"source {name} produced no documents")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(cached, docs)
    return docs


def build_corpus(out_dir: str | os.PathLike, sources: list[str] | None = None,
                 heldout_titles: tuple[str, ...] = DEFAULT_HELDOUT,
                 allow_missing: bool = False,
                 log: Callable[[str], None] = print) -> CorpusResult:
    """Fetch ``sources`` (default: every default source) and write train/held-out splits."""
    out = Path(out_dir)
    sources = list(sources) if sources else default_sources()
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise CorpusError(f"unknown source(s) {unknown}; known: {sorted(SOURCES)}")
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    manifest_path = out / "manifest.json"
    request = {"version": MANIFEST_VERSION, "sources": sources,
               "heldout": list(heldout_titles), "allow_missing": allow_missing}

    if manifest_path.exists() and train_path.exists() and heldout_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("request") == request and not manifest.get("failed"):
            return CorpusResult(out, train_path, heldout_path, manifest["fetched"], {},
                                manifest["counts"], manifest["heldout_titles"], cached=True)

    out.mkdir(parents=True, exist_ok=True)
    fetched, failed, all_docs, counts = [], {}, [], {}
    for name in sources:
        log(f"source {name}: {SOURCES[name].description}")
        try:
            docs = load_source(name, out / "cache", out / "downloads")
        except (SourceError, OSError, ValueError) as exc:
            if not allow_missing:
                raise CorpusError(
                    f"source {name!r} failed: {exc}\nFix the cause, leave the source out "
                    f"(--sources), or pass --allow-missing-sources to build without it"
                ) from exc
            log(f"WARNING: source {name!r} failed and is LEFT OUT: {exc}")
            failed[name] = str(exc)
            continue
        fetched.append(name)
        all_docs.extend(docs)
        counts[name] = {"documents": len(docs),
                        "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}
    if not all_docs:
        raise CorpusError("no source could be fetched; nothing to build")

    heldout = [d for d in all_docs if d.title in heldout_titles]
    if not heldout:
        if not allow_missing:
            raise CorpusError(f"held-out document(s) {list(heldout_titles)} not in the corpus; "
                              "pass --heldout TITLE with a title from the fetched sources")
        longest = max(all_docs, key=lambda d: len(d.text))
        log(f"WARNING: held-out {list(heldout_titles)} not fetched; holding out the longest "
            f"document instead: {longest.title!r}")
        heldout = [longest]
    heldout_keys = {(d.source, d.title) for d in heldout}
    train = [d for d in all_docs if (d.source, d.title) not in heldout_keys]
    counts["train"] = {"documents": len(train), "bytes": _write_jsonl(train_path, train)}
    counts["heldout"] = {"documents": len(heldout), "bytes": _write_jsonl(heldout_path, heldout)}
    titles = [d.title for d in heldout]
    manifest = {"request": request, "fetched": fetched, "failed": failed, "counts": counts,
                "heldout_titles": titles}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return CorpusResult(out, train_path, heldout_path, fetched, failed, counts, titles)
