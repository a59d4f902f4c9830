r"""
An in-memory aproxy for your own tests, in the spirit of C{treq.testing}: a real
L{ProxyFactory} on a L{MemoryReactorClock}, clients and origins joined to it by
C{twisted.test.iosim} pumps instead of sockets, so a test runs synchronously, deterministically
and in milliseconds.

    from twisted.internet.protocol import Factory, Protocol
    from aproxy import ProxyConfig
    from aproxy.testing import InMemoryProxy

    proxy = InMemoryProxy(ProxyConfig(read_timeout=5), origin=my_resource)
    response = proxy.request(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")

    silent = InMemoryProxy(ProxyConfig(read_timeout=5), origin=Factory.forProtocol(Protocol))
    client = silent.client()
    client.send(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")  # b""
    silent.advance(5)
    client.received()  # b"HTTP/1.1 504 Gateway Timeout..."

Time moves only when the test says so: L{InMemoryProxy.advance} runs the proxy's timeouts.

For finer control, L{RecordingConnector} records each dial as an L{Attempt} that the test
completes (on a L{HalfCloseTransport}), answers byte by byte, fails or leaves pending:

    connector = RecordingConnector()
    factory = ProxyFactory(config, reactor=MemoryReactorClock(), connector=connector)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import TypeAlias

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.upstream.connector import IUpstreamConnector
from aproxy.upstream.protocol import UpstreamProtocol

__all__ = [
    "Attempt",
    "HalfCloseTransport",
    "InMemoryProxy",
    "MemoryClient",
    "MemoryConnector",
    "Origin",
    "RecordingConnector",
]

Origin: TypeAlias = "IProtocolFactory | IResource"
"""What answers for an origin: a protocol factory (e.g. a C{twisted.web} L{Site} on the
proxy's clock) or an L{IResource}, which is served by a L{Site} on the proxy's clock."""

# The most pump rounds one flush takes before it decides the peers talk forever.
_MAX_ROUNDS = 10000


class MemoryClient(Protocol):
    """
    One client connection to an L{InMemoryProxy}: what the test sends and what came back.

    @ivar closed: Whether the connection is closed (by either side).
    """

    def __init__(self, proxy: InMemoryProxy) -> None:
        self._proxy = proxy
        self._received: list[bytes] = []
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        """Keep the proxy's bytes for L{received}."""
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Note the close."""
        self.closed = True

    def send(self, data: bytes) -> bytes:
        """
        Send C{data} to the proxy, let every connection run until quiet and return what the
        proxy sent back meanwhile (see L{received}).
        """
        assert self.transport is not None
        self.transport.write(data)
        self._proxy.flush()
        return self.received()

    def received(self) -> bytes:
        """Everything the proxy sent on this connection since the last call."""
        data, self._received = b"".join(self._received), []
        return data

    def close(self) -> None:
        """Close the connection from the client's side (and let the proxy see it)."""
        assert self.transport is not None
        self.transport.loseConnection()
        self._proxy.flush()


@implementer(IUpstreamConnector)
class MemoryConnector:
    """
    An L{IUpstreamConnector} that connects the proxy to in-memory origins: C{origins} by
    C{"host:port"} or C{"host"}, else C{default}; with none, the dial is refused (and the
    client gets the proxy's 502).

    @ivar dialed: Every C{(host, port)} the proxy dialed, in order.
    """

    def __init__(
        self,
        proxy: InMemoryProxy,
        default: Origin | None = None,
        origins: Mapping[str, Origin] | None = None,
    ) -> None:
        self._proxy = proxy
        self._default = self._factory(default)
        self._origins = {key: self._factory(value) for key, value in (origins or {}).items()}
        self.dialed: list[tuple[str, int]] = []

    def _factory(self, origin: Origin | None) -> IProtocolFactory | None:
        """C{origin} as a protocol factory: a resource is served by a L{Site}."""
        if origin is None or IProtocolFactory.providedBy(origin):
            return origin
        return Site(origin, reactor=self._proxy.clock)

    def _origin_for(self, host: str, port: int) -> IProtocolFactory | None:
        """The protocol factory that answers for C{host}:C{port}, or L{None}."""
        return self._origins.get(f"{host}:{port}", self._origins.get(host, self._default))

    def connect(self, host: str, port: int, factory: Factory) -> Deferred[Protocol]:
        """
        Connect C{factory}'s protocol to the origin for C{host}:C{port} on the next turn of
        the clock (as a socket connects after the call returns).
        """
        self.dialed.append((host, port))
        d: Deferred[Protocol] = Deferred()

        def complete() -> None:
            origin = self._origin_for(host, port)
            if origin is None:
                d.errback(ConnectionRefusedError(host, port))
                return
            address = IPv4Address("TCP", "127.0.0.1", port)
            local = IPv4Address("TCP", "127.0.0.1", self._proxy.next_port())
            server = origin.buildProtocol(local)
            client = factory.buildProtocol(address)
            assert server is not None and isinstance(client, Protocol)
            self._proxy.join(server, client, address, local)
            d.callback(client)

        self._proxy.clock.callLater(0, complete)
        return d


class InMemoryProxy:
    """
    An aproxy L{ProxyFactory} with in-memory clients and origins on a fake clock.

    @param config: The proxy's configuration (the defaults if L{None}).
    @param origin: What answers every dial not in C{origins}; L{None} refuses them.
    @param origins: Origins by C{"host:port"} or C{"host"}.
    @param clock: The fake reactor to run on (a new one if L{None}). Build a L{Site} of
        your own on it too (C{Site(resource, reactor=clock)}): on the global reactor its
        timeouts would outlive the test.
    @param addons: Addon objects to run (see L{aproxy.addons.IAddon}), to test an addon.

    @ivar clock: The reactor the proxy (and a resource's L{Site}) runs on; see L{advance}.
    @ivar factory: The proxy itself, e.g. to add observers: C{factory.observers}.
    @ivar connector: The L{MemoryConnector}: C{connector.dialed} lists the dials.
    """

    def __init__(
        self,
        config: ProxyConfig | None = None,
        origin: Origin | None = None,
        origins: Mapping[str, Origin] | None = None,
        clock: MemoryReactorClock | None = None,
        addons: Sequence[object] = (),
    ) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.connector = MemoryConnector(self, origin, origins)
        self.factory = ProxyFactory(
            config, reactor=self.clock, connector=self.connector, addons=addons
        )
        self._pumps: list[IOPump] = []
        self._ports = count(40000)

    def join(
        self,
        server: IProtocol,
        client: IProtocol,
        server_at: IAddress,
        client_at: IAddress,
    ) -> None:
        """
        Connect C{client} (at C{client_at}) to C{server} (at C{server_at}) in memory;
        L{flush} moves their bytes from then on.
        """
        pump = connect(
            server,
            FakeTransport(server, True, hostAddress=server_at, peerAddress=client_at),
            client,
            FakeTransport(client, False, hostAddress=client_at, peerAddress=server_at),
            greet=False,
            clock=self.clock,
        )
        self._pumps.append(pump)

    def client(self, host: str = "127.0.0.1") -> MemoryClient:
        """
        A new client connection to the proxy, from the IP address C{host} (loopback by
        default; the default policy admits loopback clients only).
        """
        client = MemoryClient(self)
        peer: IPv4Address | IPv6Address
        if ":" in host:
            peer = IPv6Address("TCP", host, self.next_port())
            listening: IPv4Address | IPv6Address = IPv6Address("TCP", "::1", 3128)
        else:
            peer = IPv4Address("TCP", host, self.next_port())
            listening = IPv4Address("TCP", "127.0.0.1", 3128)
        proto = self.factory.buildProtocol(peer)
        self.join(proto, client, listening, peer)
        self.flush()
        return client

    def next_port(self) -> int:
        """A fresh port number for the client end of an in-memory connection."""
        return next(self._ports)

    def request(self, data: bytes) -> bytes:
        """
        Send C{data} (one or more raw requests) on a new client connection, let it run
        until quiet, close it and return every byte the proxy sent back.
        """
        client = self.client()
        response = client.send(data)
        if not client.closed:
            client.close()
        return response + client.received()

    def flush(self) -> None:
        """Move bytes between every client, the proxy and every origin until all are quiet."""
        for _ in range(_MAX_ROUNDS):
            self.clock.advance(0)
            moved = False
            for pump in list(self._pumps):
                if pump.pump(advanceClock=False):
                    moved = True
                elif pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)
            now = self.clock.seconds()
            if not moved and all(c.getTime() > now for c in self.clock.getDelayedCalls()):
                return
        raise RuntimeError("the in-memory connections never went quiet")

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass on the clock (timeouts fire), then L{flush}."""
        self.clock.advance(seconds)
        self.flush()


class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that records a shutdown of its write side."""

    write_closed = False
    bufferSize = 65536  # noqa: N815 (a TCP transport's read size, named by Twisted)

    def loseWriteConnection(self) -> None:
        """Record that the write side was shut down."""
        self.write_closed = True


@dataclass
class Attempt:
    """One recorded dial: where to, with which factory, and the Deferred to fire."""

    host: str
    port: int
    factory: Factory
    deferred: Deferred[Protocol] = field(default_factory=Deferred)
    transport: HalfCloseTransport | None = None
    protocol: UpstreamProtocol | None = None

    def succeed(self) -> HalfCloseTransport:
        """Complete the connection on a L{StringTransport} and return that transport."""
        proto = self.factory.buildProtocol(None)
        assert isinstance(proto, UpstreamProtocol)
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        self.transport = transport
        self.protocol = proto
        self.deferred.callback(proto)
        return transport

    def respond(self, data: bytes) -> None:
        """Deliver bytes from the origin on the completed connection."""
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def close(self) -> None:
        """The origin closes the connection."""
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IUpstreamConnector)
class RecordingConnector:
    """
    An L{IUpstreamConnector} that records each attempt for the test to complete.

    @ivar attempts: Every dial, in order; fail one with C{attempt.deferred.errback(...)}.
    """

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, host: str, port: int, factory: Factory) -> Deferred[Protocol]:
        """Record the attempt; the test decides how it ends."""
        attempt = Attempt(host, port, factory)
        self.attempts.append(attempt)
        return attempt.deferred
