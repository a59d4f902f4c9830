"""Nagle's algorithm is off on both sides of the proxy (see upstream.protocol.no_delay)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aproxy import ProxyConfig, ProxyFactory
from aproxy.testing import HalfCloseTransport, RecordingConnector
from aproxy.upstream.protocol import no_delay
from tests.loopback import LOCAL, fetch_all
from tests.origin import Origin, OriginProtocol, OriginRequest, respond
from tests.tracking import ConnectionTracking


class _Recording(HalfCloseTransport):
    """A fake TCP transport that remembers setTcpNoDelay."""

    nodelay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 (Twisted's name)
        self.nodelay = enabled


class NoDelayUnitTests(SynchronousTestCase):
    """no_delay sets the option where there is one and is quiet where there is none."""

    def test_set_or_skipped(self) -> None:
        """A TCP-like transport gets it; one without the method is left alone."""
        transport = _Recording()
        no_delay(transport)
        self.assertTrue(transport.nodelay)
        no_delay(HalfCloseTransport())  # (no such method: nothing happens)

    def test_client_connection(self) -> None:
        """A new client connection has Nagle off."""
        factory = ProxyFactory(ProxyConfig(), MemoryReactorClock(), RecordingConnector())
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = _Recording(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(transport)
        self.assertTrue(transport.nodelay)


class NoDelayIntegrationTests(ConnectionTracking, TestCase):
    """Real sockets: the proxy's client and upstream sockets have TCP_NODELAY."""

    timeout = 30

    @inlineCallbacks
    def test_both_sides(self) -> Generator[Any, Any, None]:
        """After one request, both the client and the origin connection have it set."""

        def handler(request: OriginRequest, proto: OriginProtocol) -> None:
            respond(proto, b"ok")

        origin = Origin(b"origin", handler)
        self.track(origin)
        listening = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(origin)
        self.addCleanup(listening.stopListening)
        factory = ProxyFactory(ProxyConfig(), reactor)
        clients = self.track(factory)
        upstreams = self.track(factory.upstream_factory)
        port = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(factory)
        self.addCleanup(port.stopListening)
        got = yield deferToThread(fetch_all, port.getHost().port, ["/x"], listening.getHost().port)
        self.assertEqual(got, [(200, b"ok")])
        sockets: list[Any] = [p.transport for p in clients + upstreams if p.transport]
        self.assertEqual(len(sockets), 2)
        self.assertTrue(all(t.getTcpNoDelay() for t in sockets))
