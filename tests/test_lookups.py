"""
Name lookups under attack (issue #12, item 2): a client asking for names whose DNS never
answers, or one slow name, can't take every lookup from the other clients, and a lookup
whose client left before it started is dropped. The resolver is injected through
Twisted's L{IHostnameResolver}; no real DNS is used.
"""

from __future__ import annotations

import socket
from collections.abc import Generator, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.errors import ServiceUnavailable
from aproxy.testing import HalfCloseTransport
from aproxy.upstream.connector import EndpointConnector, client_key, domain_key
from aproxy.upstream.protocol import UpstreamFactory
from aproxy.workpool import FairQueue, as_client
from tests.tracking import ConnectionTracking


@implementer(IHostResolution)
class _Resolution:
    """A lookup in progress."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Lookups here can't be cancelled (as with getaddrinfo)."""


@implementer(IHostnameResolver)
class StallingResolver:
    """
    Answers names from a table at once, and never answers names with a label that starts
    with C{stall} (C{x.stall.test}, C{n.stall3.test}: a DNS server that drops their
    queries). Records every name asked.
    """

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        """Answer from the table, never for a stalled name, and nothing for others."""
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if any(label.startswith("stall") for label in hostName.split(".")):
            return resolution
        address = self.answers.get(hostName)
        if address is not None:
            resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class ConnectorLookupTests(SynchronousTestCase):
    """L{EndpointConnector} shares its lookups fairly and drops abandoned ones."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = StallingResolver({"victim.test": "198.51.100.7"})
        self.connector = EndpointConnector(
            self.reactor, 5.0, None, resolver=self.resolver, lookups=self.lookups()
        )
        self.factory = UpstreamFactory()

    def lookups(self) -> FairQueue:
        """The bounds under test: 4 threads, 2 per client and 1 per name running."""
        return FairQueue(4, 50, 2, 10, 1, 10, "name lookups")

    def connect(self, client: str, host: str) -> Deferred[Any]:
        """Connect to C{host}:80 for C{client}."""
        return as_client(client, self.connector.connect, host, 80, self.factory)

    def test_stalled_client_does_not_block_others(self) -> None:
        """
        A client whose names never resolve holds at most its share of the lookups; a
        victim's lookup is answered at once and its origin dialed.
        """
        for i in range(10):
            self.connect("203.0.113.66", f"n.stall{i}.test")
        self.assertEqual(len(self.resolver.asked), 2)
        self.connect("203.0.113.7", "victim.test")
        self.reactor.advance(0)
        self.assertEqual(self.resolver.asked[-1], "victim.test")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("198.51.100.7", 80)])

    def test_slow_name_does_not_block_others(self) -> None:
        """Many clients asking for one slow name hold at most that name's share."""
        for i in range(6):
            self.connect(f"203.0.113.{i}", "one.stall.test")
        self.assertEqual(self.resolver.asked, ["one.stall.test"])
        self.connect("203.0.113.7", "victim.test")
        self.assertEqual(self.resolver.asked, ["one.stall.test", "victim.test"])

    def test_random_names_under_one_slow_domain_share_its_bound(self) -> None:
        """
        Clients asking for endless random names under one slow domain hold that domain's
        share of the lookups, not every thread (the per-name bound counts domains).
        """
        for client in range(3):
            for i in range(3):
                self.connect(f"203.0.113.{client}", f"x{client}-{i}.stall.test")
        self.assertEqual(len(self.resolver.asked), 1)
        self.connect("203.0.113.7", "victim.test")
        self.assertEqual(self.resolver.asked[-1], "victim.test")

    def test_lookup_keys(self) -> None:
        """The per-name bound counts domains; the per-client one IPv6 /64 networks."""
        self.assertEqual(domain_key("x1.slow.example"), "slow.example")
        self.assertEqual(domain_key("A.Slow.Example."), "slow.example")
        self.assertEqual(domain_key("www.example.co.uk"), "example.co.uk")
        self.assertEqual(domain_key("localhost"), "localhost")
        self.assertEqual(client_key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("2001:db8:1:2::99"), client_key("2001:db8:1:2::1"))
        self.assertEqual(client_key("203.0.113.5"), "203.0.113.5")
        self.assertIsNone(client_key(None))

    def test_refused_lookup_is_503_dns_error(self) -> None:
        """Past a client's bound the lookup is refused at once with a 503 naming why."""
        for i in range(10):
            self.connect("203.0.113.66", f"n.stall{i}.test")
        failure = self.failureResultOf(
            self.connect("203.0.113.66", "n.stall10.test"), ServiceUnavailable
        )
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(failure.value.error_type, "dns_error")
        self.assertIn("too many name lookups pending for 203.0.113.66", failure.value.reason)

    def test_cancelled_waiting_lookup_is_dropped(self) -> None:
        """A lookup still waiting when its dial is cancelled never reaches the resolver."""
        self.connect("203.0.113.66", "a.stall.test")
        self.connect("203.0.113.66", "b.stall.test")
        waiting = self.connect("203.0.113.66", "c.stall.test")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.connector.lookups.dropped, 1)
        self.assertNotIn("c.stall.test", self.resolver.asked)


