"""
L{RouteHalf}: how an exchange goes through a route chosen per request, a cache fleet's
member or a parent pool's (see L{aproxy.upstream.dialer.FleetRoute} and
L{aproxy.upstream.dialer.PoolRoute}), and fails over to the next member when one can't
be reached before anything of the request was sent; and how a CONNECT's upstream end is
dialed (or looked at first, to intercept it).

Like L{aproxy.client.answering.AnswerHalf}, the state stays in the one exchange object;
this class holds the code of this part of it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from aproxy.client.connection import PAUSE_DIAL
from aproxy.client.plan import plan_request
from aproxy.client.runtime import Runtime
from aproxy.client.side import ClientSide
from aproxy.errors import InternalError, ProxyError
from aproxy.http.head import RequestHead
from aproxy.http.target import Target
from aproxy.intercept.session import peek
from aproxy.upstream.dialer import Hop, PoolRoute
from aproxy.upstream.routes import Pool

__all__ = ["RouteHalf"]


class RouteHalf:
    """The code of an exchange's per-request routes (its state is the exchange's)."""

    conn: ClientSide
    runtime: Runtime
    head: RequestHead
    target: Target | None
    hop: Hop | None
    view: Any
    req_filter: Any
    out_head: bytes
    connecting: Deferred[Any] | None
    # The route chosen for this request (a fleet's or a pool's), if any.
    route: Any = None
    addon_parent: str | None

    def _dial(self, hop: Hop) -> None:
        raise NotImplementedError

    def _forward(self, rest: bytes) -> None:
        raise NotImplementedError

    def _stage_a(self, rest: bytes) -> bool:
        raise NotImplementedError

    def ended(self) -> None:
        raise NotImplementedError

    def _open_connect(self, rest: bytes) -> None:
        """Dial the tunnel's upstream end (or look at its first bytes to intercept)."""
        self.conn.stash(rest)
        rt = self.runtime
        hop = self.hop
        if self.addon_parent is not None:
            hop = self.hop = self._stage_route(hop)
        assert self.target is not None and hop is not None
        host, port = self.target.host, self.target.port
        if rt.interceptor is not None and rt.interceptor.wants(host):
            peek(self, rt.interceptor, host, port)  # (answered now: see intercept.session)
            return
        self._dial(hop)

    def dial_tunnel(self) -> None:
        """Dial the upstream end of this CONNECT's tunnel (after a look at its bytes)."""
        assert self.hop is not None
        self._dial(self.hop)

    def _routed(self, hop: Hop, tunnel: bool) -> Hop:
        """C{hop}, or the hop through the member a fleet or pool picks for this request."""
        rt = self.runtime
        router = rt.dialer.router
        if not (router.fleets or router.pools):
            return hop
        assert self.target is not None
        conn = self.conn
        route = rt.dialer.route_for(
            self.target, self.head, conn.user or conn.client_ip or "", tunnel
        )
        if route is None:
            return hop
        self.route = route
        return route.hop(conn.clock.seconds())

    def _stage_route(self, hop: Hop | None) -> Hop | None:
        """
        C{hop}, or the one a stage chose for this request at stage A
        (C{StageRequest.parent}) or an addon's request hook did (C{exchange.parent}): a
        parent proxy URL, a pool (C{STRATEGY:MEMBER,...}, with failover) or C{direct};
        the seam through which code picks the exit of each request.

        @raise InternalError: If the stage's choice is not a parent URL.
        """
        view = self.view
        choice = view.parent if view is not None else None
        if choice is None:
            choice = self.addon_parent  # (an addon's request hook chose it)
        if choice is None or self.target is None:
            return hop
        dialer = self.runtime.dialer
        try:
            chosen = dialer.router.exit_named(choice)
        except ValueError as e:
            raise InternalError(f"a stage chose a bad parent: {e}") from None
        self.route_done()
        target = self.target
        tunnel = target.scheme == b""  # (a CONNECT's)
        if isinstance(chosen, Pool):
            conn = self.conn
            client = conn.user or conn.client_ip or ""
            self.route = route = PoolRoute(dialer, chosen, target, client, tunnel)
            return route.hop(conn.clock.seconds())
        return dialer.via(chosen, target.scheme, target.host, target.port, tunnel)

    def route_done(self) -> None:
        """The exchange is over: its route's member is one request less busy."""
        route, self.route = self.route, None
        if route is not None:
            route.done()

    def route_error(self, err: ProxyError) -> ProxyError:
        """The error to answer when the dial failed and no member is left to try."""
        return err if self.route is None else self.route.final_error(err)

    def failover(self) -> bool:
        """
        The member of a fleet or pool this request was dialing failed: dial the next
        one (nothing of the request was sent). Return whether it did.
        """
        route, hop, conn, target = self.route, self.hop, self.conn, self.target
        hop = route.failed(hop, conn.clock.seconds()) if route and hop else None
        if hop is None or target is None:
            return False
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        self.hop = hop
        view = self.view
        if hop.parent is None and view is not None and view.peer:
            # A fleet's URL served here after all: the stages (the cache) see it anew.
            conn.unpause_for(PAUSE_DIAL)
            self.ended()
            if not self._stage_a(b""):
                self._forward(b"")
            return True
        self.out_head = plan_request(
            self.head, target, hop, self.runtime, conn.client_ip, self.req_filter, view
        ).head
        self._dial(hop)
        return True
