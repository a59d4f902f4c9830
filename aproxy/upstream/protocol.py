"""
The origin side: how the proxy reaches an origin (L{IUpstreamConnector}), the protocol on
each upstream connection (L{UpstreamProtocol}) and the pool that reuses idle connections
(L{UpstreamPool}).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from aproxy.errors import ServiceUnavailable
from aproxy.http.head import HeadReader
from aproxy.workpool import FairQueue, WorkRefused, current_client, shared_runner

__all__ = [
    "EndpointConnector",
    "IUpstreamConnector",
    "UpstreamPool",
    "UpstreamProtocol",
]


class IUpstreamConnector(Interface):
    """
    How the proxy opens a TCP connection to an origin or a parent (see
    L{aproxy.upstream.dialer}).
    """

    def connect(host: str, port: int, factory: Factory) -> Deferred[Protocol]:  # noqa: N805
        """
        Connect to C{host}:C{port} and build the connection's protocol with C{factory}.

        @return: A L{Deferred} firing with the connected protocol, or failing with the
            connection error (C{DNSLookupError}, C{ConnectionRefusedError}, ...).
        """


@implementer(IUpstreamConnector)
class EndpointConnector:
    """
    The default connector: Twisted client endpoints on the given reactor.

    IP literals get a plain TCP endpoint (no name resolution). A name is looked up by the
    connector itself, through C{lookups} (a L{FairQueue} that bounds the lookups running
    and waiting per client and per name, and drops those whose client gave up), then:

      - without C{check_address}, a L{HostnameEndpoint} connects to the addresses found,
        trying them as it does (Happy Eyeballs, RFC 8305);
      - with C{check_address}, every address is checked and exactly the addresses that
        passed are tried in turn, so a name that resolves differently a moment later
        (DNS rebinding) can't reach an address that was refused.

    Lookups use the system's resolver (C{getaddrinfo}: C{/etc/hosts}, nsswitch, search
    domains, as every other program on the host) in a dedicated pool of threads, never
    the reactor's own pool, which Twisted and the password hashes use.

    @param check_address: Called with the host and each resolved address; raises a
        L{aproxy.errors.ProxyError} to refuse that address.
    @param resolve: Resolves a host to its addresses; fails with C{DNSLookupError}.
        By default C{resolver} is asked, or, without one, C{getaddrinfo} runs in the
        dedicated lookup threads.
    @param lookups: Bounds and shares the lookups (one made from the C{LOOKUP_*}
        defaults if L{None}).
    @param resolver: An L{IHostnameResolver} to ask instead of C{getaddrinfo}; each
        lookup holds its place in C{lookups} until the resolver completes it.
    """

    #: Lookups that run at once (threads in the lookup pool).
    LOOKUP_THREADS = 10
    #: Lookups that may wait for a thread, in all.
    LOOKUP_QUEUE = 200
    #: Lookups one client may have running at once, and running or waiting.
    LOOKUP_CLIENT_RUNNING = 4
    LOOKUP_CLIENT_JOBS = 16
    #: Lookups for one name that may run at once, and run or wait.
    LOOKUP_NAME_RUNNING = 2
    LOOKUP_NAME_JOBS = 32

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        check_address: Callable[[str, str], None] | None = None,
        resolve: Callable[[str, int], Deferred[list[str]]] | None = None,
        lookups: FairQueue | None = None,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._check = check_address
        self._resolver = resolver
        if resolve is None:
            resolve = self._ask_resolver if resolver is not None else self._getaddrinfo
        self._resolve = resolve
        self.lookups = lookups if lookups is not None else self.default_lookups()

    @classmethod
    def default_lookups(cls) -> FairQueue:
        """A L{FairQueue} for name lookups with the C{LOOKUP_*} bounds."""
        return FairQueue(
            cls.LOOKUP_THREADS,
            cls.LOOKUP_QUEUE,
            cls.LOOKUP_CLIENT_RUNNING,
            cls.LOOKUP_CLIENT_JOBS,
            cls.LOOKUP_NAME_RUNNING,
            cls.LOOKUP_NAME_JOBS,
            "name lookups",
        )

    def connect(self, host: str, port: int, factory: Factory) -> Deferred[Protocol]:
        """Connect to C{host}:C{port} with the right kind of endpoint."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d = self.lookup(host, port)
            if self._check is not None:
                return d.addCallback(self._connect_checked, host, port, factory)
            return d.addCallback(self._connect_resolved, host, port, factory)
        return self._connect_address(host, port, factory)

    def lookup(self, host: str, port: int) -> Deferred[list[str]]:
        """
        Resolve C{host} through the bounded lookup queue, for the client in
        L{current_client}.

        @return: A L{Deferred} with the addresses, failing with C{DNSLookupError}, or
            with L{ServiceUnavailable} (C{dns_error}) when a bound on lookups is reached.
            Cancelling it drops a lookup that has not started yet.
        """
        d = self.lookups.submit(lambda: self._resolve(host, port), current_client.get(), host)
        return d.addErrback(_lookup_refused, host, port)

    def _connect_resolved(
        self, addresses: list[str], host: str, port: int, factory: Factory
    ) -> Deferred[Protocol]:
        endpoint = HostnameEndpoint(
            _ResolvedReactor(self._reactor, addresses),
            host.encode("idna"),
            port,
            timeout=self._timeout,
        )
        return cast("Deferred[Protocol]", endpoint.connect(factory))

    def _ask_resolver(self, host: str, port: int) -> Deferred[list[str]]:
        assert self._resolver is not None
        receiver = _Receiver(host)
        self._resolver.resolveHostName(receiver, host, port)
        return receiver.done

    def _connect_address(self, address: str, port: int, factory: Factory) -> Deferred[Protocol]:
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = kind(self._reactor, address, port, timeout=self._timeout)
        return cast("Deferred[Protocol]", endpoint.connect(factory))

    def _connect_checked(
        self, addresses: list[str], host: str, port: int, factory: Factory
    ) -> Deferred[Protocol]:
        assert self._check is not None
        allowed = []
        refusal: Exception | None = None
        for address in addresses:
            try:
                self._check(host, address)
            except Exception as e:
                refusal = refusal or e
            else:
                allowed.append(address)
        if not allowed:
            raise refusal or DNSLookupError(host)
        return self._try_each(allowed, port, factory)

    def _try_each(self, addresses: list[str], port: int, factory: Factory) -> Deferred[Protocol]:
        d = self._connect_address(addresses[0], port, factory)
        if len(addresses) > 1:
            rest = addresses[1:]

            def next_address(failure: Failure) -> Deferred[Protocol] | Failure:
                if failure.check(ConnectError) and not failure.check(ConnectingCancelledError):
                    return self._try_each(rest, port, factory)
                return failure

            d.addErrback(next_address)
        return d

    def _getaddrinfo(self, host: str, port: int) -> Deferred[list[str]]:
        runner = shared_runner(self._reactor, "aproxy-dns", self.LOOKUP_THREADS)
        return runner.run(_lookup, host, port)


