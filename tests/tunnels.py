"""
Harness for the loopback tunnel and TLS tests (no test cases of its own): origins on the
real reactor (plain, TLS, WebSocket), a proxy factory that counts every connection it and
its upstreams make so cleanups can wait for them, blocking socket clients, and
L{TunnelIntegrationTestCase}, which starts and stops them. Test modules import from here,
never from each other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import trustme
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.endpoints import (
    serverFromString,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig
from aproxy.http.head import HeadReader
from aproxy.upstream.protocol import UpstreamFactory, UpstreamProtocol

try:
    from websockets.sync.server import serve as ws_serve
except ImportError:  # pragma: no cover - websockets is a test extra
    ws_serve = None  # type: ignore[assignment]

reactor: Any = _reactor

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# A bound for blocking client calls, so a misbehaving proxy fails a test instead of
# hanging a thread; the test's own timeout is the real limit.
SOCKET_TIMEOUT = 30.0
CHUNK = 64 * 1024
BULK = 20 * 1024 * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TLS_BODY = b"hello from the TLS origin\n"
CONNECTION_DONE = Failure(ConnectionDone())


# -- connection bookkeeping ----------------------------------------------------------------


class Tracker:
    """The connections a test has open on the reactor, so cleanup can wait for them all."""

    def __init__(self) -> None:
        self.open: set[object] = set()
        self._waiters: list[Deferred[None]] = []

    def opened(self, conn: object) -> None:
        """C{conn} was connected."""
        self.open.add(conn)

    def closed(self, conn: object) -> None:
        """C{conn} ended; wake the waiters once nothing is open."""
        self.open.discard(conn)
        if not self.open:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        """A Deferred firing once every tracked connection has ended."""
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d


class _TrackedProxyProtocol(ProxyProtocol):
    tracker: Tracker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.tracker.opened(self)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self.tracker.closed(self)


class _TrackedUpstream(UpstreamProtocol):
    tracker: Tracker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.tracker.opened(self)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self.tracker.closed(self)


class _TrackingUpstreamFactory(UpstreamFactory):
    def __init__(self, max_head_size: int, tracker: Tracker) -> None:
        super().__init__(max_head_size)
        self.tracker = tracker

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        proto = _TrackedUpstream(HeadReader(self.max_head_size, self.max_head_size, False))
        proto.factory = self
        proto.tracker = self.tracker
        return proto


class TrackingProxyFactory(ProxyFactory):
    """A L{ProxyFactory} whose client and upstream connections are tracked."""

    def __init__(self, config: ProxyConfig, tracker: Tracker) -> None:
        super().__init__(config, reactor)
        self.tracker = tracker
        self.upstream_factory = _TrackingUpstreamFactory(config.max_head_size, tracker)

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        proto = _TrackedProxyProtocol(self, addr)
        proto.tracker = self.tracker
        return proto


# -- Twisted origins -----------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Origin(Protocol):
    """
    A raw TCP origin that records what it receives; subclasses script its behaviour.

    The factory's C{done} fires with L{result} when the connection ends.
    """

    factory: Any
    transport: Any

    def __init__(self) -> None:
        self.received = bytearray()

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def result(self) -> Any:
        """What C{factory.done} fires with."""
        return bytes(self.received)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.factory.tracker.closed(self)
        if not self.factory.done.called:
            self.factory.done.callback(self.result())


class OriginFactory(Factory):
    """Builds one kind of L{Origin}; C{done} fires when the first connection ends."""

    protocol = Origin

    def __init__(self, origin: type[Origin], tracker: Tracker, **attrs: Any) -> None:
        self.origin = origin
        self.tracker = tracker
        self.attrs = attrs
        self.connections = 0
        self.done: Deferred[Any] = Deferred()

    def buildProtocol(self, addr: Any) -> Origin:
        self.connections += 1
        proto = self.origin()
        proto.factory = self
        proto.__dict__.update(self.attrs)
        return proto


class ReplyWhenComplete(Origin):
    """Once C{expected} bytes have arrived, sends them back and closes."""

    expected = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if len(self.received) >= self.expected:
            self.transport.write(b"got:" + bytes(self.received))
            self.transport.loseConnection()


class Banner(Origin):
    """Speaks first with a banner, then answers QUIT and closes (SMTP-like)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"220 origin ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.received.endswith(b"QUIT\r\n"):
            self.transport.write(b"221 bye\r\n")
            self.transport.loseConnection()


