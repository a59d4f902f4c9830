"""
Loopback integration tests for access control: destination rules, C{--block-private} with
real name resolution, loop detection when the proxy is asked to fetch from itself, and the
per-address connection limit, with a real proxy, origin and clients on 127.0.0.1.

Blocking clients run in threads with socket timeouts shorter than the test's; every port and
every connection is closed by a cleanup that waits until the reactor has let go of it.
"""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from aproxy import ProxyConfig, ProxyFactory
from tests.loopback import LOCAL, RawClient, Response, exchange
from tests.loopback import get as get_head
from tests.origin import Origin
from tests.tracking import ConnectionTracking

# Bounds the damage if loop detection fails: a looping request is cut off by this many
# client connections at most, instead of running until the test times out.
LOOP_BOUND = 8


def get(url: str) -> bytes:
    """A GET request head for C{url} that asks to close, so the client reads to the end."""
    return get_head(url, extra=b"Connection: close\r\n")


def has_ipv4_mapped_ipv6() -> bool:
    """Whether an IPv6 socket can connect to an IPv4 loopback listener via ::ffff:127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind((LOCAL, 0))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
                client.settimeout(2)
                client.connect(("::ffff:127.0.0.1", port))
    except OSError:
        return False
    return True


class PolicyIntegrationTests(ConnectionTracking, TestCase):
    """Access control between real sockets on the loopback interface."""

    timeout = 30

    # -- fixtures ---------------------------------------------------------------------------

    @inlineCallbacks
    def listen(self, factory: Factory[Any]) -> Generator[Any, Any, Any]:
        """Listen with C{factory} on an ephemeral 127.0.0.1 port; return the listening port."""
        port = yield serverFromString(reactor, "tcp:0:interface=" + LOCAL).listen(factory)
        self.addCleanup(port.stopListening)
        return port

    @inlineCallbacks
    def start_origin(self) -> Generator[Any, Any, tuple[Origin, int]]:
        """Start a test origin; return it and its port."""
        origin = Origin()
        self.track(origin)
        port = yield self.listen(origin)
        return origin, int(port.getHost().port)

    @inlineCallbacks
    def start_proxy(self, config: ProxyConfig) -> Generator[Any, Any, tuple[ProxyFactory, int]]:
        """
        Start a proxy that knows its listening address (as the service does); return its
        factory and port. C{factory.clients} lists the client connections it accepted,
        C{factory.upstreams} the origin connections it made.
        """
        factory = ProxyFactory(config, reactor)
        factory.clients = self.track(factory)  # type: ignore[attr-defined]
        factory.upstreams = self.track(factory.upstream_factory)  # type: ignore[attr-defined]
        port = yield self.listen(factory)
        factory.loops.note_listening(port.getHost())
        return factory, int(port.getHost().port)

    def assert_refused(self, resp: Response, status: int, error: bytes) -> None:
        """C{resp} is C{status} with Proxy-Status C{error} from this proxy."""
        proxy_status = resp.header(b"proxy-status") or b""
        self.assertEqual(resp.status, status, (resp.status_line, proxy_status, resp.body))
        self.assertTrue(proxy_status.startswith(b"aproxy; error=" + error), proxy_status)

    # -- destination rules ------------------------------------------------------------------

    @inlineCallbacks
    def test_deny_host_address(self) -> Generator[Any, Any, None]:
        """A request to a denied address gets 403 and the origin there sees no connection."""
        origin, oport = yield self.start_origin()
        proxy, pport = yield self.start_proxy(ProxyConfig(deny_host=(LOCAL,)))
        resp, rest = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{oport}/"))
        self.assert_refused(resp, 403, b"destination_ip_prohibited")
        self.assertIn(b"127.0.0.1", resp.body)
        self.assertEqual(rest, b"")
        self.assertEqual(origin.protocols, [])
        self.assertEqual(proxy.upstreams, [])

    @inlineCallbacks
    def test_block_private_resolved_name(self) -> Generator[Any, Any, None]:
        """With --block-private, a name resolving to loopback gets 403 and nothing is reached."""
        origin, oport = yield self.start_origin()
        proxy, pport = yield self.start_proxy(ProxyConfig(block_private=True))
        resp, rest = yield deferToThread(exchange, pport, get(f"http://localhost:{oport}/"))
        self.assert_refused(resp, 403, b"destination_ip_prohibited")
        self.assertIn(b"private", resp.body)
        self.assertEqual(rest, b"")
        self.assertEqual(origin.protocols, [])
        self.assertEqual(proxy.upstreams, [])

    @inlineCallbacks
    def test_http_port_not_allowed(self) -> Generator[Any, Any, None]:
        """
        A POST to a port outside --http-ports gets 403 http_request_denied naming the
        option, and nothing reaches the service listening there; an allowed port works.
        """
        origin, oport = yield self.start_origin()
        proxy, pport = yield self.start_proxy(ProxyConfig(http_ports=((80, 80),)))
        body = b"HELO x\r\nQUIT\r\n"
        post = (
            f"POST http://127.0.0.1:{oport}/ HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n".encode()
            + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        resp, rest = yield deferToThread(exchange, pport, post)
        self.assert_refused(resp, 403, b"http_request_denied")
        self.assertIn(b"--http-ports", resp.body)
        self.assertEqual(rest, b"")
        self.assertEqual(origin.protocols, [])
        self.assertEqual(proxy.upstreams, [])
        proxy, pport = yield self.start_proxy(ProxyConfig())
        resp, _ = yield deferToThread(exchange, pport, get(f"http://127.0.0.1:{oport}/"))
        self.assertEqual(resp.status, 200)

    # -- loops ------------------------------------------------------------------------------

    @inlineCallbacks
    def fetch_self(
        self, config: ProxyConfig, authority: str
    ) -> Generator[Any, Any, tuple[ProxyFactory, Response]]:
        """Ask a proxy with C{config} for C{http://AUTHORITY:PROXYPORT/}; return the answer."""
        proxy, pport = yield self.start_proxy(config)
        resp, _ = yield deferToThread(exchange, pport, get(f"http://{authority}:{pport}/"))
        return proxy, resp

    @inlineCallbacks
    def test_fetch_own_address(self) -> Generator[Any, Any, None]:
        """A request for the proxy's own address and port gets 403 without any connection."""
        proxy, resp = yield self.fetch_self(ProxyConfig(max_connections=LOOP_BOUND), LOCAL)
        self.assert_refused(resp, 403, b"proxy_loop_detected")
        self.assertEqual(len(proxy.clients), 1)
        self.assertEqual(proxy.upstreams, [])

    @inlineCallbacks
    def test_fetch_own_port_by_name(self) -> Generator[Any, Any, None]:
        """A name leading back to the proxy's port gets 403 at the first hop."""
        proxy, resp = yield self.fetch_self(ProxyConfig(max_connections=LOOP_BOUND), "localhost")
        self.assert_refused(resp, 403, b"proxy_loop_detected")
        # At most the one connection the proxy made to itself before seeing whose it was.
        self.assertLessEqual(len(proxy.upstreams), 1)
        self.assertLessEqual(len(proxy.clients), 2)

    @inlineCallbacks
    def test_fetch_self_without_via(self) -> Generator[Any, Any, None]:
        """Without a Via marker, fetching from the proxy itself by address or name is still 403."""
        config = ProxyConfig(via=None, max_connections=LOOP_BOUND)
        for authority in (LOCAL, "localhost"):
            proxy, resp = yield self.fetch_self(config, authority)
            self.assert_refused(resp, 403, b"proxy_loop_detected")
            self.assertIsNone(resp.header(b"via"))
            self.assertLessEqual(len(proxy.clients), 2, authority)

    @inlineCallbacks
    def test_fetch_self_unspecified_without_via(self) -> Generator[Any, Any, None]:
        """
        Without a Via marker, 0.0.0.0 on the proxy's port (which the kernel connects to
        this host) is a loop caught at the first hop.
        """
        config = ProxyConfig(via=None, max_connections=LOOP_BOUND)
        proxy, resp = yield self.fetch_self(config, "0.0.0.0")
        self.assert_refused(resp, 403, b"proxy_loop_detected")
        self.assertEqual(len(proxy.clients), 1, "the proxy connected to itself")

    @inlineCallbacks
    def test_fetch_self_ipv4_mapped_without_via(self) -> Generator[Any, Any, None]:
        """
        Without a Via marker, the IPv4-mapped IPv6 form of the proxy's address is a loop
        caught at the first hop.
        """
        if not has_ipv4_mapped_ipv6():
            raise SkipTest("IPv4-mapped IPv6 connections are not available")
        config = ProxyConfig(via=None, max_connections=LOOP_BOUND)
        proxy, resp = yield self.fetch_self(config, "[::ffff:127.0.0.1]")
        self.assert_refused(resp, 403, b"proxy_loop_detected")
        self.assertEqual(len(proxy.clients), 1, "the proxy connected to itself")

    @inlineCallbacks
    def test_fetch_self_ipv4_mapped_with_via(self) -> Generator[Any, Any, None]:
        """With Via, a loop through the IPv4-mapped address is still stopped by the marker."""
        if not has_ipv4_mapped_ipv6():
            raise SkipTest("IPv4-mapped IPv6 connections are not available")
        config = ProxyConfig(max_connections=LOOP_BOUND)
        proxy, resp = yield self.fetch_self(config, "[::ffff:127.0.0.1]")
        self.assert_refused(resp, 403, b"proxy_loop_detected")
        self.assertLessEqual(len(proxy.clients), 2)

    # -- limits -----------------------------------------------------------------------------

    @inlineCallbacks
    def test_max_clients_per_ip(self) -> Generator[Any, Any, None]:
        """With max_clients_per_ip=1, a second connection from 127.0.0.1 gets 503 and is closed."""
        origin, oport = yield self.start_origin()
        proxy, pport = yield self.start_proxy(ProxyConfig(max_clients_per_ip=1))

        def clients() -> tuple[Response, Response, bytes]:
            with RawClient(pport) as first:
                # A full exchange first, so the proxy has surely admitted this connection.
                first.send(get_head(f"http://127.0.0.1:{oport}/one"))
                ok = first.read_response()
                with RawClient(pport) as second:
                    refused = second.read_response()
                    rest = second.read_to_close()
                return ok, refused, rest

        ok, refused, rest = yield deferToThread(clients)
        self.assertEqual((ok.status, ok.body), (200, b"origin GET /one"))
        self.assert_refused(refused, 503, b"connection_limit_reached")
        self.assertEqual(rest, b"")
        self.assertEqual(len(proxy.clients), 2)
        self.assertEqual(len(origin.requests), 1)
