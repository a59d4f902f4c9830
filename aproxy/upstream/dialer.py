"""
How a request's upstream connection is built: a L{Hop} says where it goes (directly or
through a parent proxy, in clear or over TLS) and the L{Dialer} opens it, layer by layer.

A connection is a stack of Twisted protocols on one TCP connection, outermost first:

    TLS to an C{https://} parent      (L{TLSMemoryBIOProtocol})
    a CONNECT or SOCKS5 handshake     (L{HttpConnectHandshake}, L{Socks5Handshake})
    TLS to an C{https://} origin      (L{TLSMemoryBIOProtocol})
    the L{UpstreamProtocol}

each layer present only when needed. The L{Deferred} from L{Dialer.open} fires with the
L{UpstreamProtocol} once every layer is up (TLS handshakes verified, the parent said yes),
or fails with the L{ProxyError} the client should see: a 502 naming the origin or the
parent and saying why. The plain direct case stays one call to the connector.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from aproxy.errors import BadGateway, ProxyError
from aproxy.http.head import RequestHead
from aproxy.http.target import Target, format_authority
from aproxy.upstream.connector import IUpstreamConnector, connect_error
from aproxy.upstream.handshakes import HttpConnectHandshake, ParentHandshake, Socks5Handshake
from aproxy.upstream.protocol import UpstreamFactory, UpstreamProtocol
from aproxy.upstream.routes import (
    FLEET_FIELD,
    Fleet,
    Parent,
    Pool,
    Router,
    fleet_forwarded,
    fleet_key,
)
from aproxy.upstream.tls import ClientTLS, VerifyNote, tls_failure

__all__ = ["Dialer", "FleetRoute", "Hop", "PoolRoute"]

_log = Logger()

# How many plans the dialer remembers (they never change until a reload).
_CACHE_SIZE = 1024


class Hop:
    """
    Where one request's upstream connection goes and how.

    @ivar key: The pool key: connections with equal keys are interchangeable.
    @ivar host: The origin's host, as the client wrote it.
    @ivar port: The origin's port.
    @ivar tls: Whether the connection speaks TLS to the origin (an C{https://} target).
    @ivar parent: The parent proxy it goes through, or L{None} for direct.
    @ivar absolute: Whether the request goes to an HTTP parent as a proxy request
        (absolute-form target, the parent's C{Proxy-Authorization}) rather than through a
        tunnel to the origin.
    @ivar label: C{"direct"} or the parent's name, for logs.
    @ivar fields: Field lines every request through it carries (a fleet member's
        C{CDN-Loop}: see L{FleetRoute}).
    """

    __slots__ = ("absolute", "fields", "host", "key", "label", "parent", "port", "tls")

    fields: bytes

    def __init__(
        self,
        key: Hashable,
        host: str,
        port: int,
        tls: bool = False,
        parent: Parent | None = None,
        absolute: bool = False,
    ) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.tls = tls
        self.parent = parent
        self.absolute = absolute
        self.label = parent.name if parent is not None else "direct"
        self.fields = b""


class Dialer:
    """
    Plans and opens upstream connections.

    @param connector: Reaches origins directly (with the policy's address checks).
    @param parent_connector: Reaches parent proxies (configured, so not checked).
    @param tls: The TLS client settings for origins and parents.
    @param upstream_factory: Builds the L{UpstreamProtocol} at the top of each stack.
    @param router: Which destinations go through which parent.
    """

    def __init__(
        self,
        connector: IUpstreamConnector,
        parent_connector: IUpstreamConnector,
        tls: ClientTLS,
        upstream_factory: UpstreamFactory,
        router: Router,
    ) -> None:
        self.connector = connector
        self.parent_connector = parent_connector
        self.tls = tls
        self.upstream_factory = upstream_factory
        self.router = router
        self._plans: dict[tuple[bytes, str, int, bool], Hop] = {}
        self._vias: dict[tuple[Parent | None, bytes, str, int, bool], Hop] = {}

    def plan(self, scheme: bytes, host: str, port: int, tunnel: bool) -> Hop:
        """
        The L{Hop} for a request to C{scheme://host:port} (C{tunnel}: a CONNECT, whose
        bytes are relayed as they are).
        """
        cache_key = (scheme, host, port, tunnel)
        hop = self._plans.get(cache_key)
        if hop is not None:
            return hop
        parent = self.router.parent_for(host) if self.router else None
        hop = self.via(parent, scheme, host, port, tunnel)
        if len(self._plans) >= _CACHE_SIZE:
            self._plans.clear()
        self._plans[cache_key] = hop
        return hop

    def via(self, parent: Parent | None, scheme: bytes, host: str, port: int, tunnel: bool) -> Hop:
        """The L{Hop} to C{scheme://host:port} through C{parent} (L{None}: directly)."""
        cache_key = (parent, scheme, host, port, tunnel)
        hop = self._vias.get(cache_key)
        if hop is None:
            if len(self._vias) >= _CACHE_SIZE:
                self._vias.clear()
            hop = self._vias[cache_key] = self._via(parent, scheme, host, port, tunnel)
        return hop

    def _via(self, parent: Parent | None, scheme: bytes, host: str, port: int, tunnel: bool) -> Hop:
        tls = scheme == b"https" and not tunnel
        key: Hashable
        if parent is None:
            key = ("https", host, port) if tls else (host, port)
            return Hop(key, host, port, tls)
        if parent.scheme != "socks5" and not tls and not tunnel:
            # Plain requests to an HTTP parent share its connections, whatever the origin.
            return Hop(("parent", parent), host, port, False, parent, True)
        key = ("via", parent, "https" if tls else "http", host, port)
        return Hop(key, host, port, tls, parent)

    def route_for(
        self, target: Target, head: RequestHead, client: str, tunnel: bool
    ) -> FleetRoute | PoolRoute | None:
        """
        The per-request route of a request whose host a route sends to a cache fleet
        (not for tunnels) or a parent pool; L{None} for a single parent or direct.

        @param client: The client's user, else its address (for the C{client} strategy).
        """
        router = self.router
        if router.fleets and not tunnel:
            route = self.fleet_route(target, head)
            if route is not None:
                return route
        pool = router.pool_for(target.host) if router.pools else None
        if pool is None:
            return None
        return PoolRoute(self, pool, target, client, tunnel)

    def fleet_route(self, target: Target, head: RequestHead) -> FleetRoute | None:
        """
        The L{FleetRoute} of request C{head} for C{target} when a route sends its host to
        a cache fleet, unless another member sent it here (its C{CDN-Loop} says so): this
        proxy then serves it itself.
        """
        fleet = self.router.fleet_for(target.host)
        if fleet is None:
            return None
        if fleet_forwarded([value for name, value in head.fields if name.lower() == b"cdn-loop"]):
            return None
        return FleetRoute(self, fleet, target)

    def open(self, hop: Hop) -> Deferred[UpstreamProtocol]:
        """
        Open a connection for C{hop}.

        @return: A L{Deferred} firing with the L{UpstreamProtocol} once the connection is
            ready for the request, or failing with a L{ProxyError} (or the connector's
            error for a direct connection, which L{connect_error} explains).
        """
        if hop.parent is None and not hop.tls:
            return self.connector.connect(  # type: ignore[return-value]
                hop.host, hop.port, self.upstream_factory
            )
        return _Attempt(self, hop).start()


class _Build(Factory):
    """A factory whose protocols come from a callable (one stack per connection)."""

    noisy = False

    def __init__(self, build: Callable[[Any], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        """Build the stack for this connection."""
        return self._build(addr)


def _tls_layer(creator: Any, inner: Protocol) -> Protocol:
    """A client TLS protocol around C{inner}."""
    factory = TLSMemoryBIOFactory(creator, True, _Build(lambda addr: inner))
    return factory.buildProtocol(None)


class _Attempt:
    """One upstream connection being built through its layers."""

    def __init__(self, dialer: Dialer, hop: Hop) -> None:
        self._dialer = dialer
        self._hop = hop
        self.result: Deferred[UpstreamProtocol] = Deferred(self._cancel)
        self._connecting: Deferred[Any] | None = None
        self._outer: Protocol | None = None
        self._up: UpstreamProtocol | None = None
        self._done = False
        self._succeeded = False
        # The TLS layer right around the upstream protocol, if any: (note, whom).
        self._inner_tls: tuple[VerifyNote, str] | None = None

    def start(self) -> Deferred[UpstreamProtocol]:
        hop = self._hop
        parent = hop.parent
        if parent is not None:
            connector = self._dialer.parent_connector
            d = connector.connect(parent.host, parent.port, _Build(self._build))
        else:
            d = self._dialer.connector.connect(hop.host, hop.port, _Build(self._build))
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)
        return self.result

    def _build(self, addr: Any) -> Protocol:
        hop = self._hop
        parent = hop.parent
        dialer = self._dialer
        up = dialer.upstream_factory.buildProtocol(addr)
        self._up = up
        if hop.tls or (parent is not None and parent.scheme == "https"):
            up.verified_by = dialer.tls
        up.hand_to(self)
        up.on_ready = self._ready
        layer: Protocol = up
        if hop.tls:
            note = VerifyNote()
            self._inner_tls = (note, format_authority(hop.host, hop.port))
            up.wait_handshake = True
            alsoProvides(up, IHandshakeListener)
            layer = _tls_layer(dialer.tls.creator(hop.host, note), layer)
        if parent is not None and not hop.absolute:
            kind = Socks5Handshake if parent.scheme == "socks5" else HttpConnectHandshake
            layer = kind(
                parent, hop.host, hop.port, layer, self.fail, dialer.upstream_factory.max_head_size
            )
        if parent is not None and parent.scheme == "https":
            note = VerifyNote()
            whom = f"parent proxy {parent.name}"
            # (Declared per instance: see UpstreamProtocol.handshakeCompleted.)
            alsoProvides(layer, IHandshakeListener)
            if isinstance(layer, ParentHandshake):
                layer.parent_tls = (note, whom)
            else:
                self._inner_tls = (note, whom)
                up.wait_handshake = True
            layer = _tls_layer(dialer.tls.creator(parent.host, note), layer)
        self._outer = layer
        return layer

    def _connected(self, proto: Any) -> None:
        self._connecting = None
        if self._done and not self._succeeded:
            # Cancelled or failed meanwhile.
            proto.transport.abortConnection()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._done:
            return
        self._done = True
        parent = self._hop.parent
        if failure.check(CancelledError) or parent is None:
            self.result.errback(failure)
            return
        self.result.errback(connect_error(failure, self._hop.host, self._hop.port, parent))

    def _ready(self) -> None:
        if self._done:
            return
        self._done = self._succeeded = True
        up = self._up
        assert up is not None
        self.result.callback(up)

    # The attempt owns the connection while it is being made (see UpstreamOwner); the
    # code it hands the connection to takes it over.

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Bytes before the connection was handed on: impossible, dropped."""

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin half-closed before the connection was handed on: close it."""
        up.transport.loseConnection()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """The connection ended before it was ready (or before it was handed on)."""
        if self._inner_tls is not None:
            note, whom = self._inner_tls
            self.fail(tls_failure(reason, note, whom))
            return
        self.fail(
            BadGateway(
                f"the connection to {self._hop.label} ended before it was ready",
                "connection_terminated",
            )
        )

    def fail(self, err: ProxyError) -> None:
        """Give up: close what is open and fail the attempt with C{err}."""
        if self._done:
            return
        self._done = True
        self._abort()
        self.result.errback(err)

    def _abort(self) -> None:
        outer = self._outer
        transport = getattr(outer, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _cancel(self, d: Deferred[UpstreamProtocol]) -> None:
        self._done = True
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        else:
            self._abort()


class FleetRoute:
    """
    A request for a URL of a cache fleet (L{aproxy.upstream.routes.Fleet}): it goes to
    the member that owns the URL, as a proxy request (absolute form, C{https://} targets
    too, so the member caches them) on the member's shared connections; or here, to the
    origin, when this proxy owns it.

    @ivar fleet: The fleet.
    @ivar key: What the fleet hashes for this URL.
    """

    __slots__ = ("_dialer", "_target", "fleet", "key")

    peer = True  # (its member serves the URL from its own cache: see StageRequest.peer)

    def __init__(self, dialer: Dialer, fleet: Fleet, target: Target) -> None:
        self._dialer = dialer
        self._target = target
        self.fleet = fleet
        self.key = fleet_key(target.scheme, target.host, target.port, target.path)

    def hop(self, now: float) -> Hop:
        """The L{Hop} to the URL's owner at C{now}."""
        target = self._target
        owner = self.fleet.owner(self.key, now)
        if owner is None:
            return self._dialer.plan(target.scheme, target.host, target.port, False)
        hop = Hop(("parent", owner), target.host, target.port, False, owner, True)
        hop.fields = FLEET_FIELD
        return hop

    def failed(self, hop: Hop, now: float) -> Hop | None:
        """
        C{hop}'s member could not be reached (refused, unreachable, timed out): mark it
        down and return the hop to the URL's next owner; L{None} if C{hop} went to no
        member. Each failure marks one member down, so the retries end, at the latest
        with the URL served here.
        """
        member = hop.parent
        if member is None:
            return None
        self.fleet.failed(member, now)
        hop = self.hop(now)
        _log.info(
            "cache fleet member {member} failed: {url} goes to {next}",
            member=member.name,
            url=self.key.decode("ascii", "replace"),
            next="the origin" if hop.parent is None else hop.label,
        )
        return hop

    def done(self) -> None:
        """The request is over (nothing to count for a fleet)."""

    def final_error(self, err: ProxyError) -> ProxyError:
        """The error for the client when no member is left: the last one's."""
        return err


class PoolRoute:
    """
    A request through a parent pool (L{aproxy.upstream.routes.Pool}): the member the
    pool's strategy picks, then, each time one fails before anything of the request was
    sent, the next member not tried yet; when all failed, one 502 naming them all.
    """

    __slots__ = ("_client", "_dialer", "_target", "_tunnel", "index", "pool", "tried", "why")

    peer = False

    def __init__(
        self, dialer: Dialer, pool: Pool, target: Target, client: str, tunnel: bool
    ) -> None:
        self._dialer = dialer
        self._target = target
        self._client = client
        self._tunnel = tunnel
        self.pool = pool
        self.tried: set[int] = set()
        self.index: int | None = None
        self.why: list[str] = []

    def hop(self, now: float) -> Hop:
        """The L{Hop} through the member the strategy picks now (the first pick)."""
        hop = self._next(now)
        assert hop is not None  # (a pool has members, none tried yet)
        return hop

    def _next(self, now: float) -> Hop | None:
        index = self.pool.pick(now, self._client, self.tried)
        self.index = index
        if index is None:
            return None
        self.tried.add(index)
        member = self.pool.members[index]
        member.in_flight += 1
        target = self._target
        return self._dialer.via(
            member.parent, target.scheme, target.host, target.port, self._tunnel
        )

    def failed(self, hop: Hop, now: float) -> Hop | None:
        """
        The member of C{hop} failed (refused, timed out, its handshake refused): mark it
        down and return the hop through the next member, or L{None} when all were tried.
        """
        index = self.index
        if index is None:
            return None
        member = self.pool.members[index]
        member.in_flight -= 1
        self.why.append(member.name)
        self.pool.failed(index, now, "connection failed")
        hop_next = self._next(now)
        _log.info(
            "parent {member} failed: {target} goes to {next}",
            member=member.name,
            target=format_authority(self._target.host, self._target.port),
            next=hop_next.label if hop_next is not None else "no other member",
        )
        return hop_next

    def done(self) -> None:
        """The request is over: its member served it (up again), and is one less busy."""
        index, self.index = self.index, None
        if index is not None:
            self.pool.members[index].in_flight -= 1
            self.pool.succeeded(index)

    def final_error(self, err: ProxyError) -> ProxyError:
        """The error for the client when every member failed: a 502 naming them all."""
        if len(self.why) < 2:
            return err
        names = ", ".join(self.why)
        return BadGateway(
            f"every parent of the pool failed: {names} ({err.reason})",
            err.error_type or "destination_unavailable",
            details=f"parents {names}",
        )
