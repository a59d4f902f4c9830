"""
TLS interception: which tunnels are intercepted, requests inside an intercepted session,
and real clients through a proxy with a CA made at test time (loopback only).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aproxy.access.policy import HostPatterns
from aproxy.config import ProxyConfig
from aproxy.errors import BadRequest, Forbidden, MisdirectedRequest
from aproxy.http.head import parse_request_head
from aproxy.intercept import session as session_module
from aproxy.intercept.hello import Hello
from aproxy.intercept.session import InterceptedSession, Interceptor
from aproxy.observe.records import Exchange
from tests.tlsharness import CREDENTIALS, USER, TLSTestCase
from tests.tunnels import (
    TLS_BODY,
    Banner,
    ReplyWhenComplete,
    SockReader,
    TrackingProxyFactory,
    connect_head,
    dial,
    open_tunnel,
    parse_response,
)


def interceptor(intercept: tuple[str, ...], exempt: tuple[str, ...] = ()) -> Interceptor:
    """An interceptor with no certificates (the decisions need none)."""
    return Interceptor(None, HostPatterns(intercept), HostPatterns(exempt))  # type: ignore[arg-type]


class DecisionTests(SynchronousTestCase):
    """The table of which tunnels are intercepted, by CONNECT host, SNI and ALPN."""

    def test_wants(self) -> None:
        """A matching name, or any IP address (its SNI decides); never an exempt one."""
        chooser = interceptor(("*.example.com",), ("pinned.example.com",))
        self.assertTrue(chooser.wants("a.example.com"))
        self.assertFalse(chooser.wants("example.org"))
        self.assertFalse(chooser.wants("pinned.example.com"))
        self.assertTrue(chooser.wants("192.0.2.1"))
        self.assertTrue(chooser.wants("2001:db8::1"))

    def test_name_for(self) -> None:
        """The decision table of the issue."""
        chooser = interceptor(("*.example.com", "198.51.100.0/24"), ("pinned.example.com",))
        cases: list[tuple[str, Hello, str | None]] = [
            ("a.example.com", Hello("a.example.com", (b"h2", b"http/1.1")), "a.example.com"),
            ("a.example.com", Hello(None, ()), "a.example.com"),
            ("A.Example.com.", Hello("a.example.com", ()), "a.example.com"),
            ("a.example.com", Hello("a.example.com", (b"h2",)), None),
            ("192.0.2.1", Hello("b.example.com", ()), "b.example.com"),
            ("192.0.2.1", Hello("example.org", ()), None),
            ("192.0.2.1", Hello(None, ()), None),
            ("198.51.100.9", Hello(None, ()), "198.51.100.9"),
            ("192.0.2.1", Hello("pinned.example.com", ()), None),
        ]
        for host, hello, expected in cases:
            self.assertEqual(chooser.name_for(host, hello), expected, (host, hello))

    def test_sni_naming_another_host_refused(self) -> None:
        """An SNI that names another host than a CONNECT host name is refused."""
        chooser = interceptor(("*",))
        with self.assertRaises(Forbidden):
            chooser.name_for("a.example.com", Hello("b.example.com", ()))


class AbsolutizeTests(SynchronousTestCase):
    """Requests read inside a session become https:// requests for its host, or 421."""

    def session(self, name: str = "a.example", port: int = 443) -> InterceptedSession:
        """A session object without its connection (absolutize needs none)."""
        made = InterceptedSession.__new__(InterceptedSession)
        made.name, made.port = name, port
        made.authority = name if port == 443 else f"{name}:{port}"
        return made

    def head(self, raw: bytes) -> Any:
        """A parsed request head (of a complete head C{raw}, as the reader passes it)."""
        return parse_request_head(raw.removesuffix(b"\r\n\r\n"))

    def test_origin_form(self) -> None:
        """Origin form with the session's Host becomes the absolute https:// target."""
        head = self.head(b"GET /x?y HTTP/1.1\r\nHost: A.Example\r\n\r\n")
        self.session().absolutize(head)
        self.assertEqual(head.target, b"https://a.example/x?y")
        other = self.head(b"GET / HTTP/1.1\r\nHost: a.example:8443\r\n\r\n")
        self.session(port=8443).absolutize(other)
        self.assertEqual(other.target, b"https://a.example:8443/")

    def test_other_host_is_421(self) -> None:
        """A Host or absolute target naming another authority is misdirected."""
        for raw in (
            b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example:8443\r\n\r\n",
            b"GET https://b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
            b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ):
            with self.assertRaises(MisdirectedRequest, msg=raw):
                self.session().absolutize(self.head(raw))

    def test_connect_inside_refused(self) -> None:
        """A CONNECT or OPTIONS * inside a session is a 400."""
        for raw in (
            b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ):
            with self.assertRaises(BadRequest):
                self.session().absolutize(self.head(raw))


