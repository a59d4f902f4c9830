"""
L{SocksProtocol}: one SOCKS5 client connection, another front end of the proxy's pipeline.

It is admitted like an HTTP client (L{aproxy.client.connection.ClientConnection}: the
C{--allow} networks, C{--max-connections}, C{--max-clients-per-ip}), logs in through the
same authenticator, cache and failed-login throttle, judges its destination by the same
rules (C{check_destination}, C{--connect-ports}, the address checks of the connector),
leaves through the same routes and dialer (a parent pool's failover included), and ends
as the same L{aproxy.client.tunnel.Tunnel}; a C{UDP ASSOCIATE} gets a relay
(L{aproxy.socks.udp}). Every refusal is a reply code (L{aproxy.socks.wire.reply_for})
and one access log record.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.client.connection import (
    DEADLINE_CONNECT,
    DEADLINE_HEAD,
    PAUSE_DIAL,
    ClientConnection,
)
from aproxy.client.context import ProxyContext
from aproxy.client.guard import guarded
from aproxy.client.plan import check_connect_port
from aproxy.client.protocol import ProxyProtocol
from aproxy.client.tunnel import Tunnel
from aproxy.errors import (
    BadRequest,
    Forbidden,
    GatewayTimeout,
    InternalError,
    NotImplementedByProxy,
    ProxyAuthRequired,
    ProxyError,
    RequestTimeout,
)
from aproxy.http.head import RequestHead
from aproxy.http.target import Target, format_authority
from aproxy.intercept.session import Peek
from aproxy.observe.records import Exchange
from aproxy.socks.hooks import SocksHooks
from aproxy.socks.login import SocksLogin
from aproxy.socks.shared import SocksShared
from aproxy.socks.udp import UdpRelay
from aproxy.socks.wire import (
    ADDRESS_NOT_SUPPORTED,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    COMMAND_NOT_SUPPORTED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    METHOD_NO_ACCEPTABLE,
    NETWORK_UNREACHABLE,
    REPLY_TEXT,
    SUCCEEDED,
    Credentials,
    Greeting,
    Request,
    ServerHandshake,
    SocksError,
    reply,
    reply_for,
    select_method,
)
from aproxy.upstream.connector import connect_error
from aproxy.upstream.dialer import Dialer, Hop
from aproxy.upstream.protocol import UpstreamProtocol, no_delay
from aproxy.workpool import as_client

__all__ = ["SocksProtocol"]

# Where a connection is (a small set: the handshake's steps are the parser's).
_HANDSHAKE, _LOGIN, _DIALING, _TUNNEL, _UDP, _CLOSING = range(6)
# Client bytes held after the request while its destination is dialed, before the
# client is paused (the parser already bounds what comes before the request).
_HOLD_LIMIT = 65536

REFUSED_WAIT = 2.0
"""
Seconds a refused client has to send its handshake and request to hear why, rather than
the header timeout: a client sends them at once, and a refused one holds a slot.
"""
_METHODS = {CMD_CONNECT: "CONNECT", CMD_UDP_ASSOCIATE: "UDP_ASSOCIATE", 2: "BIND"}


@implementer(IHalfCloseableProtocol)
class SocksProtocol(ClientConnection):
    """
    One SOCKS5 client connection (see the module docstring).

    @ivar socks: The SOCKS listener's factory (its session and UDP counts).
    @ivar user: The user it logged in as, if any.
    @ivar started: When the connection was made, on the clock.
    @ivar request: The SOCKS request, once read.
    @ivar hop: How the destination of a CONNECT is reached, once it is known.
    @ivar connecting: The dial (or the look at the client's first bytes) in flight.
    @ivar to_client: Bytes written to the client (replies, then the tunnel's).
    @ivar to_origin: Bytes written towards the destination.
    """

    log = Logger()
    transport: Any

    def __init__(self, factory: ProxyContext, socks: SocksShared, addr: IAddress | None) -> None:
        super().__init__(factory, addr)
        self.socks = socks
        self.state = _HANDSHAKE
        self.user: str | None = None
        self.last = False
        self._hs = ServerHandshake()
        self._refusal: ProxyError | None = None
        self.request: Request | None = None
        self.started = self.clock.seconds()
        self._checking: SocksLogin | None = None
        self.connecting: Deferred[Any] | None = None
        self._replied = False
        self.hop: Hop | None = None
        self._route: Any = None
        self.hooks: SocksHooks | None = None
        self._why: str | None = None
        self._pending = b""
        self._tunnel: Any = None  # (a Tunnel, or an intercepted TLS session)
        self.udp: UdpRelay | None = None
        self._reported = False
        self.to_client = 0
        self.to_origin = 0

    # -- Twisted protocol interface ---------------------------------------------------

    def connectionMade(self) -> None:
        """Admit the client and start the handshake timer (C{--header-timeout})."""
        self.factory.connections.add(self)
        self.socks.sessions += 1
        no_delay(self.transport)
        # (A refused client hears why in its reply, if it asks soon: see REFUSED_WAIT.)
        self._refusal = refusal = self._admit()
        wait = self.config.header_timeout
        self.set_deadline(DEADLINE_HEAD, wait if refusal is None else min(wait, REFUSED_WAIT))

    @guarded
    def dataReceived(self, data: bytes) -> None:
        """Handshake bytes, or bytes held while the destination is dialed."""
        state = self.state
        if state in (_HANDSHAKE, _LOGIN):
            try:
                self._hs.feed(data)
            except SocksError as e:
                self._protocol_error(e)
                return
            self._advance()
        elif state == _DIALING:
            self._pending += data
            if len(self._pending) > _HOLD_LIMIT:
                self.pause_for(PAUSE_DIAL)
        # (_UDP: the control connection carries nothing more; bytes are ignored.)

    @guarded
    def readConnectionLost(self) -> None:
        """A half-close: passed on in a tunnel; otherwise the end of the session."""
        if self._tunnel is not None:
            self._tunnel.client_eof()
        else:
            self.close()

    def writeConnectionLost(self) -> None:
        """Our write side was shut down (a tunnel's half-close)."""

    @guarded
    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        """Stop everything the session started, and report it if nobody did yet."""
        self._release_slot()
        self.cancel_timer()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self.state = _CLOSING
        self._stop()
        if self.to_client or self.request is not None:
            # (A connection that never spoke SOCKS5, a port scan or a health check, is
            # not a session: as for HTTP, no record.)
            self._report(0, None)
        self.socks.sessions -= 1
        self.factory.connection_gone(self)

    def drain(self) -> None:
        """The proxy stops: close a session still in its handshake; let others finish."""
        self.last = True
        if self.state == _HANDSHAKE:
            self.close()

    def _is_closing(self) -> bool:
        return self.state == _CLOSING

    # -- the handshake ----------------------------------------------------------------

    def _advance(self) -> None:
        """Take the handshake's events until it needs bytes or an answer."""
        while self.state == _HANDSHAKE:
            try:
                event = self._hs.next_event()
            except SocksError as e:
                self._protocol_error(e)
                return
            if event is None:
                return
            if isinstance(event, Greeting):
                self._greeting(event)
            elif isinstance(event, Credentials):
                self._login(event)
            else:
                self._requested(event)

    def _write(self, data: bytes) -> None:
        self.to_client += len(data)
        self.transport.write(data)

    def _greeting(self, greeting: Greeting) -> None:
        login = self.runtime.authenticator is not None and self._refusal is None
        method = select_method(greeting.methods, login)
        self._write(self._hs.choose(method))
        if method == METHOD_NO_ACCEPTABLE:
            err: ProxyError = (
                ProxyAuthRequired("the client offers no username/password login")
                if login
                else BadRequest("the client offers no method without authentication")
            )
            self.log.info(
                "SOCKS5 client {client} refused: {why}", client=self.client_ip, why=err.reason
            )
            self._report(err.status, err.error_type)
            self.close()

    def _protocol_error(self, e: SocksError) -> None:
        """A message that can't be served: its reply (if any), a record, and a close."""
        if self.state == _CLOSING:
            return
        status = 501 if e.reply in (COMMAND_NOT_SUPPORTED, ADDRESS_NOT_SUPPORTED) else 400
        self.log.info("SOCKS5 client {client} refused: {why}", client=self.client_ip, why=e.reason)
        if e.reply is not None:
            self._write(reply(e.reply))
        self._report(status, "http_request_error")
        self.close()

    # -- login (RFC 1929: see aproxy.socks.login) ------------------------------------

    def _login(self, event: Credentials) -> None:
        self.state = _LOGIN
        self._checking = SocksLogin(self, event, self._logged_in)
        self._checking.start()

    def _logged_in(self, result: str | ProxyError) -> None:
        self._checking = None
        if self.state != _LOGIN:
            return
        if isinstance(result, ProxyError):
            self._login_refused(result)
            return
        self.user = result
        self._write(self._hs.login_result(True))
        self.state = _HANDSHAKE
        self._advance()

    def _login_refused(self, err: ProxyError) -> None:
        """RFC 1929: a failure status, then the connection is closed."""
        self.log.info("SOCKS5 login from {client}: {why}", client=self.client_ip, why=err.reason)
        self._write(self._hs.login_result(False))
        self._report(err.status, err.error_type)
        self.close()

    # -- the request ------------------------------------------------------------------

    def _requested(self, request: Request) -> None:
        self.request = request
        self._pending = self._hs.rest
        # The request runs on the configuration in force now (see Runtime).
        self.runtime = rt = self.factory.runtime
        try:
            if self._refusal is not None:
                raise self._refusal
            if request.command == CMD_CONNECT:
                self.factory.check_destination(request.host, request.port, rt)
                check_connect_port(rt.config, request.port)
                self._connect(request)
            elif request.command == CMD_UDP_ASSOCIATE:
                self._associate(request)
            else:
                raise NotImplementedByProxy("SOCKS5 BIND is not supported")
        except ProxyError as e:
            self.refuse(e)

    def refuse(self, err: ProxyError, code: int | None = None) -> None:
        """Reply to the request with the code for C{err}, report it and close."""
        if self.state == _CLOSING:
            return
        code = reply_for(err) if code is None else code
        self._why = err.reason
        self.log.info(
            "SOCKS5 {method} {target} from {client} refused ({code}): {why}",
            method=_method(self.request),
            target=_target(self.request),
            client=self.client_ip,
            code=REPLY_TEXT[code],
            why=err.reason,
        )
        if not self._replied:
            # (After an early success, an intercepted CONNECT's, the client's bytes are
            # a TLS stream: a reply now would corrupt it. The close says it.)
            self._replied = True
            self._write(reply(code))
        self._report(err.status, err.error_type)
        self.close()

    def _connect(self, request: Request) -> None:
        rt = self.runtime
        host, port = request.host, request.port
        who = self.user or self.client_ip or ""
        hop, self._route = _routed(rt.dialer, host, port, who, self.clock.seconds())
        self.state = _DIALING
        self.hop = hop
        if rt.addons is not None:
            self.cancel_timer()  # (the addons' own timeout bounds their wait)
            self.hooks = SocksHooks(self, rt.addons, host, port)
            self.hooks.request(self._open)
            return
        self._open()

    def _open(self) -> None:
        """After the addons' request hooks: their exit, then a look or the dial."""
        hooks, hop, request = self.hooks, self.hop, self.request
        assert hop is not None and request is not None
        host, port = request.host, request.port
        if hooks is not None:
            try:
                hop, self._route = hooks.exit(hop, self._route)
                self.hop = hop
            except ProxyError as e:
                self.refuse(e)
                return
        interceptor = self.runtime.interceptor
        if interceptor is not None and interceptor.wants(host):
            # As for an HTTP CONNECT (see aproxy.intercept.session): the success reply
            # now, then a look at the client's first bytes decides.
            self.cancel_timer()
            self._replied = True
            self._write(reply(SUCCEEDED))
            pending, self._pending = self._pending, b""
            peeking = Peek(self, interceptor, host, port).start(pending)
            # (Cancelled when the client leaves first: nothing more to do then.)
            self.connecting = peeking.addErrback(_ignore_cancel)
            return
        self._dial(hop)

    # What an intercepted CONNECT's Peek asks of the exchange and the connection (the
    # session is both: see aproxy.intercept.session.Peek).

    @property
    def conn(self) -> SocksProtocol:
        """The connection (this session itself)."""
        return self

    def stash(self, data: bytes) -> None:
        """Keep client bytes read before the tunnel, for its start."""
        self._pending += data

    def dial_tunnel(self) -> None:
        """Dial the destination of a CONNECT that is not intercepted after all."""
        assert self.hop is not None
        self._dial(self.hop)

    def inner_protocol(self, session: Any) -> ProxyProtocol:
        """A protocol reading the requests of an intercepted C{session}."""
        return ProxyProtocol(self.factory, self.client_address, session)

    def _dial(self, hop: Hop) -> None:
        self.hop = hop
        self.pause_for(PAUSE_DIAL)
        self.set_deadline(DEADLINE_CONNECT, self.config.connect_timeout)
        d = as_client(self.client_ip, self.runtime.dialer.open, hop)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _failover(self) -> bool:
        """A pool's member failed before anything was sent: dial the next one, if any."""
        route, hop = self._route, self.hop
        nxt = route.failed(hop, self.clock.seconds()) if route and hop else None
        if nxt is None:
            return False
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        self._dial(nxt)
        return True

    @guarded
    def _connected(self, up: UpstreamProtocol) -> None:
        self.connecting = None
        if self.state != _DIALING:
            up.transport.loseConnection()
            return
        try:
            # The name may have led back to this proxy: a loop.
            self.factory.loops.check_connected(up.transport.getPeer(), up.transport.getHost())
        except Forbidden as loop:
            up.transport.abortConnection()
            self.refuse(loop)
            return
        if not self._replied:
            self._replied = True
            bound = up.transport.getHost()
            host, port = getattr(bound, "host", "0.0.0.0"), getattr(bound, "port", 0)
            self._write(reply(SUCCEEDED, host, port))
        tunnel = Tunnel(
            self.transport, up, self.clock, self.config.tunnel_idle_timeout, self._tunnel_closed
        )
        pending, self._pending = self._pending, b""
        self.adopt_tunnel(tunnel, pending)

    def adopt_tunnel(self, tunnel: Any, to_origin: bytes, to_client: bytes = b"") -> None:
        """
        Hand this connection to C{tunnel}: a L{Tunnel}, or an intercepted TLS session
        (L{aproxy.intercept.session.InterceptedSession}), which has the same methods.
        """
        self.cancel_timer()
        if getattr(tunnel, "on_close", False) is None:
            tunnel.on_close = self._tunnel_closed
        self._tunnel = tunnel
        self.state = _TUNNEL
        self.factory.tunnels += 1
        if self.hooks is not None:
            self.hooks.opened()
        self.dataReceived = tunnel.from_client  # type: ignore[method-assign]
        if self._paused:
            self._paused = 0
            self.transport.resumeProducing()
        tunnel.start(to_origin, to_client)

    @guarded
    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(CancelledError) or self.state != _DIALING:
            return
        if self._failover():
            return
        request = self.request
        assert request is not None
        err = connect_error(failure, request.host, request.port)
        if self._route is not None:
            err = self._route.final_error(err)
        self.refuse(err, _unreachable(failure))

    @guarded
    def _tunnel_closed(self, tunnel: Any) -> None:
        self.factory.tunnels -= 1
        self.state = _CLOSING
        self.to_client += tunnel.to_client
        self.to_origin += tunnel.to_origin
        self._report(200, None)

    # -- UDP ASSOCIATE ----------------------------------------------------------------

    def _associate(self, request: Request) -> None:
        client_ip = self.client_ip
        if client_ip is None:
            raise NotImplementedByProxy("UDP ASSOCIATE needs a TCP client")
        relay = UdpRelay(self, client_ip, request.port, self.socks)
        local = getattr(self.transport.getHost(), "host", "0.0.0.0")
        host, port = relay.start(self.socks.reactor, local)
        self.udp = relay
        self.cancel_timer()
        self.state = _UDP
        self._write(reply(SUCCEEDED, host, port))

    def udp_ended(self, why: str) -> None:
        """The relay ended on its own (idle): end the control connection with it."""
        self.log.info("SOCKS5 UDP relay for {client} closed: {why}", client=self.client_ip, why=why)
        self.close()

    # -- timers, errors and closing ---------------------------------------------------

    @guarded
    def _deadline_passed(self, kind: int) -> None:
        if kind == DEADLINE_HEAD:
            if self.to_client:  # (a client that never spoke SOCKS5 leaves no record)
                err = RequestTimeout("SOCKS5 handshake (or login) not completed in time")
                self._report(err.status, err.error_type)
            self.close()
        elif kind == DEADLINE_CONNECT and self.state == _DIALING:
            if self._failover():
                return
            request = self.request
            assert request is not None
            where = format_authority(request.host, request.port)
            self.refuse(GatewayTimeout(f"connecting to {where} timed out", "connection_timeout"))

    def fail(self, err: ProxyError) -> None:
        """Refuse the request in flight with C{err} (see L{refuse})."""
        self.refuse(err)

    def internal_error(self, failure: Failure) -> None:
        """A bug: log it once, answer a general failure if the reply is not sent, close."""
        self.log.failure(
            "internal error in the SOCKS5 session of {client}; that connection is closed",
            failure,
            client=self.client_ip,
        )
        try:
            if self.state in (_DIALING, _HANDSHAKE) and self.request is not None:
                self.refuse(InternalError("internal error in the proxy"), GENERAL_FAILURE)
            else:
                self.close()
        except Exception:
            self.transport.abortConnection()

    def _stop(self) -> None:
        """Cancel a login check, hooks or a dial in flight; end the route and the relay."""
        if self._checking is not None:
            checking, self._checking = self._checking, None
            checking.cancel()
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        if self.hooks is not None:
            self.hooks.cancel()
        route, self._route = self._route, None
        if route is not None:
            route.done()
        if self.udp is not None:
            udp, self.udp = self.udp, None
            udp.stop()
            self._report(200, None, udp)

    def close(self) -> None:
        """Close once what was written to the client is sent."""
        if self.state == _CLOSING:
            if self._tunnel is None:
                self.transport.loseConnection()
            return
        self.state = _CLOSING
        self.cancel_timer()
        self._stop()
        if self._paused:
            self._paused = 0
            self.transport.resumeProducing()
        self.transport.loseConnection()

    # -- records ----------------------------------------------------------------------

    def _report(self, status: int, error: str | None, udp: UdpRelay | None = None) -> None:
        """Report the session, once, to the factory's observers (access log, metrics)."""
        if not self._reported:
            self._reported = True
            if self.hooks is not None:
                self.hooks.ended(error, self._why, self.to_client, self.to_origin)
            if self.factory.observers:
                _report(self, status, error, udp)

    emit = _report  # (what an intercepted CONNECT's Peek calls: see aproxy.intercept)


def _report(conn: SocksProtocol, status: int, error: str | None, udp: UdpRelay | None) -> None:
    """Build the record of session C{conn} and hand it to every observer."""
    to_client, to_origin = conn.to_client, conn.to_origin
    if udp is not None:
        to_client += udp.bytes_to_client
        to_origin += udp.bytes_to_origin
    hop = conn.hop
    record = Exchange(
        conn.started,
        conn.client_ip or "unix",
        conn.user,
        _method(conn.request),
        _target(conn.request),
        status,
        to_client,
        to_origin,
        conn.clock.seconds() - conn.started,
        hop.label if hop is not None else "direct",
        error,
        "SOCKS5",
        datagrams=udp.datagrams if udp is not None else None,
    )
    for observer in conn.factory.observers:
        observer(record)


def _routed(dialer: Dialer, host: str, port: int, who: str, now: float) -> tuple[Hop, Any]:
    """The hop of a CONNECT to C{host:port} by the routes, and its pool route if any."""
    hop = dialer.plan(b"", host, port, True)
    router = dialer.router
    if not (router.fleets or router.pools):
        return hop, None
    target = Target(b"", host, port, format_authority(host, port).encode("idna"), b"")
    # (A tunnel's route never reads the request head.)
    route = dialer.route_for(target, cast(RequestHead, None), who, True)
    return (hop, None) if route is None else (route.hop(now), route)


def _method(request: Request | None) -> str:
    """The record's method for C{request}: CONNECT, UDP_ASSOCIATE, BIND, or C{-}."""
    return _METHODS.get(request.command, "-") if request is not None else "-"


def _target(request: Request | None) -> str:
    """The record's target for C{request}: C{host:port}, or C{-}."""
    return format_authority(request.host, request.port) if request is not None else "-"


def _unreachable(failure: Failure) -> int | None:
    """The reply code for a connection error the HTTP side has no status for."""
    if failure.check(ierror.NoRouteError):
        return HOST_UNREACHABLE
    value = failure.value
    if isinstance(value, ierror.ConnectError) and "unreachable" in str(value).lower():
        return NETWORK_UNREACHABLE if "network" in str(value).lower() else HOST_UNREACHABLE
    return None


def _ignore_cancel(failure: Failure) -> None:
    """A look at the client's first bytes, cancelled because the client left."""
    failure.trap(CancelledError)
