"""
A look at the first bytes a client sends into a C{CONNECT} tunnel: a TLS ClientHello
(RFC 8446 section 4.1.2, the same layout since TLS 1.0), and in it the server name
(SNI, RFC 6066 section 3) and the protocols offered (ALPN, RFC 7301), without decrypting
or answering anything. Sans-IO: bytes in, a L{Hello} (or "not yet", or "not TLS") out.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_HELLO", "NOT_TLS", "Hello", "read_hello"]

MAX_HELLO = 64 * 1024
"""The most bytes a ClientHello may take; a longer one is treated as not TLS."""

NOT_TLS = "not-tls"
"""What L{read_hello} returns for bytes that are not a TLS ClientHello."""

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SNI = 0
_ALPN = 16


@dataclass(frozen=True)
class Hello:
    """
    What a ClientHello said.

    @ivar server_name: The SNI host name (lowercased, no trailing dot), or L{None}.
    @ivar protocols: The ALPN protocols offered, in order (empty: no ALPN).
    """

    server_name: str | None
    protocols: tuple[bytes, ...]


class _Short(Exception):
    """The ClientHello is not complete yet."""


class _Bad(Exception):
    """Not a well-formed ClientHello."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Bad
        piece = self.data[self.pos : end]
        self.pos = end
        return piece

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake payload of the TLS records at the start of C{data}, concatenated."""
    out = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise _Short
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            raise _Bad
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 2048:
            raise _Bad
        end = pos + 5 + length
        out += data[pos + 5 : end]
        if len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                raise _Bad
            needed = 4 + int.from_bytes(out[1:4], "big")
            if len(out) >= needed:
                return out[:needed]
        if len(data) < end:
            raise _Short
        pos = end


def read_hello(data: bytes) -> Hello | str | None:
    """
    Read a ClientHello from the first bytes of a tunnel.

    @return: The L{Hello}; L{None} if more bytes are needed; L{NOT_TLS} if C{data} does
        not start a TLS ClientHello (or one over L{MAX_HELLO}).
    """
    if not data:
        return None
    if data[0] != _HANDSHAKE:
        return NOT_TLS
    try:
        message = _handshake_bytes(data)
    except _Short:
        return None if len(data) < MAX_HELLO else NOT_TLS
    except _Bad:
        return NOT_TLS
    try:
        return _parse(_Reader(message[4:]))
    except _Bad:
        return NOT_TLS


def _parse(r: _Reader) -> Hello:
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    name: str | None = None
    protocols: tuple[bytes, ...] = ()
    if r.left == 0:
        return Hello(None, ())
    extensions = _Reader(r.vector(2))
    while extensions.left:
        kind = extensions.number(2)
        body = _Reader(extensions.vector(2))
        if kind == _SNI:
            names = _Reader(body.vector(2))
            while names.left:
                name_type = names.number(1)
                value = names.vector(2)
                if name_type == 0 and name is None:
                    try:
                        name = value.decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError:
                        raise _Bad from None
        elif kind == _ALPN:
            offered = _Reader(body.vector(2))
            found = []
            while offered.left:
                found.append(offered.vector(1))
            protocols = tuple(found)
    return Hello(name or None, protocols)
