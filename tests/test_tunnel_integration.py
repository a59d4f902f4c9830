"""
Loopback integration tests for CONNECT tunnels and Upgrade (WebSocket) relays.

The proxy and the origins run on the real reactor, on ephemeral loopback ports; blocking
clients (plain and TLS sockets, curl, the websockets library) run in threads through
L{deferToThread}. Every connection the proxy and the Twisted origins make is counted, and a
cleanup waits until all of them have ended, so a test never leaves the reactor dirty.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import trustme
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
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
    from websockets.sync.client import connect as ws_connect
    from websockets.sync.server import serve as ws_serve
except ImportError:  # pragma: no cover - websockets is a test extra
    ws_connect = ws_serve = None  # type: ignore[assignment]

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


class _TrackingTLSFactory(TLSMemoryBIOFactory):
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


class _Body(Resource):
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


def _clean_env() -> dict[str, str]:
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
        site = _TrackingTLSFactory(options, Site(_Body()), self.tracker)
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


class ConnectTLSTests(TunnelIntegrationTestCase):
    """TLS clients reach a TLS origin through a CONNECT tunnel."""

    def test_curl_through_tunnel(self) -> Deferred[None]:
        """curl -p through the proxy fetches the body from a local HTTPS origin."""
        curl = shutil.which("curl")
        if curl is None:
            self.skipTest("curl is not installed")
        proxy_port = self.start_proxy()
        origin_port, ca_path = self.start_tls_origin()
        args = [
            curl,
            "-q",
            "-sS",
            "-p",
            "-x",
            f"http://127.0.0.1:{proxy_port}",
            "--cacert",
            ca_path,
            "--max-time",
            str(SOCKET_TIMEOUT),
            f"https://localhost:{origin_port}/",
        ]

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                args, capture_output=True, env=_clean_env(), timeout=SOCKET_TIMEOUT + 5
            )

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout, TLS_BODY)

        return deferToThread(run).addCallback(check)

    def test_python_ssl_through_tunnel(self) -> Deferred[None]:
        """Python's ssl module, over a raw-socket CONNECT, gets the HTTPS origin's response."""
        proxy_port = self.start_proxy()
        origin_port, ca_path = self.start_tls_origin()

        def run() -> bytes:
            sock, reader = open_tunnel(proxy_port, f"localhost:{origin_port}")
            with sock:
                assert reader.buf == b"", reader.buf
                context = ssl.create_default_context(cafile=ca_path)
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(
                        b"GET / HTTP/1.1\r\nHost: localhost:%d\r\n"
                        b"Connection: close\r\n\r\n" % origin_port
                    )
                    return SockReader(tls).read_to_eof()

        def check(raw: bytes) -> None:
            status, fields, body = parse_response(raw)
            self.assertEqual(status, 200)
            self.assertEqual(body, TLS_BODY)

        return deferToThread(run).addCallback(check)


class ConnectRelayTests(TunnelIntegrationTestCase):
    """Bytes cross a CONNECT tunnel intact, in order and with half-closes passed on."""

    def test_20mb_each_way(self) -> Deferred[None]:
        """20 MB go each way through one tunnel at once and hash the same at the far end."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(Bulk)

        def send(sock: socket.socket) -> None:
            for piece in bulk_chunks(b"up"):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)

        def receive(sock: socket.socket, reader: SockReader) -> tuple[int, str]:
            digest = hashlib.sha256(reader.buf)
            count = len(reader.buf)
            while data := sock.recv(CHUNK):
                count += len(data)
                digest.update(data)
            return count, digest.hexdigest()

        def transfer(tunnel: tuple[socket.socket, SockReader]) -> Deferred[list[Any]]:
            sock, reader = tunnel
            self.addCleanup(sock.close)
            return gather(deferToThread(send, sock), deferToThread(receive, sock, reader))

        def check(results: list[Any]) -> None:
            (_, received), at_origin = results
            self.assertEqual(received, (BULK, bulk_digest(b"down")))
            self.assertEqual(at_origin, (BULK, bulk_digest(b"up")))

        tunnel = deferToThread(open_tunnel, proxy_port, f"127.0.0.1:{origin_port}")
        return gather(tunnel.addCallback(transfer), origin.done).addCallback(check)

    def test_early_bytes_in_connect_segment(self) -> Deferred[None]:
        """Payload sent in the same send() as the CONNECT head reaches the origin intact."""
        proxy_port = self.start_proxy()
        payload = b"\x16\x03\x01early bytes\r\n\r\nthat look like a head" * 3
        origin, origin_port = self.start_origin(ReplyWhenComplete, expected=len(payload))

        def run() -> bytes:
            with dial(proxy_port) as sock:
                sock.sendall(connect_head(f"127.0.0.1:{origin_port}") + payload)
                return SockReader(sock).read_to_eof()

        def check(results: list[Any]) -> None:
            raw, at_origin = results
            self.assertEqual(at_origin, payload)
            self.assertEqual(raw, ESTABLISHED + b"got:" + payload)

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_server_speaks_first(self) -> Deferred[None]:
        """An origin's banner, sent before the client says anything, reaches the client."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(Banner)

        def run() -> tuple[bytes, bytes]:
            sock, reader = open_tunnel(proxy_port, f"127.0.0.1:{origin_port}")
            with sock:
                banner = reader.read_until(b"\r\n")
                sock.sendall(b"QUIT\r\n")
                return banner, reader.read_to_eof()

        def check(results: list[Any]) -> None:
            (banner, rest), at_origin = results
            self.assertEqual(banner, b"220 origin ready\r\n")
            self.assertEqual(rest, b"221 bye\r\n")
            self.assertEqual(at_origin, b"QUIT\r\n")

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_client_half_close(self) -> Deferred[None]:
        """A client's SHUT_WR reaches the origin as EOF, and the origin's reply still arrives."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(ReplyAtEof)
        request = b"all I have to say" * 1000

        def run() -> bytes:
            sock, reader = open_tunnel(proxy_port, f"127.0.0.1:{origin_port}")
            with sock:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                return reader.read_to_eof()

        def check(results: list[Any]) -> None:
            reply, at_origin = results
            self.assertEqual(at_origin, request)
            self.assertEqual(reply, b"reply:" + request)

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_origin_half_close(self) -> Deferred[None]:
        """After the origin shuts down its write side, the client sees EOF and can still send."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(HalfCloseFirst)
        late = b"the client is still talking\n" * 1000

        def run() -> bytes:
            sock, reader = open_tunnel(proxy_port, f"127.0.0.1:{origin_port}")
            with sock:
                heard = reader.read_to_eof()
                sock.sendall(late)
                sock.shutdown(socket.SHUT_WR)
                return heard

        def check(results: list[Any]) -> None:
            heard, at_origin = results
            self.assertEqual(heard, b"origin has spoken\n")
            self.assertEqual(at_origin, late)

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_early_bytes_beyond_hold_limit_then_half_close(self) -> Deferred[None]:
        """A CONNECT head, 1 MB of payload and SHUT_WR sent at once all reach the origin."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(ReplyAtEof)
        payload = os.urandom(1024 * 1024)

        def run() -> bytes:
            with dial(proxy_port) as sock:
                sock.sendall(connect_head(f"127.0.0.1:{origin_port}") + payload)
                sock.shutdown(socket.SHUT_WR)
                return SockReader(sock).read_to_eof()

        def check(results: list[Any]) -> None:
            raw, at_origin = results
            self.assertEqual(len(at_origin), len(payload))
            self.assertTrue(at_origin == payload, "payload corrupted")
            self.assertTrue(raw == ESTABLISHED + b"reply:" + payload, "reply corrupted")

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_ipv6_loopback(self) -> Deferred[None]:
        """A CONNECT to [::1]:port reaches an origin listening on the IPv6 loopback."""
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        proxy_port = self.start_proxy()
        origin = OriginFactory(Banner, self.tracker)
        try:
            origin_port = self.listen(origin, r"tcp6:0:interface=\:\:1")
        except Exception as e:  # pragma: no cover - depends on the host
            self.skipTest(f"cannot listen on ::1: {e}")

        def run() -> tuple[bytes, bytes]:
            sock, reader = open_tunnel(proxy_port, f"[::1]:{origin_port}")
            with sock:
                banner = reader.read_until(b"\r\n")
                sock.sendall(b"QUIT\r\n")
                return banner, reader.read_to_eof()

        def check(results: list[Any]) -> None:
            (banner, rest), at_origin = results
            self.assertEqual((banner, rest), (b"220 origin ready\r\n", b"221 bye\r\n"))
            self.assertEqual(at_origin, b"QUIT\r\n")

        return gather(deferToThread(run), origin.done).addCallback(check)

    def test_silent_tunnel_closed_after_idle_timeout(self) -> Deferred[None]:
        """A tunnel with no traffic is closed by the proxy after tunnel_idle_timeout."""
        proxy_port = self.start_proxy(ProxyConfig(connect_ports=None, tunnel_idle_timeout=0.5))
        origin, origin_port = self.start_origin(Origin)
        client = _SilentClient(connect_head(f"127.0.0.1:{origin_port}"), self.tracker)
        connected = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port), client)

        def check(results: list[Any]) -> None:
            _, seen, at_origin = results
            self.assertEqual(seen, ESTABLISHED)
            self.assertEqual(at_origin, b"")

        return gather(connected, client.lost, origin.done).addCallback(check)