class ReplyAtEof(Origin):
    """Waits for the client's EOF, then replies with what it got and closes."""

    def readConnectionLost(self) -> None:
        self.transport.write(b"reply:" + bytes(self.received))
        self.transport.loseConnection()


class UpgradeEcho(Origin):
    """
    Answers the first request head with a 101 to "echo" and, in the same segment, a
    greeting; then echoes everything until EOF. Its result is everything it received.
    """

    switched = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.switched:
            self.transport.write(data)
            return
        if b"\r\n\r\n" not in self.received:
            return
        self.switched = True
        rest = bytes(self.received).split(b"\r\n\r\n", 1)[1]
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n"
            b"\r\nhello after 101\n" + rest
        )


class HalfCloseFirst(Origin):
    """Sends a line and shuts down its write side at once, but keeps reading until EOF."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"origin has spoken\n")
        self.transport.loseWriteConnection()


def bulk_chunks(seed: bytes) -> Iterator[bytes]:
    """A deterministic L{BULK}-byte stream, produced one L{CHUNK} at a time."""
    for i in range(BULK // CHUNK):
        yield hashlib.sha256(seed + i.to_bytes(4, "big")).digest() * (CHUNK // 32)


def bulk_digest(seed: bytes) -> str:
    """The sha256 of the stream L{bulk_chunks} makes from C{seed}."""
    digest = hashlib.sha256()
    for piece in bulk_chunks(seed):
        digest.update(piece)
    return digest.hexdigest()


@implementer(IPullProducer)
class _ChunkProducer:
    """Writes the next chunk each time the transport's buffer has drained."""

    def __init__(self, transport: Any, chunks: Iterator[bytes], finished: Callable[[], None]):
        self._transport = transport
        self._chunks = chunks
        self._finished = finished

    def resumeProducing(self) -> None:
        piece = next(self._chunks, None)
        if piece is None:
            self._transport.unregisterProducer()
            self._finished()
            return
        self._transport.write(piece)

    def stopProducing(self) -> None:
        pass


