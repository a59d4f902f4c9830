"""
Loopback integration tests: a real origin (L{tests.origin}) and real clients (raw sockets,
C{http.client}, curl) through a real listening L{ProxyFactory}, on the real reactor.

Blocking clients run in threads (C{deferToThread}) so the reactor keeps serving the proxy
and the origin meanwhile; every socket they open has a timeout shorter than the test's, so
a proxy bug shows up as a clear client error rather than a hung run. Every listening port
and every connection the proxy or the origin accepts or makes is closed by a cleanup, and
the cleanups wait until the reactor has really let go of them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from aproxy import ProxyConfig, ProxyFactory, makeService
from tests.loopback import CLIENT_TIMEOUT, LOCAL, RawClient, Response, exchange, get
from tests.origin import (
    Origin,
    OriginProtocol,
    OriginRequest,
    deterministic_chunks,
    echo,
    respond,
    stream,
)
from tests.tracking import ConnectionTracking

BIG = 50 * 1024 * 1024
HOP_BY_HOP_REQUEST = {
    "Proxy-Connection": "keep-alive",
    "Keep-Alive": "timeout=5",
    "Connection": "keep-alive, X-Hop",
    "X-Hop": "secret",
    "X-End": "kept",
}

_expected_digests: dict[int, str] = {}


def expected_sha256(total: int) -> str:
    """The SHA-256 of C{deterministic_chunks(total)}, computed once per size."""
    if total not in _expected_digests:
        h = hashlib.sha256()
        for piece in deterministic_chunks(total):
            h.update(piece)
        _expected_digests[total] = h.hexdigest()
    return _expected_digests[total]


def has_ipv6_loopback() -> bool:
    """Whether this machine can bind a TCP socket on C{::1}."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- blocking clients (run in threads) -----------------------------------------------------


def exchange_keepalive(port: int, data: bytes) -> Response:
    """Send C{data} on a new connection, read one response and close the connection."""
    with RawClient(port) as c:
        c.send(data)
        return c.read_response()


def http_client_get(port: int, urls: list[str], headers: dict[str, str]) -> list[Any]:
    """GET each URL through the proxy on one C{http.client} connection; return the results."""
    conn = http.client.HTTPConnection(LOCAL, port, timeout=CLIENT_TIMEOUT)
    results = []
    try:
        for url in urls:
            conn.request("GET", url, headers=headers)
            resp = conn.getresponse()
            results.append((resp.status, resp.getheaders(), resp.read()))
    finally:
        conn.close()
    return results


def upload(port: int, url: str, total: int, chunked: bool) -> tuple[str, int, bytes]:
    """
    POST C{total} deterministic bytes through the proxy, hashing them as they are sent.

    @return: The client's SHA-256, the response status and the response body.
    """
    h = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for piece in deterministic_chunks(total):
            h.update(piece)
            yield piece

    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(total)
    conn = http.client.HTTPConnection(LOCAL, port, timeout=CLIENT_TIMEOUT)
    try:
        # Without a Content-Length, http.client sends an iterable body chunked.
        conn.request("POST", url, body=body(), headers=headers)
        resp = conn.getresponse()
        return h.hexdigest(), resp.status, resp.read()
    finally:
        conn.close()


