"""
A tiny HTTP/1.1 origin server for the loopback integration tests.

It is a raw L{Protocol} rather than C{twisted.web}, so that a test can answer each request
however it likes, including with responses no real server should send (garbage, conflicting
framing, a body cut short), and so that request bodies are hashed as they arrive instead of
being spooled. It records every request head and every connection for assertions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.interfaces import IAddress, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "Origin",
    "OriginProtocol",
    "OriginRequest",
    "deterministic_chunks",
    "echo",
    "respond",
    "stream",
]

_CHUNK = 65536


def deterministic_chunks(total: int, size: int = _CHUNK) -> Iterator[bytes]:
    """
    Yield C{total} bytes of reproducible, non-repeating-looking data in pieces of C{size}.

    Each piece is a fixed pseudo-random block stamped with its index, so no two pieces are
    equal (a reordered or duplicated piece changes the hash) and nothing is held beyond one
    piece.
    """
    block = hashlib.sha256(b"aproxy").digest() * (size // 32 + 1)
    index = 0
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        piece = (index.to_bytes(8, "big") + block)[:n]
        yield piece
        sent += n
        index += 1


class OriginRequest:
    """
    One request as the origin received it.

    @ivar head: The raw head, without the final empty line.
    @ivar fields: The header fields in order, names as sent.
    @ivar body_length: The number of body bytes received (de-chunked).
    @ivar body_sha256: The hex SHA-256 of the body, computed while it arrived.
    @ivar body: The first 64 KiB of the body, for small-body assertions.
    @ivar complete: Whether the whole body arrived.
    """

    def __init__(self, head: bytes) -> None:
        self.head = head
        lines = head.split(b"\r\n")
        self.method, self.target, self.version = lines[0].split(b" ", 2)
        self.fields: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.fields.append((name, value.strip(b" \t")))
        self.body_length = 0
        self.body = b""
        self.complete = False
        self._hash = hashlib.sha256()

    @property
    def body_sha256(self) -> str:
        """The hex SHA-256 of the body received so far."""
        return self._hash.hexdigest()

    def headers(self, name: bytes) -> list[bytes]:
        """Every value of the field C{name} (case-insensitive)."""
        lname = name.lower()
        return [v for n, v in self.fields if n.lower() == lname]

    def header(self, name: bytes) -> bytes | None:
        """The value of the field C{name}, or L{None}; several values are joined."""
        values = self.headers(name)
        return b", ".join(values) if values else None

    def add_body(self, data: bytes) -> None:
        """Account for a piece of the body."""
        self.body_length += len(data)
        self._hash.update(data)
        if len(self.body) < _CHUNK:
            self.body += data[: _CHUNK - len(self.body)]


Handler = Callable[[OriginRequest, "OriginProtocol"], None]


def respond(
    proto: OriginProtocol,
    body: bytes = b"",
    status: bytes = b"200 OK",
    fields: tuple[bytes, ...] = (),
    length: bool = True,
    close: bool = False,
) -> None:
    """
    Write a complete response on C{proto}.

    @param fields: Extra field lines without their CRLF, e.g. C{b"X-A: 1"}.
    @param length: Send a C{Content-Length} (otherwise the body is delimited by close).
    @param close: Send C{Connection: close} and close after the response.
    """
    lines = [b"HTTP/1.1 " + status, *fields]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    proto.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    if close or not length:
        proto.transport.loseConnection()


def echo(request: OriginRequest, proto: OriginProtocol) -> None:
    """
    The default handler: answer with the origin's name, the method and the target, padded
    with dots to N bytes when the target's query holds C{size=N}.
    """
    body = proto.factory.name + b" " + request.method + b" " + request.target
    _, found, size = request.target.partition(b"size=")
    if found:
        body = body.ljust(int(size.split(b"&")[0]), b".")
    respond(proto, body)


@implementer(IPullProducer)
class _Streamer:
    """Writes C{total} deterministic bytes, one piece whenever the transport asks for more."""

    def __init__(self, proto: OriginProtocol, total: int) -> None:
        self._proto = proto
        self._pieces = deterministic_chunks(total)

    def resumeProducing(self) -> None:
        """Send the next piece, or finish."""
        transport = self._proto.transport
        piece = next(self._pieces, None)
        if piece is None:
            transport.unregisterProducer()
            return
        transport.write(piece)

    def stopProducing(self) -> None:
        """The connection went away; nothing to release."""


def stream(proto: OriginProtocol, total: int) -> None:
    """Answer with C{total} deterministic bytes and a Content-Length, streamed."""
    proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
    proto.transport.registerProducer(_Streamer(proto, total), False)


class OriginProtocol(Protocol):
    """
    One connection to the origin: parses requests (Content-Length or chunked bodies, hashed
    as they arrive) and hands each complete one to the factory's handler.

    @ivar requests: The requests received on this connection.
    """

    factory: Origin
    transport: Any

    def __init__(self) -> None:
        self.requests: list[OriginRequest] = []
        self._buf = b""
        self._req: OriginRequest | None = None
        self._remaining = 0
        self._chunked = False
        # Chunked state: -1 a size line, -2 a trailer line, 0 a CRLF, n > 0 data bytes left.
        self._chunk_left = -1

    def dataReceived(self, data: bytes) -> None:
        """Parse as much as possible from the bytes received so far."""
        self._buf += data
        while self._buf:
            if self._req is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buf = self._buf[:end], self._buf[end + 4 :]
                self._start(OriginRequest(head))
            elif self._chunked:
                if not self._chunked_body():
                    return
            else:
                take = self._buf[: self._remaining]
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                self._req.add_body(take)
                if not self._remaining:
                    self._finish()

    def _start(self, req: OriginRequest) -> None:
        self._req = req
        self.requests.append(req)
        self.factory.heads.append(req)
        if (req.header(b"expect") or b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        te = req.header(b"transfer-encoding")
        cl = req.header(b"content-length")
        if te is not None and te.lower().endswith(b"chunked"):
            self._chunked = True
            self._chunk_left = -1
        elif cl is not None and int(cl):
            self._remaining = int(cl)
        else:
            self._finish()

    def _chunked_body(self) -> bool:
        """Consume chunked framing; return whether progress was made."""
        req = self._req
        assert req is not None
        state = self._chunk_left
        if state < 0:
            # A chunk-size line (-1) or a trailer line (-2).
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            line, self._buf = self._buf[:end], self._buf[end + 2 :]
            if state == -1:
                size = int(line.split(b";")[0], 16)
                self._chunk_left = size if size else -2
            elif not line:
                self._chunked = False
                self._finish()
        elif state == 0:
            # The CRLF after a chunk's data.
            if len(self._buf) < 2:
                return False
            self._buf = self._buf[2:]
            self._chunk_left = -1
        else:
            take = self._buf[:state]
            self._buf = self._buf[len(take) :]
            self._chunk_left -= len(take)
            req.add_body(take)
        return True

    def _finish(self) -> None:
        req = self._req
        assert req is not None
        req.complete = True
        self._req = None
        self.factory.requests.append(req)
        self.factory.handler(req, self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Forget a request whose body never completed."""
        self._req = None


class Origin(Factory[OriginProtocol]):
    """
    Builds L{OriginProtocol}s and records what they saw.

    @ivar name: A label the default handler puts in its responses.
    @ivar handler: Called with each complete request and its protocol; must respond (or
        deliberately not).
    @ivar protocols: Every connection made to this origin, in order.
    @ivar heads: Every request head received (complete or not).
    @ivar requests: Every complete request received.
    """

    noisy = False

    def __init__(self, name: bytes = b"origin", handler: Handler = echo) -> None:
        self.name = name
        self.handler = handler
        self.protocols: list[OriginProtocol] = []
        self.heads: list[OriginRequest] = []
        self.requests: list[OriginRequest] = []

    def buildProtocol(self, addr: IAddress | None) -> OriginProtocol:
        """Make and remember the protocol for one connection."""
        proto = OriginProtocol()
        proto.factory = self
        self.protocols.append(proto)
        return proto