class _SilentClient(Protocol):
    """Sends a CONNECT head, then nothing; C{lost} fires with what it received."""

    transport: Any

    def __init__(self, head: bytes, tracker: Tracker) -> None:
        self.head = head
        self.tracker = tracker
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.tracker.opened(self)
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.tracker.closed(self)
        self.lost.callback(self.received)


class ConnectRefusalTests(TunnelIntegrationTestCase):
    """CONNECTs the proxy cannot or will not open are answered, then the connection closes."""

    def test_port_not_allowed(self) -> Deferred[None]:
        """With the default config a CONNECT to a port other than 443 gets a 403 and a close."""
        proxy_port = self.start_proxy(ProxyConfig())
        origin, origin_port = self.start_origin(Origin)

        def run() -> bytes:
            with dial(proxy_port) as sock:
                sock.sendall(connect_head(f"127.0.0.1:{origin_port}"))
                return SockReader(sock).read_to_eof()

        def check(raw: bytes) -> None:
            status, fields, body = parse_response(raw)
            self.assertEqual(status, 403)
            self.assertTrue(
                fields["proxy-status"].startswith("aproxy; error=http_request_denied"),
                fields,
            )
            self.assertIn(b"--connect-ports", body)
            self.assertEqual(int(fields["content-length"]), len(body))
            self.assertEqual(origin.connections, 0)

        return deferToThread(run).addCallback(check)

    def test_refused_port(self) -> Deferred[None]:
        """A CONNECT to a loopback port nobody listens on gets a 502 and a close."""
        proxy_port = self.start_proxy()

        def run(port: int) -> bytes:
            with dial(proxy_port) as sock:
                sock.sendall(connect_head(f"127.0.0.1:{port}"))
                return SockReader(sock).read_to_eof()

        def check(raw: bytes) -> None:
            status, fields, body = parse_response(raw)
            self.assertEqual(status, 502)
            self.assertIn("error=connection_refused", fields["proxy-status"])
            self.assertEqual(int(fields["content-length"]), len(body))

        def fetch(port: int) -> Deferred[bytes]:
            return deferToThread(run, port)

        return self.unused_port().addCallback(fetch).addCallback(check)