def until(condition: Callable[[], bool], limit: float = 5.0) -> Deferred[None]:
    """Fire once C{condition()} holds (checked every 20 ms), or fail after C{limit} s."""
    from twisted.internet import reactor

    d: Deferred[None] = Deferred()
    deadline = reactor.seconds() + limit

    def poll() -> None:
        if condition():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("condition not met in time"))
        else:
            reactor.callLater(0.02, poll)

    poll()
    return d


def intercepted_get(
    proxy_port: int, authority: str, ca: str, path: str = "/", host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """CONNECT, TLS verified with C{ca}, one GET (Host C{host}, by default the authority)."""
    sock = dial(proxy_port)
    with sock:
        sock.sendall(connect_head(authority))
        reader = SockReader(sock)
        head = reader.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        name = authority.rpartition(":")[0]
        with ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host or authority}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            return parse_response(SockReader(tls).read_to_eof())


class InterceptIntegrationTests(TLSTestCase):
    """A proxy with --intercept between real TLS clients and a TLS origin on loopback."""

    def setUp(self) -> None:
        super().setUp()
        self.ca_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.ca_dir, True)
        self.proxy_ca = os.path.join(self.ca_dir, "ca.pem")
        self.records: list[Exchange] = []

    def intercepting_proxy(self, **settings: Any) -> int:
        """A tracked proxy intercepting everything (by default), with its CA in ca_dir."""
        settings.setdefault("intercept", ("*",))
        settings.setdefault("ca_dir", self.ca_dir)
        settings.setdefault("ca_file", self.ca_path)
        settings.setdefault("connect_ports", None)
        factory = TrackingProxyFactory(ProxyConfig(**settings), self.tracker)
        factory.observers.append(self.records.append)
        self.factory = factory
        return self.listen(factory)

    def test_get_decrypted_verified_and_logged(self) -> Deferred[None]:
        """
        A client trusting aproxy's CA gets the origin's response through the decrypted
        session; the request goes on over verified TLS and is recorded as https://.
        """
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy()
        authority = f"localhost:{origin}"

        def check(result: tuple[int, dict[str, str], bytes]) -> Deferred[None]:
            status, fields, body = result
            self.assertEqual((status, body), (200, TLS_BODY))
            self.assertIn("aproxy", fields["via"])
            # The CONNECT's own record comes when the proxy sees the connection end.
            return until(lambda: len(self.records) >= 2).addCallback(records)

        def records(_: object) -> None:
            targets = [(r.method, r.target) for r in self.records]
            self.assertIn(("GET", f"https://{authority}/x"), targets)
            self.assertIn(("CONNECT", authority), targets)

        d = deferToThread(intercepted_get, port, authority, self.proxy_ca, "/x")
        return d.addCallback(check)

    def test_login_of_the_connect_covers_the_requests(self) -> Deferred[None]:
        """Under --auth the CONNECT logs in; the requests inside carry its user."""
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy(auth=self.auth_file())
        authority = f"localhost:{origin}"

        def client() -> tuple[int, dict[str, str], bytes]:
            sock = dial(port)
            with sock:
                sock.sendall(
                    f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                    f"Proxy-Authorization: Basic {CREDENTIALS}\r\n\r\n".encode()
                )
                reader = SockReader(sock)
                assert reader.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
                context = ssl.create_default_context(cafile=self.proxy_ca)
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(
                        f"GET /in HTTP/1.1\r\nHost: {authority}\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    return parse_response(SockReader(tls).read_to_eof())

        def check(result: tuple[int, dict[str, str], bytes]) -> None:
            self.assertEqual(result[0], 200)
            [inner] = [r for r in self.records if r.method == "GET"]
            self.assertEqual((inner.user, inner.target), (USER, f"https://{authority}/in"))

        return deferToThread(client).addCallback(check)

    def test_origin_certificate_error_is_a_502_inside(self) -> Deferred[None]:
        """The origin's certificate is still verified: a bad one is a 502 in the session."""
        origin, _ = self.tls_origin(self.ca.issue_cert("wrong.example"))
        port = self.intercepting_proxy()

        def check(result: tuple[int, dict[str, str], bytes]) -> None:
            status, fields, _ = result
            self.assertEqual(status, 502)
            self.assertIn("error=tls_certificate_error", fields["proxy-status"])

        d = deferToThread(intercepted_get, port, f"localhost:{origin}", self.proxy_ca)
        return d.addCallback(check)

    def test_host_of_another_authority_is_421(self) -> Deferred[None]:
        """Inside the session a request for another host is answered 421."""
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy()
        d = deferToThread(
            intercepted_get, port, f"localhost:{origin}", self.proxy_ca, "/", "other.example"
        )
        return d.addCallback(lambda result: self.assertEqual(result[0], 421))

    def test_client_that_rejects_the_certificate_is_logged(self) -> Deferred[None]:
        """A client that doesn't trust aproxy's CA fails; the log names --no-intercept."""
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy()
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)

        def client() -> None:
            with self.assertRaises(ssl.SSLCertVerificationError):
                intercepted_get(port, f"localhost:{origin}", self.ca_path)

        def logged() -> bool:
            return any("--no-intercept" in str(e.get("log_format", "")) for e in events)

        # The connection's end reaches the proxy a moment after the client's failure.
        return deferToThread(client).addCallback(lambda _: until(logged))

    def test_exempt_host_is_a_blind_tunnel(self) -> Deferred[None]:
        """A host --no-intercept names is relayed: the client sees the origin's own cert."""
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy(no_intercept=("localhost",))
        d = deferToThread(intercepted_get, port, f"localhost:{origin}", self.ca_path)
        return d.addCallback(lambda result: self.assertEqual(result[2], TLS_BODY))

    def test_h2_only_is_a_blind_tunnel(self) -> Deferred[None]:
        """A client offering only h2 (not spoken inside) reaches the origin's own TLS."""
        # A TLS origin of the standard library's, which ignores ALPN (Twisted's TLS server
        # refuses a client offering only h2 with an alert).
        cert = self.ca.issue_cert("localhost")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        origin = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"220 origin ready\r\n")
                tls.recv(100)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        port = self.intercepting_proxy()

        def client() -> tuple[str, bytes]:
            sock, _ = open_tunnel(port, f"localhost:{origin}")
            context = ssl.create_default_context(cafile=self.ca_path)
            context.set_alpn_protocols(["h2"])
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                issuer = str(tls.getpeercert() or {})
                banner = SockReader(tls).read_until(b"\r\n")
                tls.sendall(b"QUIT\r\n")
                return issuer, banner

        def check(result: tuple[str, bytes]) -> None:
            issuer, banner = result
            self.assertNotIn("aproxy", issuer)
            self.assertEqual(banner, b"220 origin ready\r\n")

        return deferToThread(client).addCallback(check)

    def test_not_tls_is_a_blind_tunnel(self) -> Deferred[None]:
        """A client that sends something else than TLS gets a plain relay, bytes intact."""
        _, origin = self.start_origin(ReplyWhenComplete, expected=5)
        port = self.intercepting_proxy()

        def client() -> bytes:
            sock, reader = open_tunnel(port, f"127.0.0.1:{origin}")
            with sock:
                sock.sendall(b"hello")
                return reader.read_to_eof()

        return deferToThread(client).addCallback(self.assertEqual, b"got:hello")

    @inlineCallbacks
    def test_server_speaks_first_is_a_blind_tunnel(self) -> Any:
        """A silent client (the server speaks first) is relayed after PEEK_TIMEOUT."""
        self.patch(session_module, "PEEK_TIMEOUT", 0.2)
        _, origin = self.start_origin(Banner)
        port = self.intercepting_proxy()

        def client() -> bytes:
            sock, reader = open_tunnel(port, f"127.0.0.1:{origin}")
            with sock:
                banner = reader.read_until(b"\r\n")
                sock.sendall(b"QUIT\r\n")
                return banner + reader.read_to_eof()

        got = yield deferToThread(client)
        self.assertEqual(got, b"220 origin ready\r\n221 bye\r\n")

    def test_one_certificate_per_host(self) -> Deferred[None]:
        """50 concurrent first connections to one host share one leaf certificate."""
        # (An address, not a name: 50 lookups at once from one client would pass the
        # per-client share of name lookups, a limit of its own.)
        origin, _ = self.tls_origin(self.ca.issue_cert("127.0.0.1"))
        port = self.intercepting_proxy()
        authority = f"127.0.0.1:{origin}"

        def clients() -> list[tuple[int, dict[str, str], bytes]]:
            # All connect before any handshake completes: 50 threads of our own (the
            # reactor's thread pool runs only 10 at once).
            with ThreadPoolExecutor(50) as pool:
                futures = [
                    pool.submit(intercepted_get, port, authority, self.proxy_ca) for _ in range(50)
                ]
                return [f.result() for f in futures]

        def check(results: list[tuple[int, dict[str, str], bytes]]) -> None:
            self.assertEqual([r[0] for r in results], [200] * 50)
            self.assertEqual(self.factory.runtime.interceptor.leaves.minted, 1)

        return deferToThread(clients).addCallback(check)

    def test_websockets_over_wss(self) -> Deferred[None]:
        """The websockets client over wss:// through an intercepted tunnel: Upgrade inside."""
        try:
            from websockets.sync.client import connect as ws_connect
            from websockets.sync.server import serve as ws_serve
        except ImportError:
            raise SkipTest("websockets is not installed") from None
        cert = self.ca.issue_cert("localhost")
        origin_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(origin_tls)

        def echo(ws: Any) -> None:
            for message in ws:
                ws.send(message)

        server = ws_serve(echo, "127.0.0.1", 0, ssl=origin_tls)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            thread.join()

        self.addCleanup(deferToThread, stop)
        ws_port = server.socket.getsockname()[1]
        port = self.intercepting_proxy()

        def run() -> list[str | bytes]:
            client_tls = ssl.create_default_context(cafile=self.proxy_ca)
            with ws_connect(
                f"wss://localhost:{ws_port}/",
                proxy=f"http://127.0.0.1:{port}",
                ssl=client_tls,
                open_timeout=10,
                close_timeout=10,
            ) as ws:
                echoes: list[str | bytes] = []
                for message in ("one", b"\x00two", "three" * 10000):
                    ws.send(message)
                    echoes.append(ws.recv(timeout=10))
                return echoes

        def check(echoes: list[str | bytes]) -> Deferred[None]:
            self.assertEqual(echoes, ["one", b"\x00two", "three" * 10000])
            return until(
                lambda: any(r.target.startswith("https://localhost") for r in self.records)
            )

        return deferToThread(run).addCallback(check)

    def test_reload_changes_the_patterns(self) -> None:
        """A reload takes new patterns and keeps the CA (a new CA needs a restart)."""
        self.intercepting_proxy(intercept=("a.example",))
        before = self.factory.runtime.interceptor
        self.assertTrue(before.wants("a.example"))
        self.factory.reconfigure(
            ProxyConfig(intercept=("b.example",), ca_dir=self.ca_dir, connect_ports=None)
        )
        after = self.factory.runtime.interceptor
        self.assertFalse(after.wants("a.example"))
        self.assertTrue(after.wants("b.example"))
        self.assertIs(after.leaves, before.leaves)
        self.factory.reconfigure(ProxyConfig(connect_ports=None))
        self.assertIsNone(self.factory.runtime.interceptor)

    def test_curl(self) -> Deferred[None]:
        """curl --cacert with aproxy's CA fetches through the intercepted session."""
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.intercepting_proxy()

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    "--cacert",
                    self.proxy_ca,
                    "-x",
                    f"http://127.0.0.1:{port}",
                    f"https://localhost:{origin}/",
                ],
                capture_output=True,
                check=False,
            )

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout, TLS_BODY)

        return deferToThread(run).addCallback(check)