def _lookup_refused(failure: Failure, host: str, port: int) -> Failure:
    """Turn a refused lookup (a bound reached) into the 503 the client gets."""
    refused = failure.check(WorkRefused)
    if refused is None:
        return failure
    reason = cast("WorkRefused", failure.value).reason
    raise ServiceUnavailable(
        f"cannot look up {host} now: {reason}", "dns_error", details=reason
    ) from None


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects the addresses an L{IHostnameResolver} finds into a L{Deferred}."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N802, N803
        """The lookup started; nothing to do."""

    def addressResolved(self, address: IAddress) -> None:  # noqa: N802
        """Keep each distinct IP address, in the resolver's order."""
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self._addresses:
            self._addresses.append(host)

    def resolutionComplete(self) -> None:  # noqa: N802
        """Fire with the addresses, or fail with C{DNSLookupError} if there were none."""
        if self._addresses:
            self.done.callback(self._addresses)
        else:
            self.done.errback(DNSLookupError(self._host))


@implementer(IHostResolution)
class _Resolution:
    """A finished lookup of C{name} (nothing left to cancel)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to cancel: the answer was given at once."""


@implementer(IHostnameResolver)
class _FixedResolver:
    """An L{IHostnameResolver} that knows one answer: addresses already looked up."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = addresses

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        """Report the addresses at once."""
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ResolvedReactor:
    """
    The reactor as a L{HostnameEndpoint} sees it: the real one (timers, C{connectTCP}),
    but with a name resolver that answers with the addresses the connector already
    looked up, so the endpoint's own lookup can't bypass the bounded lookup queue.
    """

    def __init__(self, reactor: Any, addresses: list[str]) -> None:
        self._reactor = reactor
        self.nameResolver: IHostnameResolver = _FixedResolver(addresses)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:  # noqa: N802
        """Not used: the resolver is fixed."""
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _lookup(host: str, port: int) -> list[str]:
    """Resolve C{host} with getaddrinfo: its distinct addresses, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise DNSLookupError(f"{host}: {e}") from None
    seen: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    if not seen:
        raise DNSLookupError(host)
    return seen


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """
    One connection to an origin: a thin adapter that hands received bytes and the
    connection's end to whoever owns it now (a client's L{ProxyProtocol} or the pool).

    @ivar key: Where the connection goes, for the pool (L{aproxy.upstream.dialer.Hop.key}).
    @ivar reader: Collects the head of each response on this connection.
    @ivar on_data: Called with each received chunk of bytes.
    @ivar on_lost: Called with this protocol and the reason when the connection ends.
    @ivar on_eof: Called when the origin shuts down its write side (a half-close); by
        default that ends the connection, which is what HTTP needs. Tunnels relay it.
    @ivar on_ready: Called once when the connection can carry a request: when it is made,
        or with C{wait_handshake} when the TLS handshake beneath it completed (see
        L{aproxy.upstream.dialer}); L{None} when nobody waits.
    """

    # A TCP or TLS transport: ITransport plus IConsumer, IPushProducer and half-close;
    # no single interface says all of that, so it is typed loosely here.
    transport: Any
    key: Hashable = ("", 0)
    idle_since: float = 0.0
    # When the connection was made (on the clock of the factory that built it), for the
    # pool's maximum age; L{None} until known.
    created: float | None = None
    # The TLS settings (an L{aproxy.upstream.tls.ClientTLS}) that verified the origin or parent
    # on this connection, or L{None} without TLS: a reload replaces them, and a pooled
    # connection verified under the old ones is not reused.
    verified_by: object | None = None
    wait_handshake = False
    on_ready: Callable[[], None] | None = None

    def __init__(self, reader: HeadReader | None = None) -> None:
        self.reader = reader if reader is not None else HeadReader(65536, 65536, False)
        self.on_data: Callable[[bytes], None] = _ignore_data
        self.on_lost: Callable[[UpstreamProtocol, Failure], None] = _ignore_lost
        self.on_eof: Callable[[], None] = self._close
        self.lost = False

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        """Ready now, unless a TLS handshake beneath must complete first."""
        if not self.wait_handshake:
            self._now_ready()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake beneath this protocol completed (and was verified).

        Only instances under a TLS layer declare C{IHandshakeListener} (with
        C{alsoProvides}): Twisted's endpoint wrapper (26.10) keeps just the last of the
        optional interfaces a protocol provides, which would hide C{IHalfCloseableProtocol}.
        """
        self._now_ready()

    def _now_ready(self) -> None:
        ready, self.on_ready = self.on_ready, None
        if ready is not None:
            ready()

    def dataReceived(self, data: bytes) -> None:
        """Hand the bytes to the current owner."""
        self.on_data(data)

    def readConnectionLost(self) -> None:
        """The origin half-closed: tell the owner (HTTP closes, a tunnel relays it)."""
        self.on_eof()

    def writeConnectionLost(self) -> None:
        """Our write side is shut down; the read side goes on until the origin closes."""

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Tell the current owner that the origin connection ended."""
        self.lost = True
        self.on_lost(self, reason)