class WebSocketTests(TunnelIntegrationTestCase):
    """WebSocket connections work through an absolute-form Upgrade and through CONNECT."""

    def test_upgrade_absolute_form(self) -> Deferred[None]:
        """An absolute-form Upgrade: websocket gets the origin's 101, then frames echo both ways."""
        return self.upgrade(b"http")

    def test_upgrade_ws_scheme(self) -> Deferred[None]:
        """
        The same with a ws:// target, as aiohttp sends it to a proxy (RFC 6455 section 3:
        reached as its http:// counterpart).
        """
        return self.upgrade(b"ws")

    def upgrade(self, scheme: bytes) -> Deferred[None]:
        """An absolute-form Upgrade to an echo server with a C{scheme}:// target."""
        ws_port = self.start_ws_origin()
        proxy_port = self.start_proxy()
        key = base64.b64encode(os.urandom(16))
        messages = ["hello", "wörld", "m" * 300, "x" * 70000]

        def run() -> tuple[bytes, list[tuple[bool, int, bool, bytes]], bytes]:
            with dial(proxy_port) as sock:
                sock.sendall(
                    b"GET %s://127.0.0.1:%d/chat HTTP/1.1\r\n"
                    b"Host: 127.0.0.1:%d\r\n"
                    b"Connection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: %s\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n" % (scheme, ws_port, ws_port, key)
                )
                reader = SockReader(sock)
                head = reader.read_until(b"\r\n\r\n")
                frames = []
                for text in messages:
                    sock.sendall(ws_frame(0x1, text.encode()))
                    frames.append(read_ws_frame(reader))
                sock.sendall(ws_frame(0x8, (1000).to_bytes(2, "big")))
                frames.append(read_ws_frame(reader))
                return head, frames, reader.read_to_eof()

        def check(result: tuple[bytes, list[tuple[bool, int, bool, bytes]], bytes]) -> None:
            head, frames, rest = result
            status, fields, _ = parse_response(head)
            self.assertEqual(status, 101)
            self.assertEqual(fields["upgrade"].lower(), "websocket")
            self.assertIn("upgrade", fields["connection"].lower())
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
            self.assertEqual(fields["sec-websocket-accept"], accept)
            expected = [(True, 0x1, False, m.encode()) for m in messages]
            self.assertEqual(frames[:-1], expected)
            fin, opcode, masked, payload = frames[-1]
            self.assertEqual((fin, opcode, masked, payload[:2]), (True, 0x8, False, b"\x03\xe8"))
            self.assertEqual(rest, b"")

        return deferToThread(run).addCallback(check)

    def test_websockets_client_through_connect(self) -> Deferred[None]:
        """The websockets client, told to use the proxy, talks to an echo server via CONNECT."""
        ws_port = self.start_ws_origin()
        proxy_port = self.start_proxy()
        assert ws_connect is not None

        def run() -> list[str | bytes]:
            with ws_connect(
                f"ws://127.0.0.1:{ws_port}/",
                proxy=f"http://127.0.0.1:{proxy_port}",
                open_timeout=SOCKET_TIMEOUT,
                close_timeout=SOCKET_TIMEOUT,
            ) as ws:
                echoes: list[str | bytes] = []
                for message in ("one", b"\x00two\xff", "three" * 10000):
                    ws.send(message)
                    echoes.append(ws.recv(timeout=SOCKET_TIMEOUT))
                return echoes

        def check(echoes: list[str | bytes]) -> None:
            self.assertEqual(echoes, ["one", b"\x00two\xff", "three" * 10000])

        return deferToThread(run).addCallback(check)

    def test_frames_sent_before_101(self) -> Deferred[None]:
        """A frame sent in the same send() as the Upgrade request is relayed after the 101."""
        ws_port = self.start_ws_origin()
        proxy_port = self.start_proxy()
        key = base64.b64encode(os.urandom(16))

        def run() -> tuple[bytes, tuple[bool, int, bool, bytes], tuple[bool, int, bool, bytes]]:
            with dial(proxy_port) as sock:
                sock.sendall(
                    b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n"
                    b"Host: 127.0.0.1:%d\r\n"
                    b"Connection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: %s\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                    % (ws_port, ws_port, key)
                    + ws_frame(0x1, b"early")
                )
                reader = SockReader(sock)
                head = reader.read_until(b"\r\n\r\n")
                echo = read_ws_frame(reader)
                sock.sendall(ws_frame(0x8, (1000).to_bytes(2, "big")))
                return head, echo, read_ws_frame(reader)

        def check(
            result: tuple[bytes, tuple[bool, int, bool, bytes], tuple[bool, int, bool, bytes]],
        ) -> None:
            head, echo, close = result
            self.assertEqual(parse_response(head)[0], 101)
            self.assertEqual(echo, (True, 0x1, False, b"early"))
            self.assertEqual(close[:3], (True, 0x8, False))

        return deferToThread(run).addCallback(check)

    def test_origin_bytes_in_101_segment(self) -> Deferred[None]:
        """Bytes an origin sends in the same segment as its 101 reach the client after it."""
        proxy_port = self.start_proxy()
        origin, origin_port = self.start_origin(UpgradeEcho)

        def run() -> tuple[bytes, bytes, bytes, bytes]:
            with dial(proxy_port) as sock:
                sock.sendall(
                    b"GET http://127.0.0.1:%d/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                    b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\n" % (origin_port, origin_port)
                )
                reader = SockReader(sock)
                head = reader.read_until(b"\r\n\r\n")
                greeting = reader.read_until(b"\n")
                sock.sendall(b"ping\n")
                echo = reader.read_until(b"\n")
                sock.shutdown(socket.SHUT_WR)
                return head, greeting, echo, reader.read_to_eof()

        def check(results: list[Any]) -> None:
            (head, greeting, echo, rest), at_origin = results
            status, fields, _ = parse_response(head)
            self.assertEqual((status, fields["upgrade"]), (101, "echo"))
            self.assertEqual((greeting, echo, rest), (b"hello after 101\n", b"ping\n", b""))
            request, _, after = at_origin.partition(b"\r\n\r\n")
            lines = request.split(b"\r\n")
            self.assertEqual(lines[0], b"GET /up HTTP/1.1")
            self.assertIn(b"Upgrade: echo", lines)
            self.assertIn(b"Connection: Upgrade", lines)
            self.assertEqual(after, b"ping\n")

        return gather(deferToThread(run), origin.done).addCallback(check)