class CAStartTests(SynchronousTestCase):
    """The CA is checked when the proxy starts: a bad one is one usage line."""

    def test_key_readable_by_others_is_a_usage_error(self) -> None:
        """A CA key with mode 0644 stops the start with a line naming chmod."""
        from twisted.python import usage

        from aproxy.intercept.ca import CA_KEY, load_or_create
        from aproxy.run.tap import Options

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        load_or_create(directory)
        os.chmod(os.path.join(directory, CA_KEY), 0o644)
        with self.assertRaisesRegex(usage.UsageError, "chmod 600"):
            Options().parseOptions(["--intercept", "*", "--ca-dir", directory])


class PeekFailureTests(SynchronousTestCase):
    """A bug while deciding a tunnel ends that connection, and nothing reaches the reactor."""

    def test_bug_after_the_silent_wait(self) -> None:
        """An error in the decision the 2 s timer takes is an internal error of that client."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock

        from aproxy import ProxyFactory
        from aproxy.testing import HalfCloseTransport, RecordingConnector

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        clock = MemoryReactorClock()
        factory = ProxyFactory(
            ProxyConfig(intercept=("*",), ca_dir=directory, connect_ports=None),
            clock,
            RecordingConnector(),
        )
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        x = proto.exchange
        assert x is not None

        def broken() -> None:
            raise RuntimeError("a bug")

        x.dial_tunnel = broken  # type: ignore[method-assign]
        clock.advance(session_module.PEEK_TIMEOUT)
        self.assertTrue(client.disconnecting)
        [error] = self.flushLoggedErrors(RuntimeError)
        self.assertIn("a bug", str(error.value))
