"""
Sans-IO body framing (RFC 9112 sections 6 and 7): small decoders fed the bytes that follow
a head, returning the body data they contain and the bytes that belong to the next message.

Each decoder has the same contract: C{feed(data)} returns C{(pieces, rest)}, where C{pieces}
are slices of body data in order and C{rest} is what follows the body (non-empty only once
C{done} is true). Nothing is accumulated beyond one chunk-size or trailer line, so bodies of
any size stream through in bounded memory.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

from aproxy.errors import BadGateway, BadRequest, ProxyError
from aproxy.http.grammar import FIELD_LINE, QUOTED_STRING, TOKEN

__all__ = [
    "BodyDecoder",
    "ChunkedDecoder",
    "LengthDecoder",
    "UntilCloseDecoder",
    "chunk",
]

# chunk = chunk-size [ chunk-ext ] CRLF (RFC 9112 section 7.1), with
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*"
    + TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + TOKEN
    + rb"|"
    + QUOTED_STRING
    + rb"))?)*)"
)
# Fields that must not be sent as trailers (RFC 9110 section 6.5.1: framing, routing,
# connection control, authentication): the proxy drops them (RFC 9112 section 7.1.2 lets
# it) so that a recipient that merges trailers into the head cannot be misled.
_NOT_IN_TRAILERS: Final = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"authorization",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"www-authenticate",
        b"set-cookie",
        b"cookie",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"expect",
        b"max-forwards",
    }
)
_MAX_LINE: Final = 4096
_MAX_TRAILERS: Final = 65536


class BodyDecoder(Protocol):
    """What every decoder offers: feed bytes, get body pieces and leftover bytes."""

    done: bool

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Consume C{data}; return the body pieces in it and the bytes after the body."""


def chunk(data: bytes) -> list[bytes]:
    """
    Frame one piece of body data as a chunk, ready for C{writeSequence}.

    An empty piece frames as nothing: a chunk of size zero is the last-chunk (RFC 9112
    section 7.1), and writing one would end the body early.
    """
    if not data:
        return []
    return [b"%x\r\n" % len(data), data, b"\r\n"]


class LengthDecoder:
    """A body of exactly C{length} bytes (C{Content-Length})."""

    __slots__ = ("done", "remaining")
    # No trailer section in this framing (the chunked one's may be written after it).
    trailers: tuple[bytes, ...] = ()

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Return up to the remaining body bytes; the rest belongs to the next message."""
        remaining = self.remaining
        n = len(data)
        if not n:
            return [], b""
        if n < remaining:
            self.remaining = remaining - n
            return [data], b""
        self.remaining = 0
        self.done = True
        if n == remaining:
            return [data], b""
        if not remaining:
            return [], data
        return [data[:remaining]], data[remaining:]


class UntilCloseDecoder:
    """A response body delimited by the origin closing the connection."""

    __slots__ = ("done",)
    trailers: tuple[bytes, ...] = ()

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Everything is body until the connection closes."""
        return ([data] if data else []), b""


_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """
    A chunked body, validated chunk by chunk: strict sizes, extensions and CRLFs.

    Chunk extensions are checked and dropped (the proxy re-frames the body); the trailer
    section is validated and kept in L{trailers} as field lines to pass on.

    @ivar trailers: The trailer field lines (each ending in CRLF) once L{done}.
    """

    __slots__ = (
        "_drop",
        "_error",
        "_line",
        "_remaining",
        "_state",
        "_trailer_size",
        "done",
        "trailers",
    )

    def __init__(self, is_request: bool = True, drop: frozenset[bytes] = frozenset()) -> None:
        """
        @param is_request: Errors are the client's (400) rather than the origin's (502).
        @param drop: Further lowercase field names to leave out of the trailers (e.g. the
            X-Forwarded-For fields that C{--x-forwarded-for strip} removes from heads).
        """
        self._drop = _NOT_IN_TRAILERS | drop if drop else _NOT_IN_TRAILERS
        self._error: type[ProxyError] = BadRequest if is_request else BadGateway
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self._trailer_size = 0
        self.trailers: list[bytes] = []
        self.done = False

    def _fail(self, reason: str) -> ProxyError:
        if self._error is BadGateway:
            return BadGateway("invalid chunked body from origin: " + reason, "http_protocol_error")
        return BadRequest("invalid chunked body: " + reason)

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > _MAX_LINE:
                raise self._fail("line too long")
            return None, len(data)
        line = self._line + data[pos:end]
        self._line = b""
        if line[-1:] != b"\r":
            raise self._fail("bare LF")
        if len(line) > _MAX_LINE:
            raise self._fail("line too long")
        return line[:-1], end + 1

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Return the chunk data in C{data} and, once the last chunk and trailers are
        through, the bytes after them."""
        pieces: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                pieces.append(data[pos : pos + take] if take < n or pos else data)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_CRLF
            elif state == _SIZE:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                m = _CHUNK_LINE.fullmatch(line)
                if m is None:
                    raise self._fail("bad chunk size line")
                size = int(m.group(1), 16)
                if size:
                    self._remaining = size
                    self._state = _DATA
                else:
                    self._state = _TRAILER
            elif state == _DATA_CRLF:
                need = 2 - len(self._line)
                got = data[pos : pos + need]
                self._line += got
                pos += len(got)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise self._fail("missing CRLF after chunk data")
                    self._line = b""
                    self._state = _SIZE
                elif self._line != b"\r":
                    raise self._fail("missing CRLF after chunk data")
            elif state == _TRAILER:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                if not line:
                    self._state = _DONE
                    self.done = True
                    return pieces, data[pos:]
                if FIELD_LINE.fullmatch(line) is None:
                    raise self._fail("malformed trailer field")
                self._trailer_size += len(line)
                if self._trailer_size > _MAX_TRAILERS:
                    raise self._fail("trailer section too large")
                if line.partition(b":")[0].lower() not in self._drop:
                    self.trailers.append(line + b"\r\n")
            else:
                return pieces, data[pos:]
        return pieces, b""