def _ignore_data(data: bytes) -> None:
    """Bytes before an owner is attached are impossible; ignore them."""


def _ignore_lost(proto: UpstreamProtocol, reason: Failure) -> None:
    """A connection lost before an owner is attached needs no action."""


class UpstreamFactory(Factory):
    """Builds an L{UpstreamProtocol} for each new origin connection."""

    protocol = UpstreamProtocol
    noisy = False

    def __init__(self, max_head_size: int = 65536, clock: IReactorTime | None = None) -> None:
        self.max_head_size = max_head_size
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> UpstreamProtocol:
        """
        Make the protocol for one origin connection, with its response-head reader, and
        note when it was made (with a clock) for the pool's maximum age.
        """
        proto = UpstreamProtocol(HeadReader(self.max_head_size, self.max_head_size, False))
        proto.factory = self
        if self.clock is not None:
            proto.created = self.clock.seconds()
        return proto


class UpstreamPool:
    """
    Idle upstream connections kept for reuse, per key (see L{aproxy.upstream.dialer.Hop.key}: the
    origin, or the parent proxy, and whether it speaks TLS).

    A connection is put back only after its response was read completely and neither side
    asked to close. While idle it must stay silent: any byte or a close from the origin
    removes it. Idle connections older than C{idle_timeout} are closed by a sweep that runs
    only while the pool holds something.

    A connection is also never reused once it is C{max_age} seconds old, however busy it
    is (each use resets the idle clock, not this one): its address was checked against
    the rules when it was made, and a name may have moved since. The age counts from
    when the connection was made (L{UpstreamProtocol.created}), or from its first return
    to the pool when that is unknown.

    @param clock: Measures the idle time and age, and runs the sweep.
    @param max_per_key: Idle connections kept per key; more are closed.
    @param idle_timeout: Seconds an idle connection is kept.
    @param max_age: Seconds after which a connection is not reused.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        max_per_key: int,
        idle_timeout: float,
        max_age: float = 120.0,
    ) -> None:
        self._clock = clock
        self._max = max_per_key
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        self._idle: dict[Hashable, list[UpstreamProtocol]] = {}
        self._sweeper: IDelayedCall | None = None
        self.reused = 0

    def __len__(self) -> int:
        """The number of idle connections held."""
        return sum(len(v) for v in self._idle.values())

    def reconfigure(self, max_per_key: int, idle_timeout: float, max_age: float) -> None:
        """
        Apply new limits (a reload) to the connections held now and to later ones:
        connections over the new count per key or past the new times are closed at once.
        """
        self._max = max_per_key
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        for key, conns in list(self._idle.items()):
            while len(conns) > max_per_key:
                # The least recently used go first (acquire takes from the end).
                self._discard(conns.pop(0))
            if not conns:
                del self._idle[key]
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._sweep()

    def _too_old(self, proto: UpstreamProtocol, now: float) -> bool:
        created = proto.created
        return created is not None and now - created >= self._max_age

    def acquire(self, key: Hashable) -> UpstreamProtocol | None:
        """
        Take the most recently used idle connection to C{key} that is still open and
        younger than the maximum age, if there is one (older ones are closed).
        """
        conns = self._idle.get(key)
        while conns:
            proto = conns.pop()
            if proto.lost:
                continue
            if self._too_old(proto, self._clock.seconds()):
                self._discard(proto)
                continue
            self.reused += 1
            return proto
        return None

    def release(self, proto: UpstreamProtocol) -> None:
        """
        Keep C{proto} for reuse, or close it if the pool for its key is full or it has
        reached the maximum age.
        """
        if proto.lost or proto.transport is None:
            return
        now = self._clock.seconds()
        if proto.created is None:
            proto.created = now
        conns = self._idle.setdefault(proto.key, [])
        if len(conns) >= self._max or self._too_old(proto, now):
            if not conns:
                del self._idle[proto.key]
            proto.transport.loseConnection()
            return
        proto.idle_since = now
        proto.on_data = lambda data, proto=proto: self._unexpected(proto)  # type: ignore[misc]
        proto.on_lost = self._lost
        conns.append(proto)
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._sweep_delay(), self._sweep)

    def _sweep_delay(self) -> float:
        return min(self._idle_timeout, self._max_age)

    def _unexpected(self, proto: UpstreamProtocol) -> None:
        # An idle origin connection must be silent; bytes now would be read as the
        # response to the next request. Drop it.
        self._remove(proto)
        proto.transport.loseConnection()

    def _lost(self, proto: UpstreamProtocol, reason: Failure) -> None:
        self._remove(proto)

    def _remove(self, proto: UpstreamProtocol) -> None:
        conns = self._idle.get(proto.key)
        if conns and proto in conns:
            conns.remove(proto)

    def _discard(self, proto: UpstreamProtocol) -> None:
        """Close an idle connection taken out of the pool."""
        proto.on_lost = _ignore_lost
        proto.transport.loseConnection()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._clock.seconds()
        limit = now - self._idle_timeout
        left = 0
        for key, conns in list(self._idle.items()):
            keep = []
            for proto in conns:
                if proto.idle_since <= limit or self._too_old(proto, now):
                    self._discard(proto)
                else:
                    keep.append(proto)
            if keep:
                self._idle[key] = keep
                left += len(keep)
            else:
                del self._idle[key]
        if left:
            self._sweeper = self._clock.callLater(self._sweep_delay() / 2, self._sweep)

    def close(self) -> None:
        """Close every idle connection (at service stop)."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for conns in self._idle.values():
            for proto in conns:
                self._discard(proto)
        self._idle.clear()