class Bulk(Origin):
    """
    Streams the b"down" bulk stream while hashing everything it receives; closes once it
    has sent everything and seen the client's EOF. Its result is (byte count, sha256).
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.digest = hashlib.sha256()
        self.count = 0
        self.sent = False
        self.eof = False
        self.transport.registerProducer(
            _ChunkProducer(self.transport, bulk_chunks(b"down"), self._sent), False
        )

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)

    def _sent(self) -> None:
        self.sent = True
        if self.eof:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.sent:
            self.transport.loseConnection()

    def result(self) -> Any:
        return (self.count, self.digest.hexdigest())


class TrackingTLSFactory(TLSMemoryBIOFactory):
    """Serves TLS over a plain TCP port and tracks each TLS connection."""

    def __init__(self, options: Any, wrapped: Any, tracker: Tracker) -> None:
        super().__init__(options, False, wrapped)
        self.tracker = tracker

    def registerProtocol(self, p: Any) -> None:  # noqa: N802
        super().registerProtocol(p)
        self.tracker.opened(p)

    def unregisterProtocol(self, p: Any) -> None:  # noqa: N802
        super().unregisterProtocol(p)
        self.tracker.closed(p)


class BodyResource(Resource):
    """Answers every GET with L{TLS_BODY}."""

    isLeaf = True  # noqa: N815

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"text/plain")
        return TLS_BODY


# -- blocking client helpers (run in threads) ----------------------------------------------


class SockReader:
    """Buffered reads from a blocking socket."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_until(self, sep: bytes) -> bytes:
        """Everything up to and including C{sep}."""
        while sep not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before {sep!r}; got {self.buf[:200]!r}")
        end = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def read_exact(self, n: int) -> bytes:
        """Exactly C{n} bytes."""
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        """Everything until the peer closes (or shuts down) its write side."""
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def dial(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A blocking connection to C{host}:C{port} with a safety timeout."""
    return socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)


def connect_head(authority: str) -> bytes:
    """A CONNECT request head for C{authority}."""
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def open_tunnel(proxy_port: int, authority: str) -> tuple[socket.socket, SockReader]:
    """CONNECT through the proxy; return the socket and a reader past the 200 head."""
    sock = dial(proxy_port)
    try:
        sock.sendall(connect_head(authority))
        reader = SockReader(sock)
        head = reader.read_until(b"\r\n\r\n")
        if head != ESTABLISHED:
            raise AssertionError(f"unexpected CONNECT answer {head!r}")
    except BaseException:
        sock.close()
        raise
    return sock, reader


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status code, fields (lower-cased names; repeated ones joined) and body of C{raw}."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
    return status, fields, body


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client WebSocket frame (RFC 6455 section 5.2)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + _mask(key, payload)


def _mask(key: bytes, payload: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def read_ws_frame(reader: SockReader) -> tuple[bool, int, bool, bytes]:
    """One WebSocket frame: (fin, opcode, masked, unmasked payload)."""
    b0, b1 = reader.read_exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(reader.read_exact(2), "big")
    elif n == 127:
        n = int.from_bytes(reader.read_exact(8), "big")
    masked = bool(b1 & 0x80)
    key = reader.read_exact(4) if masked else b""
    payload = reader.read_exact(n)
    if masked:
        payload = _mask(key, payload)
    return bool(b0 & 0x80), b0 & 0x0F, masked, payload


def _ws_echo(ws: Any) -> None:
    for message in ws:
        ws.send(message)


def gather(*ds: Deferred[Any]) -> Deferred[list[Any]]:
    """All results of C{ds} in order, or the first failure itself (not a FirstError)."""

    def unwrap(failure: Failure) -> Failure:
        if failure.check(FirstError):
            inner: Failure = cast(FirstError, failure.value).subFailure
            return inner
        return failure

    return gatherResults(list(ds), consumeErrors=True).addErrback(unwrap)


def clean_env() -> dict[str, str]:
    """The environment without proxy settings, so curl uses only the proxy it is given."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# -- the tests -----------------------------------------------------------------------------


class TunnelIntegrationTestCase(TestCase):
    """Starts proxies and origins on loopback and cleans all of them up."""

    timeout = 60

    def setUp(self) -> None:
        self.tracker = Tracker()
        # Added first, so it runs last: after the listeners stopped, wait for every
        # connection the proxy or an origin still has open.
        self.addCleanup(self.tracker.all_closed)

    def listen(self, factory: Any, description: str = "tcp:0:interface=127.0.0.1") -> int:
        """Listen with C{factory} on an ephemeral loopback port and return the port number."""
        port = self.successResultOf(serverFromString(reactor, description).listen(factory))
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    def start_proxy(self, config: ProxyConfig | None = None) -> int:
        """A tracked proxy with C{config} (any CONNECT port by default)."""
        factory = TrackingProxyFactory(config or ProxyConfig(connect_ports=None), self.tracker)
        return self.listen(factory)

    def start_origin(self, protocol: type[Origin], **attrs: Any) -> tuple[OriginFactory, int]:
        """A raw TCP origin speaking C{protocol}."""
        factory = OriginFactory(protocol, self.tracker, **attrs)
        return factory, self.listen(factory)

    def start_tls_origin(self) -> tuple[int, str]:
        """A Twisted web TLS origin for localhost; returns its port and the CA file path."""
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        ca_path = os.path.join(tmp, "ca.pem")
        ca.cert_pem.write_to_path(ca_path)
        options = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
        site = TrackingTLSFactory(options, Site(BodyResource()), self.tracker)
        return self.listen(site), ca_path

    def start_ws_origin(self) -> int:
        """A websockets echo server in its own thread, shut down at cleanup."""
        if ws_serve is None:
            self.skipTest("websockets is not installed")
        server = ws_serve(_ws_echo, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, name="ws-origin", daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            thread.join()

        self.addCleanup(deferToThread, stop)
        port: int = server.socket.getsockname()[1]
        return port

    def unused_port(self) -> Deferred[int]:
        """A loopback port nothing listens on (bound, then released)."""
        port = self.successResultOf(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        )
        number: int = port.getHost().port
        stopped: Deferred[Any] = Deferred()
        stopped.addCallback(lambda _: number)
        maybe = port.stopListening()
        if maybe is None:
            stopped.callback(None)
        else:
            maybe.chainDeferred(stopped)
        return stopped
