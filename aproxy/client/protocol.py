"""
The client side: L{aproxy.client.factory.ProxyFactory} spawns one L{ProxyProtocol} per
client connection.

A L{ProxyProtocol} owns the connection: it reads request heads with the sans-IO parser,
admits and authenticates, holds pipelined bytes, keeps the timers and the reasons to stop
reading, turns into a tunnel after a CONNECT or a 101, and closes. It moves between the
phases of L{aproxy.client.phases}, each move checked against one table. Each request is a
L{aproxy.client.exchange.ClientExchange} of its own, which routes it, owns its upstream
connection and streams both bodies. Every L{ProxyError} becomes a response in one place,
L{ProxyProtocol.fail}; every way in is guarded (L{aproxy.client.guard}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.access.auth import basic_challenge
from aproxy.access.pac import PAC_CONTENT_TYPE, PAC_PATHS, pac_body
from aproxy.client.connection import (
    DEADLINE_CONNECT,
    DEADLINE_HEAD,
    DEADLINE_IDLE,
    PAUSE_HOLD,
    PAUSE_UPSTREAM,
    ClientConnection,
    OutputGate,
)
from aproxy.client.context import ProxyContext
from aproxy.client.exchange import ClientExchange, report_refused
from aproxy.client.guard import guarded
from aproxy.client.login import LoginCheck
from aproxy.client.phases import ALLOWED, Phase, check_move
from aproxy.client.stages import Answer
from aproxy.client.tunnel import Tunnel
from aproxy.errors import (
    BadRequest,
    GatewayTimeout,
    InternalError,
    ProxyAuthRequired,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
)
from aproxy.http.answers import error_response
from aproxy.http.head import HeadReader, RequestHead, parse_request_head
from aproxy.upstream.protocol import UpstreamProtocol, no_delay

__all__ = ["ProxyProtocol"]


# Bytes of pipelined requests held while one is in flight before the client is paused.
_HOLD_LIMIT = 65536
_READING, _AUTHENTICATING, _FORWARDING, _WAITING, _TUNNEL, _CLOSING = (
    Phase.READING,
    Phase.AUTHENTICATING,
    Phase.FORWARDING,
    Phase.WAITING,
    Phase.TUNNEL,
    Phase.CLOSING,
)


@implementer(IHalfCloseableProtocol)
class ProxyProtocol(ClientConnection):
    """
    One client connection: parses its requests, forwards each to its own origin in turn
    and relays the responses in order.

    @ivar phase: Where the connection is (see L{aproxy.client.phases}).
    @ivar user: The user its last request authenticated as, if any.
    @ivar eof: Whether the client half-closed (no request follows the one in flight).
    @ivar last: Whether the proxy is shutting down (close after the one in flight).
    @ivar output: The client transport's producer (see L{OutputGate}).
    """

    log = Logger()
    transport: Any

    def __init__(
        self, factory: ProxyContext, addr: IAddress | None = None, session: Any = None
    ) -> None:
        super().__init__(factory, addr)
        # An intercepted TLS session this connection reads the requests of, if any (see
        # aproxy.intercept.session): admitted and authenticated by the CONNECT already.
        self.session = session
        config = self.config
        self._reader = HeadReader(config.max_head_size, config.max_request_line)
        self.phase = _READING
        self._pending = b""
        self._draining = False
        self.last = False
        self.eof = False
        self.user: str | None = None
        self._x: ClientExchange | None = None
        self._tunnel: Tunnel | None = None
        self.output = OutputGate(self._output_drained)
        self._gated = False
        self._linger: IDelayedCall | None = None

    @property
    def exchange(self) -> ClientExchange | None:
        """The request in flight (or the last one, while closing), if any."""
        return self._x

    def move(self, phase: Phase) -> None:
        """Move to C{phase}: the one place where moves are made, and checked."""
        if phase not in ALLOWED[self.phase]:
            check_move(self.phase, phase)  # raises, naming the move
        self.phase = phase

    # -- Twisted protocol interface ---------------------------------------------------

    def connectionMade(self) -> None:
        """
        Admit the client (allowed network, connection limits) and start the header
        timer: a new client must send a request head promptly.
        """
        self.factory.connections.add(self)
        no_delay(self.transport)
        self.transport.registerProducer(self.output, True)
        self._gated = True
        self.set_deadline(DEADLINE_HEAD, self.config.header_timeout)
        if self._proxy_header is not None:
            # Behind a PROXY protocol listener the client's address is known only once
            # the load balancer's header has been read.
            self.dataReceived = self._admit_then_receive  # type: ignore[method-assign]
            return
        if self.session is not None:
            self.client_ip, self.user = self.session.client_ip, self.session.user
            return
        refusal = self._admit()
        if refusal is not None:
            self.fail(refusal)

    @guarded
    def _admit_then_receive(self, data: bytes) -> None:
        if self.phase is _CLOSING:
            return
        rest = self._read_proxy_header(data)
        if rest is None:
            return
        del self.dataReceived
        if rest:
            self.dataReceived(rest)

    def drain(self) -> None:
        """
        The proxy is shutting down: close now if idle; otherwise finish the request or
        tunnel in flight and close after it.
        """
        self.last = True
        if self.phase is _READING and not self._reader.pending:
            self.close()

    @guarded
    def dataReceived(self, data: bytes) -> None:
        """Route client bytes by phase: a request head, request body or held bytes."""
        phase = self.phase
        if phase is _READING:
            self._read_head(data)
        elif phase is _FORWARDING:
            self._x.request_data(data)  # type: ignore[union-attr]
        elif phase is not _CLOSING:
            self.hold(data)

    @guarded
    def readConnectionLost(self) -> None:
        """
        The client half-closed. In a tunnel that is passed on to the origin; while its
        credentials wait to be checked it is taken as gone; otherwise a request in flight
        is still answered, and the connection is closed after it.
        """
        x = self._x
        if self._tunnel is not None:
            self._tunnel.client_eof()
        elif x is not None and x.checking is not None:
            # Closed while its credentials wait to be checked: taken as gone (as Squid's
            # half_closed_clients off and nginx do), so the check is dropped, not run.
            self.close()
        elif x is not None and self.phase in (Phase.DIALING, _FORWARDING):
            if x.req_body is None:
                x.keep_client = False
                self.eof = True
            else:
                self.fail(BadRequest("the client closed before sending the whole request body"))
        else:
            self.close()

    def writeConnectionLost(self) -> None:
        """Our write side towards the client was shut down (a tunnel's half-close)."""

    @guarded
    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        """Stop everything this connection started: timer, dial, upstream connection."""
        self._release_slot()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        x = self._x
        if x is not None and self._tunnel is None:
            # The client left with a request unfinished (its own end is not an error of
            # the proxy's, so no Proxy-Status type).
            x.emit(x.status, None)
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self.phase = _CLOSING
        self._stop(abort=True)
        # Last: this may complete a graceful shutdown (which closes the access log).
        self.factory.connection_gone(self)

    # -- what the exchange asks of the connection -------------------------------------

    def _is_closing(self) -> bool:
        return self.phase is _CLOSING

    def hold(self, data: bytes) -> None:
        """Keep client bytes for later, and stop reading past a bound."""
        self._pending += data
        if len(self._pending) > _HOLD_LIMIT:
            self.pause_for(PAUSE_HOLD)

    def stash(self, data: bytes) -> None:
        """Keep client bytes for the next step (already read: no bound applies)."""
        if data:
            self._pending += data

    def take_pending(self) -> bytes:
        """The client bytes held so far, handed over and forgotten."""
        pending, self._pending = self._pending, b""
        return pending

    def exchange_done(self, keep: bool) -> None:
        """The exchange ended: read the next request (C{keep}) or close."""
        x = self._x
        if not keep:
            self.close()
            return
        if x is not None:
            x.ended()
        self.unpause_for(PAUSE_UPSTREAM)
        self._next_request(self.take_pending())

    # -- timers -----------------------------------------------------------------------

    @guarded
    def _deadline_passed(self, kind: int) -> None:
        """The timer ran out while waiting for C{kind}: close or answer accordingly."""
        x = self._x
        header = self._proxy_header
        if kind == DEADLINE_HEAD and header is not None:
            # A trusted load balancer that sent no PROXY header in time: a plain TCP
            # health check when it sent nothing (closed quietly), a fault when it sent
            # part of one.
            if header.pending:
                self.log.info(
                    "connection from load balancer {peer} closed: incomplete PROXY header",
                    peer=getattr(self.transport.getPeer(), "host", None),
                )
            self.close()
        elif self.phase is _AUTHENTICATING:
            # A request whose password check (or its turn for one) outlasted the timer:
            # answer it, rather than close as on an idle connection.
            self.fail(
                ServiceUnavailable(
                    "the proxy could not check your credentials in time: try again",
                    "proxy_internal_response",
                )
            )
        elif kind == DEADLINE_IDLE or (kind == DEADLINE_HEAD and not self._reader.pending):
            self.close()
        elif kind == DEADLINE_HEAD:
            self.fail(RequestTimeout("request head not received within the header timeout"))
        elif kind == DEADLINE_CONNECT:
            if x is not None and x.failover():
                return  # a fleet's or a pool's member did not answer: the next one
            target = x.target if x is not None else None
            where = f"{target.host}:{target.port}" if target else "origin"
            hop = x.hop if x is not None else None
            if hop is not None and hop.parent is not None:
                where += f" through parent proxy {hop.parent.name}"
            self.fail(
                GatewayTimeout(
                    f"connecting to {where} timed out", "connection_timeout", details=where
                )
            )
        elif x is not None and x.resp is None and x.req_body is not None:
            self.fail(RequestTimeout("request body not received within the read timeout"))
        else:
            self.fail(
                GatewayTimeout(
                    "no response from the origin within the read timeout",
                    "http_response_timeout",
                )
            )

    # -- requests ---------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        try:
            raw = self._reader.feed(data)
            if raw is None:
                if self.deadline_kind != DEADLINE_HEAD:
                    self.set_deadline(DEADLINE_HEAD, self.config.header_timeout)
                return
            head = parse_request_head(raw)
            rest = self._reader.rest
            self._reader.rest = b""
            self._start_request(head, rest)
        except ProxyError as e:
            self.fail(e)

    def _start_request(self, head: RequestHead, rest: bytes) -> None:
        # The whole request runs on the configuration in force now (see Runtime).
        self.runtime = rt = self.factory.runtime
        session = self.session
        if session is not None:
            session.absolutize(head)
        self._x = x = ClientExchange(self, rt, head)
        if session is None and head.target in PAC_PATHS and head.method in (b"GET", b"HEAD"):
            # The proxy's own PAC file: for anyone (clients fetch it before they know
            # the proxy, so before any login).
            hosts = head.values(b"host")
            host = hosts[0].decode("ascii", "replace") if hosts else None
            fields = ((b"Content-Type", PAC_CONTENT_TYPE), (b"Cache-Control", b"max-age=300"))
            x.send_answer(Answer(200, b"OK", fields, pac_body(rt.config, rt.pac_file, host)), rest)
            return
        auth = rt.authenticator
        if auth is None or session is not None:
            x.authorized(rest)
            return
        self.move(_AUTHENTICATING)
        self._pending = rest
        LoginCheck(self, x).start()

    def _next_request(self, pending: bytes) -> None:
        if self.last:
            self.close()
            return
        self._x = None
        if self.output.paused:
            # The client is not reading its answers: start nothing new (and read no more)
            # until what waits for it was written, so that a client that pipelines and
            # never reads costs a bounded amount of memory. The idle timeout applies.
            self.move(_WAITING)
            self._pending = pending
            self.pause_for(PAUSE_HOLD)
            self.set_deadline(DEADLINE_IDLE, self.config.idle_timeout)
            return
        self.move(_READING)
        self._pending = b""
        self.unpause_for(PAUSE_HOLD)
        self.set_deadline(DEADLINE_IDLE, self.config.idle_timeout)
        if not pending:
            return
        if self._draining:
            # Called from inside the loop below (a locally answered request): let the
            # loop pick the bytes up instead of recursing.
            self._pending = pending
            return
        self._draining = True
        try:
            while pending and self.phase is _READING:
                self._read_head(pending)
                pending = b""
                if self.phase is _READING and self._pending:
                    pending, self._pending = self._pending, b""
        finally:
            self._draining = False

    @guarded
    def _output_drained(self) -> None:
        """Everything was written to the client: a request waiting for that may start."""
        if self.phase is _WAITING:
            self._next_request(self.take_pending())

    # -- tunnels ----------------------------------------------------------------------

    def open_tunnel(self, up: UpstreamProtocol, to_origin: bytes, to_client: bytes) -> None:
        """Switch this connection to a raw relay with C{up} (after a CONNECT or a 101)."""
        tunnel = Tunnel(
            self.transport, up, self.clock, self.config.tunnel_idle_timeout, self._tunnel_closed
        )
        self.adopt_tunnel(tunnel, to_origin, to_client)

    def inner_protocol(self, session: Any) -> ProxyProtocol:
        """A protocol reading the requests of C{session}, intercepted on this connection."""
        return ProxyProtocol(self.factory, self.client_address, session)

    def adopt_tunnel(self, tunnel: Any, to_origin: bytes, to_client: bytes = b"") -> None:
        """
        Hand this connection to C{tunnel}: a L{Tunnel}, or an intercepted TLS session
        (L{aproxy.intercept.session.InterceptedSession}), which has the same methods.
        """
        assert self._x is not None
        self._x.detach()
        self.cancel_timer()
        self.move(_TUNNEL)
        if getattr(tunnel, "on_close", False) is None:
            tunnel.on_close = self._tunnel_closed
        self._tunnel = tunnel
        self.factory.tunnels += 1
        # The tunnel registers the two transports as each other's producers.
        self._ungate()
        self.dataReceived = tunnel.from_client  # type: ignore[method-assign]
        if self._paused:
            self._paused = 0
            self.transport.resumeProducing()
        self._x.hooks_tunnel()
        tunnel.start(to_origin, to_client)
        if self.eof:
            tunnel.client_eof()

    @guarded
    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        # Called once per tunnel (Tunnel.close runs once), however it ends.
        self.factory.tunnels -= 1
        self.phase = _CLOSING
        x = self._x
        if x is not None:
            x.emit(x.status, None, tunnel.to_client, tunnel.to_origin)

    @property
    def is_tunnel(self) -> bool:
        """Whether this connection is a CONNECT or Upgrade tunnel now."""
        return self._tunnel is not None and not self._tunnel.closed

    # -- errors and closing -----------------------------------------------------------

    def _truncate(self, x: ClientExchange, err: ProxyError) -> None:
        """A failure after the response started: close, so the client sees truncation."""
        self.log.info("response cut short: {why}", why=err.reason)
        x.failed_reason = err.reason
        x.emit(x.status, err.error_type or "http_response_incomplete")
        self.close()

    def fail(self, err: ProxyError) -> None:
        """Answer C{err} as a short text/plain response (if nothing was sent yet), close."""
        if self.phase is _CLOSING:
            return
        x = self._x
        if x is not None and x.response_started:
            self._truncate(x, err)
            return
        if x is not None and x.answer_instead(err):
            return  # (a stage's answer to an unreachable origin: a cache's stale copy)
        extra = b""
        view = x.view if x is not None else None
        if view is not None:
            # What a stage says of an error answer (a cache: Cache-Status, and 504 when
            # it holds a response it may not serve stale).
            extra = view.error_fields
            if view.gateway_timeout and err.status == 502:
                err = GatewayTimeout(err.reason, err.error_type, err.details)
        authenticator = self.runtime.authenticator
        if isinstance(err, ProxyAuthRequired) and authenticator is not None:
            extra = b"Proxy-Authenticate: " + basic_challenge(authenticator.realm) + b"\r\n"
        elif isinstance(err, TooManyRequests):
            extra = b"Retry-After: %d\r\n" % err.retry_after
        lines = error_response(err, self.runtime.name, extra)
        sent = sum(map(len, lines))
        self.transport.writeSequence(lines)
        if x is not None:
            x.to_client += sent
            x.failed_reason = err.reason
            x.emit(err.status, err.error_type)
        elif self.factory.observers:
            report_refused(self, err, sent)
        self.close()

    def internal_error(self, failure: Failure) -> None:
        """
        A bug met while handling this connection: log it once with its traceback, answer
        500 with C{Proxy-Status: aproxy; error=proxy_internal_error} (or just close, once
        a response started) and close this connection only.
        """
        x = self._x
        request = "a connection"
        if x is not None:
            head = x.head
            request = head.method.decode("ascii", "replace") + " "
            request += head.target[:200].decode("ascii", "replace")
        self.log.failure(
            "internal error handling {request} from {client}; that connection is closed",
            failure,
            request=request,
            client=self.client_ip,
        )
        try:
            if self.phase is _CLOSING:
                self.transport.loseConnection()
            else:
                self.fail(InternalError("internal error in the proxy (it was logged)"))
        except Exception:
            # The connection's state is beyond repair: drop it without a word.
            self.transport.abortConnection()

    def _stop(self, abort: bool) -> None:
        """Cancel the timer, and whatever the exchange in flight started."""
        self.cancel_timer()
        x = self._x
        if x is not None:
            x.stop(abort)

    def close(self) -> None:
        """Close the connection once what was written to the client is sent."""
        if self.phase is _CLOSING:
            return
        self.move(_CLOSING)
        self._stop(abort=False)
        if self._paused:
            self._paused = 0
            # Read again, so that the client's own close is seen: a TLS transport closes
            # only once the peer answered its close_notify (or left), and one paused while
            # dialing would wait for that forever, keeping the connection and its slot.
            self.transport.resumeProducing()
        # Whatever the client does, the connection goes within the idle timeout: a peer
        # that neither reads what is left nor closes can't keep it (and its slot).
        self._linger = self.clock.callLater(self.config.idle_timeout, self._abort)
        # A streaming producer still registered (and paused) when the buffer empties
        # would be resumed instead of the connection closed: unregister first.
        self._ungate()
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._linger = None
        self.log.info("client {client} did not close in time: aborted", client=self.client_ip)
        self.transport.abortConnection()

    def _ungate(self) -> None:
        if self._gated:
            self._gated = False
            self.output.source = None
            self.transport.unregisterProducer()