def download(port: int, url: str) -> tuple[int, str | None, int, str]:
    """GET C{url} through the proxy, hashing the body as it arrives; keep none of it."""
    conn = http.client.HTTPConnection(LOCAL, port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        h = hashlib.sha256()
        n = 0
        while piece := resp.read(65536):
            h.update(piece)
            n += len(piece)
        return resp.status, resp.getheader("Content-Length"), n, h.hexdigest()
    finally:
        conn.close()


# -- origin handlers -------------------------------------------------------------------------


def routes(table: dict[bytes, Callable[[OriginRequest, OriginProtocol], None]]) -> Any:
    """A handler dispatching on the target's path (query excluded), falling back to echo."""

    def handler(request: OriginRequest, proto: OriginProtocol) -> None:
        table.get(request.target.split(b"?")[0], echo)(request, proto)

    return handler


def report_body(request: OriginRequest, proto: OriginProtocol) -> None:
    """Answer with the length and SHA-256 of the request body the origin received."""
    respond(proto, b"%d %s" % (request.body_length, request.body_sha256.encode("ascii")))


def write(data: bytes, close: bool = False) -> Callable[[OriginRequest, OriginProtocol], None]:
    """A handler that writes C{data} verbatim (and optionally closes)."""

    def handler(request: OriginRequest, proto: OriginProtocol) -> None:
        proto.transport.write(data)
        if close:
            proto.transport.loseConnection()

    return handler


def never_answer(request: OriginRequest, proto: OriginProtocol) -> None:
    """Accept the request and say nothing."""


class IntegrationTests(ConnectionTracking, TestCase):
    """The proxy between real sockets on the loopback interface."""

    timeout = 30

    # -- fixtures ---------------------------------------------------------------------------

    @inlineCallbacks
    def listen(self, factory: Factory[Any], interface: str = LOCAL) -> Generator[Any, Any, int]:
        """Listen with C{factory} on an ephemeral loopback port; return the port number."""
        if ":" in interface:
            description = "tcp6:0:interface=" + interface.replace(":", "\\:")
        else:
            description = "tcp:0:interface=" + interface
        port = yield serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inlineCallbacks
    def start_origin(
        self, handler: Any = echo, name: bytes = b"origin", interface: str = LOCAL
    ) -> Generator[Any, Any, tuple[Origin, int]]:
        """Start a test origin; return it and its port."""
        origin = Origin(name, handler)
        self.track(origin)
        port = yield self.listen(origin, interface)
        return origin, port

    @inlineCallbacks
    def start_proxy(
        self, config: ProxyConfig | None = None, interface: str = LOCAL
    ) -> Generator[Any, Any, tuple[ProxyFactory, int]]:
        """
        Start a proxy; return its factory and port. The factory's C{clients} lists the
        client connections it accepted, C{upstreams} the origin connections it made.
        """
        factory = ProxyFactory(config or ProxyConfig(), reactor)
        factory.clients = self.track(factory)  # type: ignore[attr-defined]
        factory.upstreams = self.track(factory.upstream_factory)  # type: ignore[attr-defined]
        port = yield self.listen(factory, interface)
        return factory, port

    def closed_port(self) -> int:
        """A loopback port that is bound but not listening: connecting to it is refused."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])

    def assert_hop_by_hop_removed(self, request: OriginRequest, oport: int, target: bytes) -> None:
        """The origin got an origin-form target, Host from the target, Via, no hop-by-hop."""
        self.assertEqual((request.method, request.target), (b"GET", target))
        self.assertEqual(request.headers(b"host"), [b"127.0.0.1:%d" % oport])
        self.assertTrue((request.header(b"via") or b"").startswith(b"1.1 aproxy (aproxy-"))
        for name in (b"proxy-connection", b"keep-alive", b"x-hop"):
            self.assertIsNone(request.header(name), name)
        self.assertNotIn(b"x-hop", (request.header(b"connection") or b"").lower())
        self.assertEqual(request.header(b"x-end"), b"kept")

    # -- forwarding -------------------------------------------------------------------------

    @inlineCallbacks
    def test_absolute_form_get_http_client(self) -> Generator[Any, Any, None]:
        """An absolute-form GET from http.client reaches the origin cleaned of hop-by-hop fields."""
        origin, oport = yield self.start_origin()
        _, pport = yield self.start_proxy()
        url = f"http://127.0.0.1:{oport}/path?q=1"
        [(status, headers, body)] = yield deferToThread(
            http_client_get, pport, [url], HOP_BY_HOP_REQUEST
        )
        self.assertEqual(status, 200)
        self.assertEqual(body, b"origin GET /path?q=1")
        self.assertTrue(
            any(k == "Via" and v.startswith("1.1 aproxy (aproxy-") for k, v in headers), headers
        )
        [request] = origin.requests
        self.assert_hop_by_hop_removed(request, oport, b"/path?q=1")

    @inlineCallbacks
    def test_absolute_form_get_curl(self) -> Generator[Any, Any, None]:
        """A GET from curl -x reaches the origin cleaned of hop-by-hop fields and succeeds."""
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        origin, oport = yield self.start_origin()
        _, pport = yield self.start_proxy()
        args = [curl, "-sS", "--max-time", str(CLIENT_TIMEOUT), "-D", "-"]
        args += ["-x", f"http://127.0.0.1:{pport}", "--noproxy", ""]
        for name, value in HOP_BY_HOP_REQUEST.items():
            args += ["-H", f"{name}: {value}"]
        args.append(f"http://127.0.0.1:{oport}/curl?q=1")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        result = yield deferToThread(
            subprocess.run, args, capture_output=True, env=env, timeout=CLIENT_TIMEOUT + 5
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nVia: 1.1 aproxy", head)
        self.assertEqual(body, b"origin GET /curl?q=1")
        [request] = origin.requests
        self.assert_hop_by_hop_removed(request, oport, b"/curl?q=1")

    @inlineCallbacks
    def test_keep_alive_across_origins(self) -> Generator[Any, Any, None]:
        """One client connection asking origins A, B, A gets each request to its own origin."""
        a, aport = yield self.start_origin(name=b"A")
        b, bport = yield self.start_origin(name=b"B")
        proxy, pport = yield self.start_proxy()
        urls = [
            f"http://127.0.0.1:{aport}/a1",
            f"http://127.0.0.1:{bport}/b1",
            f"http://127.0.0.1:{aport}/a2",
        ]
        results = yield deferToThread(http_client_get, pport, urls, {})
        self.assertEqual(
            [(status, body) for status, _, body in results],
            [(200, b"A GET /a1"), (200, b"B GET /b1"), (200, b"A GET /a2")],
        )
        self.assertEqual([r.target for r in a.requests], [b"/a1", b"/a2"])
        self.assertEqual([r.target for r in b.requests], [b"/b1"])
        self.assertEqual(len(proxy.clients), 1)

    @inlineCallbacks
    def test_pipelined_requests_answered_in_order(self) -> Generator[Any, Any, None]:
        """Three requests written at once (one with a body) are answered strictly in order."""
        _, aport = yield self.start_origin(name=b"A")
        b, bport = yield self.start_origin(name=b"B")
        _, pport = yield self.start_proxy()
        requests = [
            get(f"http://127.0.0.1:{aport}/p1?size=1000000"),
            b"POST http://127.0.0.1:%d/p2 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % (bport, bport),
            get(f"http://127.0.0.1:{aport}/p3"),
        ]

        def client() -> list[Response]:
            with RawClient(pport) as c:
                c.send(b"".join(requests))
                return [c.read_response() for _ in requests]

        first, second, third = yield deferToThread(client)
        self.assertEqual([r.status for r in (first, second, third)], [200, 200, 200])
        self.assertEqual(len(first.body), 1000000)
        self.assertTrue(first.body.startswith(b"A GET /p1?size=1000000."))
        self.assertEqual(second.body, b"B POST /p2")
        self.assertEqual(b.requests[0].body, b"hello")
        self.assertEqual(third.body, b"A GET /p3")

    @inlineCallbacks
    def test_pipelining_client_that_does_not_read_is_not_served_ahead(
        self,
    ) -> Generator[Any, Any, None]:
        """
        A client that pipelines 20,000 requests for 4 KiB each and reads nothing gets only
        as many answers fetched as the socket buffers hold (so the proxy's memory stays
        bounded), and the next ones, in order, as it reads. Each answer completes in one
        read from the origin, the case where the next request used to start at once.
        """
        origin, oport = yield self.start_origin()
        _, pport = yield self.start_proxy()
        count, read = 20000, 2000
        size = 4096
        request = get(f"http://127.0.0.1:{oport}/p?size={size}")

        def client() -> tuple[int, list[Response]]:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(CLIENT_TIMEOUT)
            sock.connect((LOCAL, pport))
            with RawClient.wrap(sock) as c:
                payload = memoryview(request * count)
                sent = 0
                sock.setblocking(False)
                # Send what the proxy takes; stop once the origin sees no new requests.
                seen, still = -1, 0
                deadline = time.monotonic() + 15
                while still < 10 and time.monotonic() < deadline:
                    try:
                        sent += sock.send(payload[sent : sent + 65536])
                    except BlockingIOError:
                        pass
                    time.sleep(0.05)
                    now = len(origin.requests)
                    still = still + 1 if now == seen else 0
                    seen = now
                sock.settimeout(CLIENT_TIMEOUT)
                return seen, [c.read_response() for _ in range(read)]

        fetched, responses = yield deferToThread(client)
        # The kernel's socket buffers hold a few MiB: some hundreds of 4 KiB answers.
        self.assertLess(fetched, read)
        self.assertEqual([r.status for r in responses], [200] * read)
        self.assertEqual([len(r.body) for r in responses], [size] * read)
        self.assertGreaterEqual(len(origin.requests), read)

        # -- large bodies -----------------------------------------------------------------------

    @inlineCallbacks
    def _upload(self, chunked: bool) -> Generator[Any, Any, None]:
        origin, oport = yield self.start_origin(routes({b"/upload": report_body}))
        _, pport = yield self.start_proxy()
        url = f"http://127.0.0.1:{oport}/upload"
        digest, status, body = yield deferToThread(upload, pport, url, BIG, chunked)
        self.assertEqual(status, 200)
        self.assertEqual(body, b"%d %s" % (BIG, digest.encode("ascii")))
        [request] = origin.requests
        self.assertEqual((request.body_length, request.body_sha256), (BIG, digest))
        if chunked:
            self.assertEqual(request.header(b"transfer-encoding"), b"chunked")
        else:
            self.assertEqual(request.header(b"content-length"), b"%d" % BIG)

    def test_upload_content_length(self) -> Deferred[None]:
        """A 50 MB POST with Content-Length arrives intact (sha256 checked at the origin)."""
        return self._upload(chunked=False)

    def test_upload_chunked(self) -> Deferred[None]:
        """A 50 MB chunked POST arrives intact (sha256 checked at the origin)."""
        return self._upload(chunked=True)

    @inlineCallbacks
    def test_download(self) -> Generator[Any, Any, None]:
        """A 50 MB streamed response arrives intact (sha256 checked at the client)."""
        _, oport = yield self.start_origin(routes({b"/download": lambda r, p: stream(p, BIG)}))
        _, pport = yield self.start_proxy()
        expected = yield deferToThread(expected_sha256, BIG)
        result = yield deferToThread(download, pport, f"http://127.0.0.1:{oport}/download")
        self.assertEqual(result, (200, str(BIG), BIG, expected))

    # -- framing ----------------------------------------------------------------------------

    CLOSE_BODY = b"".join(deterministic_chunks(200000))

    def close_delimited(self, request: OriginRequest, proto: OriginProtocol) -> None:
        """Answer with a body delimited by closing the connection."""
        respond(proto, self.CLOSE_BODY, length=False)

    @inlineCallbacks
    def test_close_delimited_to_http11_is_chunked(self) -> Generator[Any, Any, None]:
        """A close-delimited response reaches an HTTP/1.1 client chunked, and keep-alive holds."""
        _, oport = yield self.start_origin(routes({b"/close": self.close_delimited}))
        proxy, pport = yield self.start_proxy()

        def client() -> tuple[Response, Response]:
            with RawClient(pport) as c:
                c.send(get(f"http://127.0.0.1:{oport}/close"))
                first = c.read_response()
                c.send(get(f"http://127.0.0.1:{oport}/after"))
                return first, c.read_response()

        first, second = yield deferToThread(client)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.header(b"transfer-encoding"), b"chunked")
        self.assertIsNone(first.header(b"content-length"))
        self.assertEqual(first.body, self.CLOSE_BODY)
        self.assertEqual((second.status, second.body), (200, b"origin GET /after"))
        self.assertEqual(len(proxy.clients), 1)

    @inlineCallbacks
    def test_close_delimited_to_http10_is_close_delimited(self) -> Generator[Any, Any, None]:
        """A close-delimited response reaches an HTTP/1.0 client delimited by close."""
        _, oport = yield self.start_origin(routes({b"/close": self.close_delimited}))
        _, pport = yield self.start_proxy()
        resp, rest = yield deferToThread(
            exchange, pport, get(f"http://127.0.0.1:{oport}/close", minor=0)
        )
        self.assertEqual(resp.status, 200)
        self.assertIsNone(resp.header(b"transfer-encoding"))
        self.assertIsNone(resp.header(b"content-length"))
        self.assertEqual(resp.body, self.CLOSE_BODY)
        self.assertEqual(rest, b"")

    @inlineCallbacks
    def test_no_body_for_head_204_304(self) -> Generator[Any, Any, None]:
        """HEAD (with Content-Length), 204 and 304 responses carry no body on a kept connection."""
        _, oport = yield self.start_origin(
            routes(
                {
                    b"/head": write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
                    b"/204": write(b"HTTP/1.1 204 No Content\r\n\r\n"),
                    b"/304": write(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
                }
            )
        )
        _, pport = yield self.start_proxy()
        base = f"http://127.0.0.1:{oport}"

        def client() -> list[Response]:
            with RawClient(pport) as c:
                c.send(get(base + "/head").replace(b"GET", b"HEAD", 1))
                responses = [c.read_response(b"HEAD")]
                for path in ("/204", "/304", "/after"):
                    c.send(get(base + path))
                    responses.append(c.read_response())
                return responses

        head, no_content, not_modified, after = yield deferToThread(client)
        self.assertEqual((head.status, head.header(b"content-length")), (200, b"1234"))
        self.assertEqual(no_content.status, 204)
        self.assertEqual((not_modified.status, not_modified.header(b"etag")), (304, b'"x"'))
        # Any body bytes after those heads would have been read as this response's head.
        self.assertEqual((after.status, after.body), (200, b"origin GET /after"))

    # -- interim responses ------------------------------------------------------------------

    @inlineCallbacks
    def test_expect_100_continue(self) -> Generator[Any, Any, None]:
        """An Expect: 100-continue upload gets the origin's 100 Continue, then its answer."""
        origin, oport = yield self.start_origin(routes({b"/upload": report_body}))
        _, pport = yield self.start_proxy()
        body = b"".join(deterministic_chunks(1000000))
        head = (
            b"POST http://127.0.0.1:%d/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (oport, oport, len(body))
        )

        def client() -> tuple[Response, Response]:
            with RawClient(pport) as c:
                c.send(head)
                interim = c.read_response(b"POST")
                c.send(body)
                return interim, c.read_response(b"POST")

        interim, final = yield deferToThread(client)
        self.assertEqual(interim.status, 100)
        self.assertEqual(final.status, 200)
        digest = hashlib.sha256(body).hexdigest().encode("ascii")
        self.assertEqual(final.body, b"%d %s" % (len(body), digest))
        [request] = origin.requests
        self.assertEqual(request.header(b"expect"), b"100-continue")

    @inlineCallbacks
    def test_103_early_hints_relayed(self) -> Generator[Any, Any, None]:
        """A 103 interim response reaches an HTTP/1.1 client before the final response."""
        _, oport = yield self.start_origin(
            write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            )
        )
        _, pport = yield self.start_proxy()

        def client() -> tuple[Response, Response]:
            with RawClient(pport) as c:
                c.send(get(f"http://127.0.0.1:{oport}/hints"))
                return c.read_response(), c.read_response()

        interim, final = yield deferToThread(client)
        self.assertEqual(interim.status, 103)
        self.assertEqual(interim.header(b"link"), b"</style.css>; rel=preload")
        self.assertEqual((final.status, final.body), (200, b"hello"))

    # -- errors from the origin side --------------------------------------------------------

    @inlineCallbacks
    def test_connection_refused_502(self) -> Generator[Any, Any, None]:
        """A refused origin connection gets 502 naming host:port and error=connection_refused."""
        port = self.closed_port()
        _, pport = yield self.start_proxy()
        resp, _ = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{port}/"))
        self.assertEqual(resp.status, 502)
        self.assertIn(b"127.0.0.1:%d" % port, resp.body)
        status = resp.header(b"proxy-status") or b""
        self.assertTrue(status.startswith(b"aproxy; error=connection_refused"), status)

    @inlineCallbacks
    def test_dns_error_502(self) -> Generator[Any, Any, None]:
        """An unresolvable origin name gets 502 with Proxy-Status dns_error."""
        _, pport = yield self.start_proxy()
        resp, _ = yield deferToThread(exchange, pport, get("http://no-such-host.invalid/"))
        self.assertEqual(resp.status, 502)
        self.assertIn(b"no-such-host.invalid", resp.body)
        status = resp.header(b"proxy-status") or b""
        self.assertTrue(status.startswith(b"aproxy; error=dns_error"), status)

    @inlineCallbacks
    def test_origin_silent_504(self) -> Generator[Any, Any, None]:
        """An origin that accepts the request but never answers gets 504 after read_timeout."""
        origin, oport = yield self.start_origin(never_answer)
        _, pport = yield self.start_proxy(ProxyConfig(read_timeout=0.5))
        resp, rest = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{oport}/"))
        self.assertEqual(resp.status, 504)
        self.assertEqual(rest, b"")
        self.assertEqual(len(origin.requests), 1)

    @inlineCallbacks
    def test_garbage_response_502(self) -> Generator[Any, Any, None]:
        """An origin that answers with something that is not HTTP gets 502."""
        _, oport = yield self.start_origin(write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
        _, pport = yield self.start_proxy()
        resp, rest = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{oport}/"))
        self.assertEqual(resp.status, 502)
        self.assertEqual(rest, b"")

    @inlineCallbacks
    def test_response_with_cl_and_te_502(self) -> Generator[Any, Any, None]:
        """A response with both Content-Length and Transfer-Encoding gets 502."""
        _, oport = yield self.start_origin(
            write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
        )
        _, pport = yield self.start_proxy()
        resp, rest = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{oport}/"))
        self.assertEqual(resp.status, 502)
        self.assertNotIn(b"hello", resp.body + rest)

    @inlineCallbacks
    def test_origin_closes_mid_body(self) -> Generator[Any, Any, None]:
        """An origin closing inside a Content-Length body makes the proxy close the client too."""
        partial = b"x" * 1000
        _, oport = yield self.start_origin(
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + partial, close=True)
        )
        _, pport = yield self.start_proxy()

        def client() -> tuple[Response, bytes]:
            with RawClient(pport) as c:
                c.send(get(f"http://127.0.0.1:{oport}/"))
                return c.read_head(), c.read_to_close()

        resp, body = yield deferToThread(client)
        self.assertEqual((resp.status, resp.header(b"content-length")), (200, b"100000"))
        self.assertEqual(body, partial)

    # -- errors from the client side --------------------------------------------------------

    @inlineCallbacks
    def test_origin_form_400(self) -> Generator[Any, Any, None]:
        """An origin-form request gets 400 explaining that this is a forward proxy."""
        origin, oport = yield self.start_origin()
        _, pport = yield self.start_proxy()
        resp, rest = yield deferToThread(
            exchange, pport, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % oport
        )
        self.assertEqual(resp.status, 400)
        self.assertIn(b"forward proxy", resp.body)
        self.assertEqual(rest, b"")
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_header_timeout_408(self) -> Generator[Any, Any, None]:
        """A client that sends half a head gets 408 after header_timeout and is closed."""
        _, pport = yield self.start_proxy(ProxyConfig(header_timeout=0.5))
        resp, rest = yield deferToThread(
            exchange, pport, b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127"
        )
        self.assertEqual(resp.status, 408)
        self.assertEqual(resp.header(b"connection"), b"close")
        self.assertEqual(rest, b"")

    @inlineCallbacks
    def _rejected(
        self, request: bytes, status: int, config: ProxyConfig | None = None
    ) -> Generator[Any, Any, Origin]:
        """
        Send C{request} (C{{O}} in it stands for the origin's port); the proxy must answer
        C{status}, close the connection and never forward a complete request.
        """
        origin: Origin
        origin, oport = yield self.start_origin()
        _, pport = yield self.start_proxy(config)
        resp, rest = yield deferToThread(exchange, pport, request.replace(b"{O}", b"%d" % oport))
        self.assertEqual(resp.status, status, resp.body)
        self.assertEqual(resp.header(b"connection"), b"close")
        self.assertEqual(rest, b"")
        self.assertEqual(origin.requests, [])
        return origin

    @inlineCallbacks
    def test_reject_cl_and_te(self) -> Generator[Any, Any, None]:
        """A request with both Content-Length and Transfer-Encoding gets 400 and a close."""
        origin = yield self._rejected(
            b"POST http://127.0.0.1:{O}/ HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        )
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_reject_bad_chunk_size(self) -> Generator[Any, Any, None]:
        """A request body with a malformed chunk size gets 400 and a close."""
        # The head is valid and forwarded before the body arrives; the origin never gets
        # a complete request.
        yield self._rejected(
            b"POST http://127.0.0.1:{O}/ HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            400,
        )

    @inlineCallbacks
    def test_reject_unknown_transfer_coding(self) -> Generator[Any, Any, None]:
        """A request with an unknown transfer coding gets 501."""
        origin = yield self._rejected(
            b"POST http://127.0.0.1:{O}/ HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n"
            b"Transfer-Encoding: bogus, chunked\r\n\r\n0\r\n\r\n",
            501,
        )
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_reject_http2(self) -> Generator[Any, Any, None]:
        """An HTTP/2.0 request line gets 505."""
        origin = yield self._rejected(
            b"GET http://127.0.0.1:{O}/ HTTP/2.0\r\nHost: 127.0.0.1:{O}\r\n\r\n", 505
        )
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_reject_long_request_line(self) -> Generator[Any, Any, None]:
        """A request line longer than max_request_line gets 414."""
        # One write, small enough to be read at once: the proxy consumes it all before
        # closing, so the close is a clean FIN, not a reset that could eat the response.
        origin = yield self._rejected(
            b"GET http://127.0.0.1:{O}/"
            + b"a" * 9000
            + b" HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n\r\n",
            414,
            ProxyConfig(max_request_line=8000),
        )
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_reject_large_head(self) -> Generator[Any, Any, None]:
        """A request head larger than max_head_size gets 431."""
        fields = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
        origin = yield self._rejected(
            b"GET http://127.0.0.1:{O}/ HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n" + fields + b"\r\n",
            431,
            ProxyConfig(max_head_size=4096),
        )
        self.assertEqual(origin.protocols, [])

    @inlineCallbacks
    def test_reject_duplicate_host(self) -> Generator[Any, Any, None]:
        """A request with two Host fields gets 400."""
        origin = yield self._rejected(
            b"GET http://127.0.0.1:{O}/ HTTP/1.1\r\nHost: 127.0.0.1:{O}\r\n"
            b"Host: 127.0.0.1:{O}\r\n\r\n",
            400,
        )
        self.assertEqual(origin.protocols, [])

    # -- IPv6, service, pool ----------------------------------------------------------------

    @inlineCallbacks
    def test_ipv6(self) -> Generator[Any, Any, None]:
        """A proxy on ::1 reaches an origin on ::1 given as http://[::1]:PORT/."""
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback on this machine")
        origin, oport = yield self.start_origin(interface="::1")
        _, pport = yield self.start_proxy(interface="::1")

        def client() -> Response:
            with RawClient(pport, host="::1") as c:
                c.send(get(f"http://[::1]:{oport}/v6"))
                return c.read_response()

        resp = yield deferToThread(client)
        self.assertEqual((resp.status, resp.body), (200, b"origin GET /v6"))
        [request] = origin.requests
        self.assertEqual(request.header(b"host"), b"[::1]:%d" % oport)

    @inlineCallbacks
    def test_haproxy_listener_uses_real_client_address(self) -> Generator[Any, Any, None]:
        """Behind a PROXY protocol listener, --allow and X-Forwarded-For see the real client."""
        origin, oport = yield self.start_origin()
        config = ProxyConfig(
            port=("haproxy:tcp:0:interface=127.0.0.1",),
            allow=("10.0.0.0/8",),
            proxy_protocol_from=("127.0.0.1",),
            x_forwarded_for="add",
        )
        service = makeService(config)
        self.track(service.factory)  # type: ignore[attr-defined]
        self.track(service.factory.upstream_factory)  # type: ignore[attr-defined]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        [child] = list(service)  # type: ignore[call-overload]
        pport = child.port.getHost().port
        request = get(f"http://127.0.0.1:{oport}/ha", extra=b"Connection: close\r\n")
        v2_header = (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            + socket.inet_aton("10.9.8.7")
            + socket.inet_aton("127.0.0.1")
            + (4444).to_bytes(2, "big")
            + pport.to_bytes(2, "big")
        )

        def client(header: bytes) -> bytes:
            with socket.create_connection((LOCAL, pport), timeout=20) as sock:
                sock.sendall(header + request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        v1 = yield deferToThread(client, b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 %d\r\n" % pport)
        self.assertTrue(v1.startswith(b"HTTP/1.1 200 OK"), v1)
        v2 = yield deferToThread(client, v2_header)
        self.assertTrue(v2.startswith(b"HTTP/1.1 200 OK"), v2)
        refused = yield deferToThread(client, b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 %d\r\n" % pport)
        self.assertTrue(refused.startswith(b"HTTP/1.1 403 "), refused)
        seen = [r.header(b"x-forwarded-for") for r in origin.requests]
        self.assertEqual(seen, [b"10.1.2.3", b"10.9.8.7"])

    @inlineCallbacks
    def test_unix_socket_listener(self) -> Generator[Any, Any, None]:
        """makeService listens on a unix: endpoint description and serves requests there."""
        _, oport = yield self.start_origin()
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "aproxy.sock")
        service = makeService(ProxyConfig(port=(f"unix:{path}",)))
        self.track(service.factory)  # type: ignore[attr-defined]
        self.track(service.factory.upstream_factory)  # type: ignore[attr-defined]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)

        def client() -> bytes:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(20)
                sock.connect(path)
                sock.sendall(get(f"http://127.0.0.1:{oport}/unix", extra=b"Connection: close\r\n"))
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        data = yield deferToThread(client)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertTrue(data.endswith(b"origin GET /unix"))
        yield service.stopService()

    @inlineCallbacks
    def test_make_service_starts_and_stops(self) -> Generator[Any, Any, None]:
        """makeService gives an IService that listens when started and stops listening."""
        _, oport = yield self.start_origin()
        service = makeService(ProxyConfig(port=("tcp:0:interface=127.0.0.1",)))
        self.assertTrue(IService.providedBy(service))
        self.track(service.factory)  # type: ignore[attr-defined]
        self.track(service.factory.upstream_factory)  # type: ignore[attr-defined]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        self.assertTrue(service.running)
        [child] = list(service)  # type: ignore[call-overload]
        port = child.port
        pport = port.getHost().port
        resp = yield deferToThread(exchange_keepalive, pport, get(f"http://127.0.0.1:{oport}/svc"))
        self.assertEqual((resp.status, resp.body), (200, b"origin GET /svc"))
        yield service.stopService()
        self.assertFalse(service.running)
        self.assertFalse(port.connected)

    @inlineCallbacks
    def test_pool_reuses_origin_connection(self) -> Generator[Any, Any, None]:
        """Sequential requests from two client connections share one pooled origin connection."""
        origin, oport = yield self.start_origin()
        proxy, pport = yield self.start_proxy()

        def clients() -> list[Response]:
            return [
                exchange_keepalive(pport, get(f"http://127.0.0.1:{oport}/{n}"))
                for n in ("one", "two")
            ]

        first, second = yield deferToThread(clients)
        self.assertEqual((first.status, first.body), (200, b"origin GET /one"))
        self.assertEqual((second.status, second.body), (200, b"origin GET /two"))
        self.assertEqual(len(proxy.clients), 2)
        self.assertEqual(len(origin.protocols), 1)
        self.assertEqual([r.target for r in origin.protocols[0].requests], [b"/one", b"/two"])

    @inlineCallbacks
    def test_pool_retries_stale_connection(self) -> Generator[Any, Any, None]:
        """A pooled connection the origin drops on the next GET is retried on a fresh one."""

        def once_per_connection(request: OriginRequest, proto: OriginProtocol) -> None:
            # The origin's idle close crossing the next request: it reads it and hangs up.
            if len(proto.requests) > 1:
                proto.transport.loseConnection()
            else:
                echo(request, proto)

        origin, oport = yield self.start_origin(once_per_connection)
        _, pport = yield self.start_proxy()

        def clients() -> list[Response]:
            return [
                exchange_keepalive(pport, get(f"http://127.0.0.1:{oport}/{n}"))
                for n in ("one", "two")
            ]

        first, second = yield deferToThread(clients)
        self.assertEqual((first.status, first.body), (200, b"origin GET /one"))
        self.assertEqual((second.status, second.body), (200, b"origin GET /two"))
        self.assertEqual(len(origin.protocols), 2)
        self.assertEqual([r.target for r in origin.requests], [b"/one", b"/two", b"/two"])

    @inlineCallbacks
    def test_pool_origin_closed_idle_connection(self) -> Generator[Any, Any, None]:
        """After the origin closes an idle pooled connection, the next GET still succeeds."""

        def answer_and_close(request: OriginRequest, proto: OriginProtocol) -> None:
            # A keep-alive response, then the origin closes the idle connection unannounced.
            echo(request, proto)
            proto.transport.loseConnection()

        origin, oport = yield self.start_origin(answer_and_close)
        _, pport = yield self.start_proxy()

        def clients() -> list[Response]:
            return [
                exchange_keepalive(pport, get(f"http://127.0.0.1:{oport}/{n}"))
                for n in ("one", "two")
            ]

        first, second = yield deferToThread(clients)
        self.assertEqual((first.status, first.body), (200, b"origin GET /one"))
        self.assertEqual((second.status, second.body), (200, b"origin GET /two"))
        self.assertEqual(len(origin.protocols), 2)