GET_STALL = b"GET http://%s/ HTTP/1.1\r\nHost: x\r\n\r\n"


class ProxyLookupTests(SynchronousTestCase):
    """Through the proxy: refused lookups are answered, abandoned ones dropped."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.resolver = StallingResolver({})
        self.lookups = FairQueue(4, 50, 1, 2, 1, 10, "name lookups")
        connector = EndpointConnector(
            self.clock, 5.0, None, resolver=self.resolver, lookups=self.lookups
        )
        self.factory = ProxyFactory(ProxyConfig(), self.clock, connector)

    def request(self, host: bytes) -> tuple[Any, HalfCloseTransport]:
        """A new client connection asking for C{http://host/}."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(GET_STALL % host)
        return proto, client

    def test_client_gone_drops_its_waiting_lookup(self) -> None:
        """A client that leaves while its lookup waits costs no lookup."""
        self.request(b"a.stall.test")
        proto, _ = self.request(b"b.stall.test")
        self.assertEqual(self.resolver.asked, ["a.stall.test"])
        proto.connectionLost()
        self.assertEqual(self.lookups.dropped, 1)
        self.assertEqual(self.lookups.queued, 0)

    def test_lookup_bound_answers_503(self) -> None:
        """Past the client's bound the request gets 503 with Proxy-Status dns_error."""
        self.request(b"a.stall.test")
        self.request(b"b.stall.test")
        _, client = self.request(b"c.stall.test")
        answer = client.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"error=dns_error", answer)
        self.assertIn(b"too many name lookups pending for 127.0.0.1", answer)

    def test_request_timeout_drops_waiting_lookup(self) -> None:
        """A request whose lookup waits past the connect timeout gets 504; it is dropped."""
        self.request(b"a.stall.test")
        _, client = self.request(b"b.stall.test")
        self.clock.advance(self.factory.config.connect_timeout)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(self.lookups.dropped, 1)
        # The running one can't be stopped: it keeps its place until it ends.
        self.assertEqual((self.lookups.running, self.lookups.queued), (1, 0))
        self.assertNotIn("b.stall.test", self.resolver.asked)


class _Origin(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )


def fetch(proxy_port: int, url: bytes) -> bytes:
    """One GET through the proxy from 127.0.0.2; the status line."""
    with socket.create_connection(
        ("127.0.0.1", proxy_port), timeout=20, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(b"GET " + url + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def hit_and_run(proxy_port: int, count: int) -> None:
    """From 127.0.0.1, ask for C{count} names that never resolve, closing at once."""
    for i in range(count):
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as sock:
            sock.sendall(b"GET http://n%d.stall.test/ HTTP/1.1\r\nHost: x\r\n\r\n" % i)


class LookupIntegrationTests(ConnectionTracking, TestCase):
    """A real proxy on loopback sockets, its connector asking a stalling resolver."""

    timeout = 60

    @inlineCallbacks
    def test_victim_served_while_attacker_stalls_lookups(self) -> Generator[Any, Any, None]:
        """
        While a client asks for 40 names that never resolve and hangs up each time,
        another client's request for a name that resolves is answered 200: the stalled
        lookups hold only the first client's share (here its slow domain's, the smaller).
        """
        origin = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(_Origin)
        )
        self.addCleanup(origin.stopListening)
        resolver = StallingResolver({"victim.test": "127.0.0.1"})
        connector = EndpointConnector(reactor, 5.0, None, resolver=resolver)
        factory = ProxyFactory(ProxyConfig(), reactor, connector)
        self.track(factory)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.pool.close)
        pport, oport = port.getHost().port, origin.getHost().port
        yield deferToThread(hit_and_run, pport, 40)
        status = yield deferToThread(fetch, pport, b"http://victim.test:%d/" % oport)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        # The attacker's stalled lookups hold its share only; the rest wait or were refused.
        share = min(EndpointConnector.LOOKUP_CLIENT_RUNNING, EndpointConnector.LOOKUP_NAME_RUNNING)
        self.assertEqual(len(resolver.asked), share + 1)
        self.assertEqual(resolver.asked[-1], "victim.test")
        self.assertEqual(connector.lookups.running, share)
