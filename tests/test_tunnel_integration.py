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
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from aproxy.config import ProxyConfig
from tests.tunnels import (
    BULK,
    CHUNK,
    CONNECTION_DONE,
    ESTABLISHED,
    SOCKET_TIMEOUT,
    TLS_BODY,
    WS_GUID,
    Banner,
    Bulk,
    HalfCloseFirst,
    Origin,
    OriginFactory,
    ReplyAtEof,
    ReplyWhenComplete,
    SockReader,
    Tracker,
    TunnelIntegrationTestCase,
    UpgradeEcho,
    bulk_chunks,
    bulk_digest,
    clean_env,
    connect_head,
    dial,
    gather,
    open_tunnel,
    parse_response,
    reactor,
    read_ws_frame,
    ws_frame,
)

try:
    from websockets.sync.client import connect as ws_connect
except ImportError:  # pragma: no cover - websockets is a test extra
    ws_connect = None  # type: ignore[assignment]


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
                args, capture_output=True, env=clean_env(), timeout=SOCKET_TIMEOUT + 5
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
