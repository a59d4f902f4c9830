"""
L{aproxy.testing}: the in-memory proxy an embedder's tests run against in-memory origins,
with no sockets and time on a fake clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

import aproxy.testing
from aproxy import Exchange, IExchangeObserver, IUpstreamConnector, ProxyConfig, ProxyFactory
from aproxy.testing import HalfCloseTransport, InMemoryProxy, RecordingConnector

GET_HELLO = b"GET http://a.example/hello HTTP/1.1\r\nHost: a.example\r\n\r\n"
CONNECT_B = b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n"


class Text(Resource):
    """An origin answering C{path} with C{body} and anything else with a 404."""

    isLeaf = True  # noqa: N815 (twisted.web's name)

    def __init__(self, body: bytes, path: bytes = b"/hello") -> None:
        super().__init__()
        self.body = body
        self.path = path

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 (twisted.web's name)
        """C{body} as text/plain for C{path}, else 404."""
        if request.path != self.path:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"content-type", b"text/plain")
        return self.body


def hello_site() -> Resource:
    """A resource answering C{/hello} with C{hi}."""
    return Text(b"hi")


class Echo(Protocol):
    """An origin that sends back whatever it receives."""

    def dataReceived(self, data: bytes) -> None:
        """Echo C{data}."""
        assert self.transport is not None
        self.transport.write(data)


@implementer(IExchangeObserver)
class Collect:
    """An observer that keeps every exchange it is told about."""

    def __init__(self) -> None:
        self.seen: list[Exchange] = []

    def __call__(self, exchange: Exchange) -> None:
        """Keep C{exchange}."""
        self.seen.append(exchange)


class InMemoryProxyTests(SynchronousTestCase):
    """A whole proxy, its clients and its origins run in memory."""

    def test_get_through_proxy_to_site(self) -> None:
        """A GET reaches a twisted.web resource as the origin; its response comes back."""
        proxy = InMemoryProxy(origin=hello_site())
        response = proxy.request(GET_HELLO)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"\r\nVia: 1.1 aproxy", response)
        self.assertTrue(response.endswith(b"\r\n\r\nhi"), response)
        self.assertEqual(proxy.connector.dialed, [("a.example", 80)])

    def test_site_on_the_same_clock(self) -> None:
        """A L{Site} built by the test runs on the clock the proxy is given."""
        clock = MemoryReactorClock()
        site = Site(hello_site(), reactor=clock)
        proxy = InMemoryProxy(origin=site, clock=clock)
        self.assertIs(proxy.clock, clock)
        self.assertTrue(proxy.request(GET_HELLO).endswith(b"\r\n\r\nhi"))

    def test_keep_alive_reuses_origin_connection(self) -> None:
        """Two requests on one client connection share one origin connection."""
        proxy = InMemoryProxy(origin=hello_site())
        client = proxy.client()
        first = client.send(GET_HELLO)
        second = client.send(GET_HELLO.replace(b"/hello", b"/missing"))
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), first)
        self.assertTrue(second.startswith(b"HTTP/1.1 404 Not Found\r\n"), second)
        self.assertFalse(client.closed)
        self.assertEqual(proxy.connector.dialed, [("a.example", 80)])
        client.close()
        self.assertTrue(client.closed)

    def test_connect_tunnel(self) -> None:
        """A CONNECT opens a tunnel to the origin; bytes then go both ways unchanged."""
        proxy = InMemoryProxy(origin=Factory.forProtocol(Echo))
        client = proxy.client()
        self.assertEqual(client.send(CONNECT_B), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(client.send(b"\x16\x03\x01 any bytes"), b"\x16\x03\x01 any bytes")
        self.assertEqual(proxy.connector.dialed, [("b.example", 443)])

    def test_read_timeout_on_the_clock(self) -> None:
        """An origin that never answers gets the client a 504 once the clock passes the
        read timeout, and not before."""
        proxy = InMemoryProxy(ProxyConfig(read_timeout=5), origin=Factory.forProtocol(Protocol))
        client = proxy.client()
        self.assertEqual(client.send(GET_HELLO), b"")
        proxy.advance(4.9)
        self.assertEqual(client.received(), b"")
        proxy.advance(0.1)
        response = client.received()
        self.assertTrue(response.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), response)
        self.assertTrue(client.closed)

    def test_no_origin_is_refused(self) -> None:
        """A dial to a host no origin answers for is refused: the client gets a 502."""
        proxy = InMemoryProxy(origins={"a.example": hello_site()})
        response = proxy.request(GET_HELLO.replace(b"a.example", b"c.example"))
        self.assertTrue(response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), response)
        self.assertIn(b"c.example:80 refused", response)

    def test_client_address(self) -> None:
        """Clients connect from the address asked for: the default policy admits loopback
        (IPv4 or IPv6) and refuses others."""
        proxy = InMemoryProxy(origin=hello_site())
        self.assertTrue(proxy.client("::1").send(GET_HELLO).endswith(b"hi"))
        refused = proxy.client("192.0.2.7").send(GET_HELLO)
        self.assertTrue(refused.startswith(b"HTTP/1.1 403 Forbidden\r\n"), refused)

    def test_origins_by_host_and_port(self) -> None:
        """C{origins} picks the origin by C{host:port} first, then by host."""
        other = Text(b"port 8080")
        proxy = InMemoryProxy(origins={"a.example": hello_site(), "a.example:8080": other})
        by_port = proxy.request(GET_HELLO.replace(b"a.example/", b"a.example:8080/"))
        self.assertTrue(by_port.endswith(b"port 8080"), by_port)
        self.assertTrue(proxy.request(GET_HELLO).endswith(b"hi"))

    def test_observers_see_exchanges(self) -> None:
        """An L{IExchangeObserver} added to the factory is told about each exchange."""
        proxy = InMemoryProxy(origin=hello_site())
        observer = Collect()
        verifyObject(IExchangeObserver, observer)
        proxy.factory.observers.append(observer)
        proxy.request(GET_HELLO)
        [exchange] = observer.seen
        self.assertEqual(
            (exchange.method, exchange.target, exchange.status, exchange.client),
            ("GET", "http://a.example/hello", 200, "127.0.0.1"),
        )

    def test_connector_provides_interface(self) -> None:
        """The in-memory connector is a real L{IUpstreamConnector}."""
        verifyObject(IUpstreamConnector, InMemoryProxy().connector)

    def test_recording_connector(self) -> None:
        """A L{RecordingConnector} holds each dial until the test completes it and lets the
        test play the origin byte by byte."""
        connector = RecordingConnector()
        verifyObject(IUpstreamConnector, connector)
        factory = ProxyFactory(ProxyConfig(), reactor=MemoryReactorClock(), connector=connector)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(GET_HELLO)
        [attempt] = connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("a.example", 80))
        self.assertEqual(client.value(), b"")
        upstream = attempt.succeed()
        self.assertTrue(upstream.value().startswith(b"GET /hello HTTP/1.1\r\n"))
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertTrue(client.value().endswith(b"\r\n\r\nhi"), client.value())

    def test_imports_nothing_from_tests(self) -> None:
        """aproxy.testing is shipped: it depends on aproxy and Twisted, never on tests/."""
        source = Path(aproxy.testing.__file__).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                self.assertFalse((node.module or "").startswith("tests"), node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.assertFalse(alias.name.startswith("tests"), alias.name)
