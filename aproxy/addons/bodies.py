"""
Body transformers addons can use as they are: L{Replace} (text replaced as it streams,
even where a chunk boundary cuts it) and L{decoded} (a transformer given a compressed
body's plain bytes, its output compressed again), both in bounded memory.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

from aproxy.addons.api import AddonExchange, as_body

__all__ = ["Replace", "decoded"]

# Bytes decompressed per step: a small compressed chunk can hold a great deal (a "zip
# bomb"), so it is taken in pieces of this size, each passed on before the next.
_STEP = 256 * 1024


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class Replace:
    """
    Replace each of some byte strings by another as the body streams: what could be the
    start of a match at the end of a chunk is held back until the next one shows whether
    it is (at most the longest pattern's length, less one byte).

    @param replacements: What to replace (C{str} patterns and replacements are UTF-8).
    """

    def __init__(
        self,
        replacements: Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str | bytes, str | bytes],
    ) -> None:
        if not replacements or not all(replacements):
            raise ValueError("Replace needs at least one non-empty pattern")
        pairs: Any = replacements.items()
        self._map = {_as_bytes(k): _as_bytes(v) for k, v in pairs}
        # Longest first, so that of two patterns starting at one place the longer wins.
        ordered = sorted(self._map, key=len, reverse=True)
        self._re = re.compile(b"|".join(re.escape(k) for k in ordered))
        self._keep = len(ordered[0]) - 1
        self._held = b""
        # One pattern that can't overlap itself (a word, as usual): bytes.replace does the
        # work at C speed, with no Python call per match.
        self._single: tuple[bytes, bytes] | None = None
        if len(ordered) == 1 and not _overlaps(ordered[0]):
            self._single = (ordered[0], self._map[ordered[0]])

    def feed(self, chunk: bytes) -> bytes:
        """The chunk with its complete matches replaced, less a possible match's start."""
        if self._single is not None:
            return self._feed_single(chunk, *self._single)
        buf = self._held + chunk if self._held else chunk
        safe = len(buf) - self._keep
        out = []
        pos = 0
        for m in self._re.finditer(buf):
            if m.start() >= safe:
                break
            out.append(buf[pos : m.start()])
            out.append(self._map[m.group()])
            pos = m.end()
        cut = max(pos, safe)
        out.append(buf[pos:cut])
        self._held = buf[cut:]
        return b"".join(out)

    def _feed_single(self, chunk: bytes, old: bytes, new: bytes) -> bytes:
        """
        L{feed} for one pattern that can't overlap itself: the chunk is replaced whole by
        C{bytes.replace} (no copy before it), and only what the held bytes and the chunk's
        first bytes may form together, or what its end may start, is handled apart.
        """
        held = self._held
        out = b""
        if held and len(chunk) < len(old) - 1:
            chunk = held + chunk  # (a small chunk: taken with the held bytes as one)
        elif held:
            # A match that starts in the held bytes ends in the chunk's first bytes.
            joint = held + chunk[: len(old) - 1]
            found = joint.find(old)
            if 0 <= found < len(held):
                out = held[:found] + new
                chunk = chunk[found + len(old) - len(held) :]
            else:
                out = held
        # The longest end of the chunk that starts the pattern is held for the next one
        # (it can't be part of a whole match there: the pattern can't overlap itself).
        size = len(chunk)
        keep = 0
        for k in range(min(len(old) - 1, size), 0, -1):
            if chunk.endswith(old[:k]):
                keep = k
                break
        if keep:
            self._held = chunk[size - keep :]
            chunk = chunk[: size - keep]
        else:
            self._held = b""
        return out + chunk.replace(old, new) if out else chunk.replace(old, new)

    def end(self) -> bytes:
        """What was held back, replaced."""
        held, self._held = self._held, b""
        return self._re.sub(lambda m: self._map[m.group()], held)


def _overlaps(pattern: bytes) -> bool:
    """Whether two occurrences of C{pattern} can overlap (a proper suffix is a prefix)."""
    return any(pattern.endswith(pattern[:n]) for n in range(1, len(pattern)))


class _Decoded:
    """A transformer on a compressed body: decompress, transform, compress again."""

    def __init__(self, inner: Any, wbits: int) -> None:
        self._inner = inner
        self._wbits = wbits
        self._in = zlib.decompressobj(wbits)
        self._out = zlib.compressobj(6, zlib.DEFLATED, wbits)
        # The first bytes, until they show whether "deflate" has its zlib wrapper (its
        # two-byte header) or is raw, as some servers send it.
        self._first: bytes | None = b"" if wbits == zlib.MAX_WBITS else None

    def feed(self, chunk: bytes) -> bytes:
        out = []
        data = chunk
        while True:
            first = self._first
            try:
                plain = self._in.decompress(data, _STEP)
            except zlib.error:
                if first is None:
                    raise
                self._first = None
                self._in = zlib.decompressobj(-zlib.MAX_WBITS)
                self._out = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                data = first + data
                continue
            if first is not None:
                first += data[: len(data) - len(self._in.unconsumed_tail)]
                self._first = None if plain or len(first) >= 2 else first
            data = self._in.unconsumed_tail
            if plain:
                out.append(self._out.compress(as_body(self._inner.feed(plain))))
            if self._in.eof and self._in.unused_data and self._wbits != zlib.MAX_WBITS:
                # gzip: another member follows (RFC 1952 allows several); read it too.
                data = self._in.unused_data
                self._in = zlib.decompressobj(self._wbits)
                continue
            if not data and len(plain) < _STEP:
                break
        return b"".join(out)

    def end(self) -> bytes:
        plain = self._in.flush()
        out = [self._out.compress(as_body(self._inner.feed(plain)))] if plain else []
        out.append(self._out.compress(as_body(self._inner.end())))
        out.append(self._out.flush())
        return b"".join(out)


def decoded(exchange: AddonExchange, transformer: Any) -> Any:
    """
    C{transformer} as it should be used on the response of C{exchange}: as it is for an
    uncompressed body, wrapped to see plain bytes for a C{gzip} or C{deflate} one, and
    L{None} (leave the body alone) for codings it can't undo (C{br}, several codings).
    """
    response = exchange.response
    if response is None:
        return transformer
    listed = ",".join(response.fields.get_all("Content-Encoding")).split(",")
    codings = [c.strip().lower() for c in listed]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return transformer
    if codings in (["gzip"], ["x-gzip"]):
        return _Decoded(transformer, 16 + zlib.MAX_WBITS)
    if codings == ["deflate"]:
        return _Decoded(transformer, zlib.MAX_WBITS)
    return None
