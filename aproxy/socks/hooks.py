"""
L{SocksHooks}: the addon hooks (L{aproxy.addons.IAddon}) of one SOCKS5 C{CONNECT}, as an
HTTP C{CONNECT} meets them: C{request} after the proxy's own checks and before the dial
(an addon may refuse it, 0x02, or pick its exit with C{exchange.parent}), C{tunnel_open}
and C{tunnel_close} around the tunnel, C{error} and C{done} at the end. The request an
addon sees is C{CONNECT host:port} with version C{SOCKS5} and no fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.addons.api import AddonExchange, Fields, RequestView
from aproxy.addons.run import AddonFailure
from aproxy.client.guard import guarded
from aproxy.errors import Forbidden, GatewayTimeout, InternalError
from aproxy.http.target import Target, format_authority
from aproxy.upstream.dialer import Dialer, Hop, PoolRoute
from aproxy.upstream.routes import Pool

__all__ = ["SocksHooks"]


class SocksHooks:
    """
    The hooks of one SOCKS5 C{CONNECT} (see the module docstring).

    @param conn: The session (a L{aproxy.socks.protocol.SocksProtocol}).
    @param addons: The runtime's L{aproxy.addons.run.AddonSet}.
    @ivar exchange: The exchange as the hooks see it.
    """

    log = Logger()

    def __init__(self, conn: Any, addons: Any, host: str, port: int) -> None:
        self.conn = conn
        self.addons = addons
        self.host = host
        self.port = port
        authority = format_authority(host, port)
        view = RequestView("CONNECT", authority, "", host, port, "SOCKS5", Fields([]))
        self.exchange = AddonExchange(conn.client_ip or "unix", conn.user, view)
        self._opened = False
        self._ended = False
        self._waiting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._then: Callable[[], None] = lambda: None

    def internal_error(self, failure: Failure) -> None:
        """A bug in one of the callbacks: the session handles it."""
        self.conn.internal_error(failure)

    def request(self, then: Callable[[], None]) -> None:
        """
        Run the C{request} hooks, then C{then()} unless an addon refused (the session is
        then refused: L{Forbidden}, or the failure of the addon, or a timeout).
        """
        self._then = then
        addons = self.addons
        try:
            later = addons.run("request", addons.request, self.exchange)
        except AddonFailure as e:
            self._failed(e)
            return
        if later is None:
            self._decided()
            return
        self._waiting = later
        self._timer = self.conn.clock.callLater(addons.timeout, self._timed_out)
        later.addCallbacks(self._fired, self._later_failed)

    def cancel(self) -> None:
        """The session ended first: drop the wait (the hook is cancelled)."""
        self._stop_timer()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    @guarded
    def _fired(self, ignored: object) -> None:
        self._stop_timer()
        self._waiting = None
        self._decided()

    @guarded
    def _later_failed(self, failure: Failure) -> None:
        self._stop_timer()
        self._waiting = None
        if failure.check(CancelledError):
            return
        if isinstance(failure.value, AddonFailure):
            self._failed(failure.value)
            return
        self.internal_error(failure)

    @guarded
    def _timed_out(self) -> None:
        self._timer = None
        waiting, self._waiting = self._waiting, None
        name = self.exchange.addon or "?"
        timeout = self.addons.timeout
        self.conn.refuse(
            GatewayTimeout(
                f"addon {name} did not answer within {timeout:g} s",
                "http_response_timeout",
                details=f"addon {name}",
            )
        )
        if waiting is not None:
            waiting.cancel()

    def _failed(self, e: AddonFailure) -> None:
        self.conn.refuse(
            InternalError(
                f"internal error in the proxy: addon {e.addon} failed (it was logged)",
                details=f"addon {e.addon}",
            )
        )

    def _decided(self) -> None:
        ex = self.exchange
        if ex.reply is not None:
            # A SOCKS5 client can't be given an HTTP answer: any reply is a refusal.
            self.conn.refuse(
                Forbidden(f"addon {ex.reply.addon} refused the request", details=ex.reply.addon)
            )
            return
        self._then()

    def exit(self, hop: Hop, route: Any) -> tuple[Hop, Any]:
        """
        C{hop} and C{route} (the routes' choice), or the hop through the exit an addon
        chose (C{exchange.parent}: a parent URL, a pool, or C{direct}) and its pool route
        (C{route} is then over).

        @raise ProxyError: If the choice can't be used (a 500 naming the addon).
        """
        choice = self.exchange.parent
        if choice is None:
            return hop, route
        if route is not None:
            route.done()
        dialer: Dialer = self.conn.runtime.dialer
        try:
            chosen = dialer.router.exit_named(choice)
        except ValueError as e:
            name = self.exchange.addon or "?"
            self.log.warn("addon {name}: its exit can't be used: {why}", name=name, why=e)
            raise InternalError(
                f"internal error in the proxy: addon {name} chose a bad exit",
                details=f"addon {name}",
            ) from None
        if isinstance(chosen, Pool):
            authority = format_authority(self.host, self.port).encode("idna")
            target = Target(b"", self.host, self.port, authority, b"")
            conn = self.conn
            client = conn.user or conn.client_ip or ""
            pool = PoolRoute(dialer, chosen, target, client, True)
            return pool.hop(conn.clock.seconds()), pool
        return dialer.via(chosen, b"", self.host, self.port, True), None

    def opened(self) -> None:
        """The tunnel is open: C{tunnel_open}."""
        self._opened = True
        addons = self.addons
        addons.notify("tunnel_open", addons.tunnel_open, self.exchange)

    def ended(self, error: str | None, reason: str | None, to_client: int, to_origin: int) -> None:
        """The session is over: C{tunnel_close}, C{error} and C{done}, once."""
        if self._ended:
            return
        self._ended = True
        self.cancel()
        addons, ex = self.addons, self.exchange
        if self._opened:
            addons.notify("tunnel_close", addons.tunnel_close, ex, to_origin, to_client)
        if error is not None:
            addons.notify("error", addons.error, ex, reason or error)
        addons.notify("done", addons.done, ex)
