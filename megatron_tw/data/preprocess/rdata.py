"""A minimal reader for R lazy-load databases (``.rdx`` + ``.rdb``), standard library only.

R packages store their data sets as a lazy-load database: ``NAME.rdx`` is a gzip-compressed
R serialization of an index ``list(variables=, references=, compressed=)`` whose
``variables`` map each object name to ``c(offset, length)`` in ``NAME.rdb``; each blob in
``NAME.rdb`` is a 4-byte big-endian uncompressed length followed by a zlib stream holding
one serialized object. The serialization is R's XDR format ("X\\n", versions 2 and 3).

Only what data sets use is decoded: vectors (logical, integer, double, complex, character,
list), pairlists, symbols, attributes and references. Closures, environments' contents and
byte code are read structurally where needed but not interpreted. Anything else raises
``RDataError`` naming the type code, never a silent wrong value.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes (R internals manual, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_NA_INT = -(2**31)
_LATIN1_MASK, _UTF8_MASK = 1 << 2, 1 << 3


class RDataError(ValueError):
    """The stream holds something this reader does not decode (or is corrupt)."""


@dataclass
class RObject:
    """A decoded R value: ``value`` is a Python list (vectors), dict (named pairlist) or None."""

    rtype: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None


class _Unpickler:
    """Reads one XDR serialization stream (big-endian integers and doubles)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("truncated R serialization stream")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = struct.unpack(">II", self._take(8))
            n = (upper << 32) + lower
        return n

    def read(self) -> RObject | None:
        if self._take(2) != b"X\n":
            raise RDataError("not an XDR ('X\\n') R serialization; the ascii and native "
                             "formats are not supported")
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")
        return self._item()

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        return raw.decode("latin-1" if levels & _LATIN1_MASK else "utf-8")

    def _item(self) -> Any:
        flags = self._int()
        rtype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

        if rtype == NILVALUE_SXP:
            return None
        if rtype in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                     MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RObject(rtype, None)
        if rtype == REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if rtype in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            self._int()  # always 0
            obj = RObject(rtype, [self._item() for _ in range(self._int())])
            self.refs.append(obj)
            return obj
        if rtype == SYMSXP:
            obj = RObject(SYMSXP, self._item())  # the CHARSXP of the name
            self.refs.append(obj)
            return obj
        if rtype == ENVSXP:
            obj = RObject(ENVSXP, None)
            self._int()  # locked
            self.refs.append(obj)  # before the contents: they may refer back to it
            obj.value = {"enclos": self._item(), "frame": self._item(), "hashtab": self._item()}
            attrs = self._item()
            obj.attributes = attrs.value if isinstance(attrs, RObject) else {}
            return obj
        if rtype in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self._pairlist(rtype, has_attr, has_tag)
        if rtype == CHARSXP:
            return self._charsxp(levels)
        if rtype == ALTREP_SXP:
            raise RDataError("ALTREP objects are not supported by this reader")

        if rtype in (LGLSXP, INTSXP):
            n = self._length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            value = [None if v == _NA_INT else v for v in ints]
            if rtype == LGLSXP:
                value = [None if v is None else bool(v) for v in value]
        elif rtype == REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif rtype == CPLXSXP:
            n = self._length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        elif rtype == STRSXP:
            value = []
            for _ in range(self._length()):
                char_flags = self._int()
                if char_flags & 0xFF != CHARSXP:
                    raise RDataError(f"character vector element of type {char_flags & 0xFF}")
                value.append(self._charsxp(char_flags >> 12))
        elif rtype in (VECSXP, EXPRSXP):
            value = [self._item() for _ in range(self._length())]
        elif rtype == RAWSXP:
            value = self._take(self._length())
        elif rtype == S4SXP:
            value = None
        else:
            raise RDataError(f"R object type {rtype} is not supported by this reader")

        obj = RObject(rtype, value)
        if has_attr:
            attrs = self._item()
            obj.attributes = attrs.value if isinstance(attrs, RObject) else {}
        return obj

    def _pairlist(self, rtype: int, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist is a linked list; decode it iteratively into a name -> value dict."""
        items: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        position = 0
        while True:
            if has_attr:
                attrs = self._item()
                if not attributes and isinstance(attrs, RObject):
                    attributes = attrs.value
            tag = self._item() if has_tag else None
            name = tag.value if isinstance(tag, RObject) and tag.rtype == SYMSXP else None
            items[name if name is not None else f"[{position}]"] = self._item()
            position += 1
            # The CDR: another cell of the same list continues the loop; anything else ends it.
            flags = self._int()
            cdr_type = flags & 0xFF
            if cdr_type == NILVALUE_SXP:
                break
            if cdr_type not in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP,
                                ATTRLANGSXP, ATTRLISTSXP):
                self.pos -= 4
                items["[cdr]"] = self._item()
                break
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        return RObject(rtype, items, attributes)


def unserialize(data: bytes) -> Any:
    """Decode one R XDR serialization stream (as written by ``serialize()``/``saveRDS``)."""
    return _Unpickler(data).read()


def read_lazyload_db(prefix: str | Path) -> dict[str, Any]:
    """Read every variable of the lazy-load database ``prefix.rdx``/``prefix.rdb``.

    Returns a dict name -> decoded value (``RObject``).
    """
    prefix = Path(prefix)
    rdx_path, rdb_path = prefix.with_suffix(".rdx"), prefix.with_suffix(".rdb")
    index = unserialize(_decompress_index(rdx_path.read_bytes()))
    if not isinstance(index, RObject) or index.names is None or "variables" not in index.names:
        raise RDataError(f"{rdx_path}: not a lazy-load index (no 'variables' entry)")
    variables = index.value[index.names.index("variables")]
    blob = rdb_path.read_bytes()
    out: dict[str, Any] = {}
    for name, where in zip(variables.names, variables.value):
        offset, length = (int(x) for x in where.value)
        out[name] = unserialize(_decompress_blob(blob[offset : offset + length], rdb_path, name))
    return out


def _decompress_index(raw: bytes) -> bytes:
    # R writes the .rdx with gzcon (gzip); older versions used the blob format below.
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return zlib.decompress(raw[4:])


def _decompress_blob(raw: bytes, path: Path, name: str) -> bytes:
    # Blob: 4-byte big-endian length, then (compression type 1) a zlib stream.
    expected = struct.unpack(">I", raw[:4])[0]
    try:
        data = zlib.decompress(raw[4:])
    except zlib.error as exc:
        raise RDataError(
            f"{path}: object {name!r} is not zlib-compressed ({exc}); bzip2/xz lazy-load "
            "databases are not supported"
        ) from exc
    if len(data) != expected:
        raise RDataError(f"{path}: object {name!r} has {len(data)} bytes, index says {expected}")
    return data
