"""
The client side: L{ProxyFactory} spawns one L{ProxyProtocol} per client connection.

A L{ProxyProtocol} reads a request head with the sans-IO parser, gets an upstream connection
(from the pool or by dialing), forwards the head and streams the body both ways, re-framed,
with each transport registered as the other's producer so a slow reader pauses the fast
writer. Every L{ProxyError} becomes a response in one place, L{ProxyProtocol._fail}.

This module is one state machine (reading, connecting, forwarding, tunnel, closing) and is
kept whole on purpose: its request and response halves share that state on every step,
and splitting them into mixins would hide the transitions. What is not the state machine
lives elsewhere: the factory (factory.py), admission, timers and pausing (connection.py),
the proxy's own responses (responses.py), tunnels (tunnel.py) and records (records.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.access.auth import basic_challenge, credential_key
from aproxy.client.connection import (
    _CONNECT,
    _DIAL,
    _HEAD,
    _HOLD,
    _IDLE,
    _READ,
    _UPSTREAM,
    ClientConnection,
    OutputGate,
    _ClientPauser,
)
from aproxy.client.tunnel import Tunnel
from aproxy.client.wire import bulk_reads, write_soon
from aproxy.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    InternalError,
    ProxyAuthRequired,
    ProxyError,
    RequestTimeout,
    TooManyRequests,
)
from aproxy.http.answers import error_response, local_answer
from aproxy.http.body import ChunkedDecoder, LengthDecoder, UntilCloseDecoder, chunk
from aproxy.http.head import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    HeadReader,
    RequestHead,
    ResponseHead,
    Target,
    framing_fields,
    parse_authority,
    parse_request_head,
    parse_response_head,
    response_body_kind,
    serialize_request_head,
    serialize_response_head,
)
from aproxy.observe.records import Exchange
from aproxy.upstream.connector import connect_error
from aproxy.upstream.dialer import Hop
from aproxy.upstream.protocol import (
    UpstreamProtocol,
)
from aproxy.workpool import as_client

if TYPE_CHECKING:
    from aproxy.client.factory import ProxyFactory

__all__ = ["ProxyProtocol"]

# Connection states. _WAITING: a response is complete, but the client has not read enough
# of the answers so far to start the next request (see OutputGate).
_READING, _CONNECTING, _FORWARDING, _TUNNEL, _CLOSING, _WAITING = range(6)
# Bytes of pipelined requests held while one is in flight before the client is paused.
_HOLD_LIMIT = 65536
# Bodies (responses, and requests from clients) at least this large, and chunked ones, are
# read in bigger pieces (see wire.bulk_reads).
_BULK = 1 << 20
_P = ParamSpec("_P")


def _guarded(
    method: Callable[Concatenate[ProxyProtocol, _P], None],
) -> Callable[Concatenate[ProxyProtocol, _P], None]:
    """
    The last line of defence, on every way into a L{ProxyProtocol} (reactor callbacks,
    timers, Deferred callbacks): an unexpected exception is a bug, and costs the request
    it happened in, not the proxy. See L{ProxyProtocol._internal_error}.
    """

    def guarded(self: ProxyProtocol, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            self._internal_error(Failure())

    functools.update_wrapper(guarded, method)
    return guarded


# Interim (1xx) responses relayed per request: a 100 Continue and a few 103 Early Hints are
# normal; hundreds are an origin gone wrong (or hostile).
_MAX_INTERIM = 32
# X-Forwarded-For and the spellings CGI and WSGI read as the same variable
# (HTTP_X_FORWARDED_FOR): what --x-forwarded-for strip removes, from heads and trailers.
_XFF_NAMES = frozenset(
    {b"x-forwarded-for", b"x-forwarded_for", b"x_forwarded-for", b"x_forwarded_for"}
)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@implementer(IHalfCloseableProtocol)
class ProxyProtocol(ClientConnection):
    """
    One client connection: parses its requests, forwards each to its own origin in turn
    and relays the responses in order.
    """

    log = Logger()
    transport: Any

    def __init__(self, factory: ProxyFactory, addr: IAddress | None = None) -> None:
        super().__init__(factory, addr)
        config = self.config
        self._via = factory.via
        self._reader = HeadReader(config.max_head_size, config.max_request_line)
        self._state = _READING
        self._pending = b""
        self._draining = False
        self._last = False
        self._linked = False
        self._eof = False
        self.user: str | None = None
        self._tunnel: Tunnel | None = None
        self._output = OutputGate(self._output_drained)
        self._gated = False
        self._linger: IDelayedCall | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._req: RequestHead | None = None
        self._target: Target | None = None
        self._req_body: Any = None
        self._req_chunked = False
        self._req_had_body = False
        self._out_head = b""
        self._up: UpstreamProtocol | None = None
        self._hop: Hop | None = None
        self._reused = False
        self._retried = False
        self._connecting: Deferred[Any] | None = None
        # The credential check in progress (cancelled if the client leaves).
        self._checking: Deferred[str | None] | None = None
        self._resp: ResponseHead | None = None
        self._resp_body: Any = None
        self._resp_started = False
        self._interims = 0
        self._out_chunked = False
        self._keep_client = False
        self._up_reusable = False
        self._is_connect = False
        self._upgrade: bytes | None = None
        self._to_client = 0
        self._to_origin = 0
        self._status = 0
        self._emitted = False
        self._started = 0.0
        self._dial_started = 0.0

    # -- Twisted protocol interface ---------------------------------------------------

    def connectionMade(self) -> None:
        """
        Admit the client (allowed network, connection limits) and start the header
        timer: a new client must send a request head promptly.
        """
        self.factory.connections.add(self)
        self.transport.registerProducer(self._output, True)
        self._gated = True
        self._set_deadline(_HEAD, self.config.header_timeout)
        if self._proxy_header is not None:
            # Behind a PROXY protocol listener the client's address is known only once
            # the load balancer's header has been read.
            self.dataReceived = self._admit_then_receive  # type: ignore[method-assign]
            return
        refusal = self._admit()
        if refusal is not None:
            self._fail(refusal)

    @_guarded
    def _admit_then_receive(self, data: bytes) -> None:
        if self._state == _CLOSING:
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
        self._last = True
        if self._state == _READING and not self._reader.pending:
            self._close()

    @_guarded
    def dataReceived(self, data: bytes) -> None:
        """Route client bytes by state: a request head, request body or held bytes."""
        state = self._state
        if state == _READING:
            self._read_head(data)
        elif state == _FORWARDING:
            self._request_data(data)
        elif state == _CONNECTING or state == _WAITING:
            self._hold(data)

    @_guarded
    def readConnectionLost(self) -> None:
        """
        The client half-closed. In a tunnel that is passed on to the origin; while its
        credentials wait to be checked it is taken as gone; otherwise a request in flight
        is still answered, and the connection is closed after it.
        """
        if self._tunnel is not None:
            self._tunnel.client_eof()
        elif self._checking is not None:
            # Closed while its credentials wait to be checked: taken as gone (as Squid's
            # half_closed_clients off and nginx do), so the check is dropped, not run.
            self._close()
        elif self._state in (_CONNECTING, _FORWARDING) and self._req_body is None:
            self._keep_client = False
            self._eof = True
        elif self._state in (_CONNECTING, _FORWARDING):
            self._fail(BadRequest("the client closed before sending the whole request body"))
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        """Our write side towards the client was shut down (a tunnel's half-close)."""

    @_guarded
    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        """Stop everything this connection started: timer, dial, upstream connection."""
        self._release_slot()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        if self._req is not None and self._tunnel is None:
            # The client left with a request unfinished (its own end is not an error of
            # the proxy's, so no Proxy-Status type).
            self._emit(self._status, None)
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self._state = _CLOSING
        self._stop_upstream(abort=True)
        # Last: this may complete a graceful shutdown (which closes the access log).
        self.factory.connection_gone(self)

    # -- flow control -----------------------------------------------------------------

    def _is_closing(self) -> bool:
        return self._state == _CLOSING

    def _detach(self) -> UpstreamProtocol | None:
        """Unlink the upstream connection in flight from the client, and return it."""
        up = self._up
        self._up = None
        if self._linked:
            self._linked = False
            self._output.source = None
            if up is not None and not up.lost:
                up.transport.unregisterProducer()
        return up

    @_guarded
    def _deadline_passed(self, kind: int) -> None:
        """The timer ran out while waiting for C{kind}: close or answer accordingly."""
        if kind == _IDLE or (kind == _HEAD and not self._reader.pending):
            self._close()
        elif kind == _HEAD:
            self._fail(RequestTimeout("request head not received within the header timeout"))
        elif kind == _CONNECT:
            target = self._target
            where = f"{target.host}:{target.port}" if target else "origin"
            hop = self._hop
            if hop is not None and hop.parent is not None:
                where += f" through parent proxy {hop.parent.name}"
            self._fail(
                GatewayTimeout(
                    f"connecting to {where} timed out",
                    "connection_timeout",
                    details=where,
                )
            )
        elif self._resp is None and self._req_body is not None:
            self._fail(RequestTimeout("request body not received within the read timeout"))
        else:
            self._fail(
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
                if self._deadline_kind != _HEAD:
                    self._set_deadline(_HEAD, self.config.header_timeout)
                return
            head = parse_request_head(raw)
            rest = self._reader.rest
            self._reader.rest = b""
            self._start_request(head, rest)
        except ProxyError as e:
            self._fail(e)

    def _start_request(self, head: RequestHead, rest: bytes) -> None:
        self._req = head
        self._started = self.clock.seconds()
        auth = self.factory.authenticator
        if auth is not None:
            values = head.noted.get(b"proxy-authorization")
            credentials = values[0] if values is not None and len(values) == 1 else None
            ip = self._client_ip
            # The guess counts from now, not when its hash ends (issue #12, item 5).
            key = credential_key(credentials) if credentials is not None else None
            if ip is not None:
                config = self.config
                throttle = self.factory.login_throttle
                throttle.check(ip, config.auth_max_failures, config.auth_failure_window, key)
                if key is not None:
                    throttle.begin(ip, key)
            self._state = _CONNECTING
            self._pending = rest
            # Not paused while the check waits: bytes are held (bounded, see _hold), and
            # a client that hangs up is noticed, so its queued hash is dropped.
            d = as_client(ip, auth.authenticate, credentials)
            self._checking = d
            d.addCallback(self._authenticated, head, key)
            d.addErrback(self._auth_failed, key)
            return
        self._authorized_request(head, rest)

    def _count_guess(self, key: Hashable | None, failed: bool | None) -> None:
        """Tell the throttle how the check of this request's credentials ended."""
        if key is not None and self._client_ip is not None:
            self.factory.login_throttle.end(
                self._client_ip, key, failed, self.config.auth_failure_window
            )

    @_guarded
    def _authenticated(self, user: str | None, head: RequestHead, key: Hashable | None) -> None:
        self._checking = None
        self._count_guess(key, user is None)
        if self._state != _CONNECTING or self._req is not head:
            return
        rest, self._pending = self._pending, b""
        try:
            if user is None:
                raise ProxyAuthRequired("proxy authentication required")
            self.user = user
            self._authorized_request(head, rest)
        except ProxyError as e:
            self._fail(e)

    @_guarded
    def _auth_failed(self, failure: Failure, key: Hashable | None) -> None:
        self._checking = None
        if failure.check(CancelledError):
            # The client left while its check waited or ran.
            self._count_guess(key, None)
            return
        if isinstance(failure.value, ProxyError):
            # A bound on password checks was reached (429/503): nothing was checked.
            self._count_guess(key, False)
            self._fail(failure.value)
            return
        self._count_guess(key, True)
        self.log.failure("checking proxy credentials failed", failure)
        self._fail(ProxyAuthRequired("proxy authentication failed"))

    def _authorized_request(self, head: RequestHead, rest: bytes) -> None:
        factory = self.factory
        factory.loops.check_via(head)
        if head.method == b"CONNECT":
            self._start_connect(head, rest)
            return
        target = self.factory.parse_target(head.target, head.method)
        self._target = target
        if not self.config.http_port_allowed(target.port):
            # Whatever the route: through a parent the port is reached all the same.
            raise Forbidden(
                f"requests to port {target.port} are not allowed (see the --http-ports option)",
                "http_request_denied",
                details=f"port {target.port}",
            )
        factory.check_destination(target.host, target.port)
        hop = factory.dialer.plan(target.scheme, target.host, target.port, False)
        self._hop = hop
        extra = b""
        drop: tuple[bytes, ...] = ()
        if head.method in (b"OPTIONS", b"TRACE"):
            values = head.values(b"max-forwards")
            if values:
                if len(values) > 1 or not values[0].isdigit():
                    raise BadRequest("malformed Max-Forwards field")
                hops = int(values[0])
                if hops == 0:
                    # RFC 9110 section 7.6.2: the last recipient answers itself.
                    self._answer_locally(head, rest)
                    return
                extra = b"Max-Forwards: %d\r\n" % (hops - 1)
                drop = (b"max-forwards",)
        upgrade = head.values(b"upgrade")
        if (
            upgrade
            and b"upgrade" in head.connection
            and head.minor
            and not (head.codings is not None or head.content_length)
        ):
            # The one case Connection and Upgrade are forwarded (RFC 9110 section 7.8).
            self._upgrade = b", ".join(upgrade)
            extra += b"Connection: Upgrade\r\nUpgrade: " + self._upgrade + b"\r\n"
        xff = self.config.x_forwarded_for
        if head.codings is not None:
            self._req_body = ChunkedDecoder(True, _XFF_NAMES if xff == "strip" else frozenset())
            self._req_chunked = True
            self._req_had_body = True
            bulk_reads(self.transport)
        elif head.content_length:
            self._req_body = LengthDecoder(head.content_length)
            self._req_had_body = True
            if head.content_length >= _BULK:
                bulk_reads(self.transport)
        if xff == "strip":
            drop += tuple(_XFF_NAMES)
        elif xff == "add" and self._client_ip is not None:
            extra += b"X-Forwarded-For: " + self._client_ip.encode("ascii") + b"\r\n"
        if hop.absolute:
            # To an HTTP parent: a proxy request, with the parent's own credentials.
            assert hop.parent is not None
            extra += hop.parent.authorization or b""
        self._out_head = serialize_request_head(head, target, self._via, extra, drop, hop.absolute)
        self._pending = rest
        self._state = _CONNECTING
        up = self.factory.reuse(hop)
        if up is not None:
            self._attach(up, True)
        else:
            self._dial(hop)

    def _start_connect(self, head: RequestHead, rest: bytes) -> None:
        if head.codings is not None or head.content_length:
            raise BadRequest("a CONNECT request has no content")
        host, port = parse_authority(head.target)
        self._target = Target(b"", host, port, head.target, b"")
        self.factory.check_destination(host, port)
        if not self.config.connect_allowed(port):
            # A port rule, not an address one: http_request_denied (RFC 9209 section 2.3.10).
            raise Forbidden(
                f"CONNECT to port {port} is not allowed (see the --connect-ports option;"
                " clients that tunnel http:// and ws:// requests need --connect-ports 80,443)",
                "http_request_denied",
                details=f"port {port}",
            )
        self._is_connect = True
        self._status = 200
        self._pending = rest
        self._state = _CONNECTING
        self._hop = hop = self.factory.dialer.plan(b"", host, port, True)
        self._dial(hop)

    def _open_tunnel(self, up: UpstreamProtocol, to_origin: bytes, to_client: bytes) -> None:
        """Switch this connection to a raw relay with C{up} (after a CONNECT or a 101)."""
        self._detach()
        self._cancel_timer()
        self._state = _TUNNEL
        tunnel = Tunnel(
            self.transport,
            up,
            self.clock,
            self.config.tunnel_idle_timeout,
            self._tunnel_closed,
        )
        self._tunnel = tunnel
        self.factory.tunnels += 1
        # The tunnel registers the two transports as each other's producers.
        self._ungate()
        self.dataReceived = tunnel.from_client  # type: ignore[method-assign]
        if self._paused:
            self._paused = 0
            self.transport.resumeProducing()
        tunnel.start(to_origin, to_client)
        if self._eof:
            tunnel.client_eof()

    @_guarded
    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        # Called once per tunnel (Tunnel.close runs once), however it ends.
        self.factory.tunnels -= 1
        self._state = _CLOSING
        self._emit(self._status, None)

    @property
    def is_tunnel(self) -> bool:
        """Whether this connection is a CONNECT or Upgrade tunnel now."""
        return self._tunnel is not None and not self._tunnel.closed

    def _dial(self, hop: Hop) -> None:
        self._dial_started = self.clock.seconds()
        self._pause(_DIAL)
        self._set_deadline(_CONNECT, self.config.connect_timeout)
        # The client's address bounds its share of the name lookups this may start.
        d = as_client(self._client_ip, self.factory.dialer.open, hop)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(hop.key,))

    @_guarded
    def _connected(self, up: UpstreamProtocol, key: Hashable) -> None:
        self._connecting = None
        observers = self.factory.connect_observers
        if observers:
            took = self.clock.seconds() - self._dial_started
            for observer in observers:
                observer(took)
        up.key = key
        if self._state != _CONNECTING:
            up.transport.loseConnection()
            return
        try:
            self.factory.loops.check_connected(up.transport.getPeer(), up.transport.getHost())
        except Forbidden as loop:
            up.transport.abortConnection()
            self._fail(loop)
            return
        self._unpause(_DIAL)
        self._attach(up, False)

    @_guarded
    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._state != _CONNECTING:
            return
        target = self._target
        assert target is not None
        err = connect_error(failure, target.host, target.port)
        self.log.info(
            "upstream {host}:{port} failed: {why}",
            host=target.host,
            port=target.port,
            why=err.reason,
        )
        self._fail(err)

    def _attach(self, up: UpstreamProtocol, reused: bool) -> None:
        if self._is_connect:
            self._to_client += 39
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            pending = self._pending
            self._pending = b""
            self._open_tunnel(up, pending, b"")
            return
        self._up = up
        self._reused = reused
        up.on_data = self._upstream_data
        up.on_lost = self._upstream_lost
        self._state = _FORWARDING
        upt = up.transport
        pauser = self._pauser
        if pauser is None:
            pauser = self._pauser = _ClientPauser(self)
        upt.registerProducer(pauser, True)
        self._output.attach(upt)
        self._linked = True
        self._to_origin += len(self._out_head)
        write_soon(upt, self._out_head)
        self._set_deadline(_READ, self.config.read_timeout)
        pending = self._pending
        if pending:
            self._pending = b""
            self._request_data(pending)

    def _hold(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) > _HOLD_LIMIT:
            self._pause(_HOLD)

    def _request_data(self, data: bytes) -> None:
        body = self._req_body
        if body is None:
            self._hold(data)
            return
        if self._deadline_kind == _READ:
            self._deadline = self.clock.seconds() + self.config.read_timeout
        try:
            pieces, rest = body.feed(data)
        except ProxyError as e:
            self._fail(e)
            return
        upt = self._up.transport  # type: ignore[union-attr]
        if self._req_chunked:
            out = []
            for piece in pieces:
                out += chunk(piece)
            if body.done:
                out.append(b"0\r\n" + b"".join(body.trailers) + b"\r\n")
            if out:
                data = b"".join(out)
                self._to_origin += len(data)
                write_soon(upt, data)
        else:
            for piece in pieces:
                self._to_origin += len(piece)
                write_soon(upt, piece)
        if body.done:
            self._req_body = None
            bulk_reads(self.transport, False)
            if rest:
                self._hold(rest)
            if self._resp is not None and self._resp_body is None:
                self._response_complete()

    def _answer_locally(self, head: RequestHead, rest: bytes) -> None:
        closing = not head.keep_alive or head.codings is not None or bool(head.content_length)
        answer = local_answer(head, closing)
        self._to_client += len(answer)
        self.transport.write(answer)
        self._emit(200, None)
        if closing:
            self._close()
            return
        self._reset_request()
        self._next_request(rest)

    # -- responses --------------------------------------------------------------------

    @_guarded
    def _upstream_data(self, data: bytes) -> None:
        self._deadline = self.clock.seconds() + self.config.read_timeout
        if self._resp is not None:
            self._response_data(data, None)
            return
        reader = self._up.reader  # type: ignore[union-attr]
        # Interim (1xx) heads and the final head may arrive in one read: take them in a
        # loop, never by recursion (an origin can send hundreds at once).
        while True:
            try:
                raw = reader.feed(data)
                if raw is None:
                    return
                data = reader.rest
                reader.rest = b""
                resp = parse_response_head(raw)
            except ProxyError as e:
                self._fail(e)
                return
            if resp.status >= 200:
                self._begin_response(resp, data)
                return
            if resp.status == 101:
                self._switch_protocols(resp, data)
                return
            if not self._interim(resp) or not data:
                return

    def _interim(self, resp: ResponseHead) -> bool:
        """Relay a 1xx response (up to a bound per request); whether to go on reading."""
        self._interims += 1
        if self._interims > _MAX_INTERIM:
            self.log.info(
                "origin sent more than {limit} interim responses: 502", limit=_MAX_INTERIM
            )
            self._fail(
                BadGateway(
                    f"the origin sent more than {_MAX_INTERIM} interim (1xx) responses",
                    "http_protocol_error",
                )
            )
            return False
        req = self._req
        assert req is not None
        if req.minor:
            # RFC 9110 section 15.2: forward 1xx, but never to an HTTP/1.0 client.
            interim = serialize_response_head(resp, b"", self._via, None)
            self._to_client += len(interim)
            self.transport.write(interim)
        return True

    def _switch_protocols(self, resp: ResponseHead, rest: bytes) -> None:
        up = self._up
        if self._upgrade is None or up is None:
            self._fail(BadGateway("the origin switched protocols unasked", "http_protocol_error"))
            return
        upgrade = resp.values(b"upgrade")
        fields = b"Upgrade: " + b", ".join(upgrade) + b"\r\n" if upgrade else b""
        switching = serialize_response_head(resp, fields, self._via, b"Upgrade")
        self._to_client += len(switching)
        self.transport.write(switching)
        self._status = 101
        self._resp_started = True
        pending = self._pending
        self._pending = b""
        self._open_tunnel(up, pending, rest)

    def _begin_response(self, resp: ResponseHead, rest: bytes) -> None:
        req = self._req
        assert req is not None
        if resp.status == 407 and self._hop is not None and self._hop.absolute:
            # The parent's challenge is for us, not the client, who can't answer it.
            assert self._hop.parent is not None
            self._fail(
                BadGateway(
                    f"parent proxy {self._hop.parent.name} requires authentication (407): "
                    "check the credentials in its URL",
                    "destination_unavailable",
                    details=f"parent {self._hop.parent.name} answered 407",
                )
            )
            return
        kind = response_body_kind(resp, req.method)
        client11 = req.minor >= 1
        keep = req.keep_alive and self._req_body is None and not self._eof and not self._last
        self._out_chunked = False
        framing = b""
        decoder: Any = None
        if kind == BODY_LENGTH:
            decoder = LengthDecoder(resp.content_length or 0)
            framing = b"Content-Length: %d\r\n" % (resp.content_length or 0)
        elif kind == BODY_NONE:
            if resp.content_length is not None and resp.status not in (204,):
                # HEAD and 304 keep the length they describe (RFC 9110 section 8.6).
                framing = b"Content-Length: %d\r\n" % resp.content_length
        else:
            decoder = ChunkedDecoder(False) if kind == BODY_CHUNKED else UntilCloseDecoder()
            if client11:
                self._out_chunked = True
                framing = framing_fields(BODY_CHUNKED, None, resp.codings)
            else:
                keep = False
        self._keep_client = keep
        # An origin that answered before the request body was complete may or may not
        # read the rest as body: never reuse such a connection.
        self._up_reusable = resp.keep_alive and kind != BODY_CLOSE and self._req_body is None
        if not keep:
            conn: bytes | None = b"close"
        else:
            conn = None if client11 else b"keep-alive"
        head = serialize_response_head(resp, framing, self._via, conn)
        self._resp = resp
        self._resp_started = True
        self._status = resp.status
        if decoder is None or decoder.done:
            self._to_client += len(head)
            write_soon(self.transport, head)
            self._resp_body = None
            if rest:
                self._up_reusable = False
            if self._req_body is None:
                self._response_complete()
            return
        self._resp_body = decoder
        if kind != BODY_LENGTH or (resp.content_length or 0) >= _BULK:
            bulk_reads(self._up.transport)  # type: ignore[union-attr]
        self._response_data(rest, head)

    def _response_data(self, data: bytes, head: bytes | None) -> None:
        decoder = self._resp_body
        if decoder is None:
            # Bytes after a complete response, before the request finished: the origin is
            # misbehaving; it won't be reused.
            self._up_reusable = False
            return
        try:
            pieces, rest = decoder.feed(data) if data else ([], b"")
        except ProxyError as e:
            if head is not None:
                self._to_client += len(head)
                self.transport.write(head)
            self._truncate(e)
            return
        out = [head] if head is not None else []
        if self._out_chunked:
            for piece in pieces:
                out += chunk(piece)
            if decoder.done:
                out.append(b"0\r\n" + b"".join(decoder.trailers) + b"\r\n")
        else:
            out += pieces
        if len(out) == 1:
            data = out[0]
            self._to_client += len(data)
            write_soon(self.transport, data)
        elif out:
            data = b"".join(out)
            self._to_client += len(data)
            write_soon(self.transport, data)
        if decoder.done:
            self._resp_body = None
            if rest:
                self._up_reusable = False
            if self._req_body is None:
                self._response_complete()

    def _emit(self, status: int, error: str | None) -> None:
        """Report the exchange that just ended to the factory's observers (if any)."""
        req = self._req
        observers = self.factory.observers
        if req is None or not observers or self._emitted:
            return
        self._emitted = True
        now = self.clock.seconds()
        tunnel = self._tunnel
        record = Exchange(
            self._started,
            self._client_ip or "unix",
            self.user,
            req.method.decode("ascii"),
            req.target.decode("ascii", "replace"),
            status,
            self._to_client + (tunnel.to_client if tunnel else 0),
            self._to_origin + (tunnel.to_origin if tunnel else 0),
            now - self._started,
            self._hop.label if self._hop is not None else "direct",
            error,
            "HTTP/1.1" if req.minor else "HTTP/1.0",
            fields=req.block,
        )
        for observer in observers:
            observer(record)

    def _response_complete(self) -> None:
        self._emit(self._status, None)
        up = self._detach()
        if up is not None:
            upt = up.transport
            bulk_reads(upt, False)
            if self._up_reusable and self._req_body is None and self.config.pool_size:
                upt.resumeProducing()
                self.factory.pool.release(up)
            else:
                _abandon(up, abort=False)
        if not self._keep_client:
            self._close()
            return
        self._unpause(_UPSTREAM)
        pending = self._pending
        self._reset_request()
        self._next_request(pending)

    def _next_request(self, pending: bytes) -> None:
        if self._last:
            self._close()
            return
        if self._output.paused:
            # The client is not reading its answers: start nothing new (and read no more)
            # until what waits for it was written, so that a client that pipelines and
            # never reads costs a bounded amount of memory. The idle timeout applies.
            self._state = _WAITING
            self._pending = pending
            self._pause(_HOLD)
            self._set_deadline(_IDLE, self.config.idle_timeout)
            return
        self._state = _READING
        self._pending = b""
        self._unpause(_HOLD)
        self._set_deadline(_IDLE, self.config.idle_timeout)
        if not pending:
            return
        if self._draining:
            # Called from inside the loop below (a locally answered request): let the
            # loop pick the bytes up instead of recursing.
            self._pending = pending
            return
        self._draining = True
        try:
            while pending and self._state == _READING:
                self._read_head(pending)
                pending = b""
                if self._state == _READING and self._pending:
                    pending, self._pending = self._pending, b""
        finally:
            self._draining = False

    @_guarded
    def _output_drained(self) -> None:
        """Everything was written to the client: a request waiting for that may start."""
        if self._state == _WAITING:
            pending, self._pending = self._pending, b""
            self._next_request(pending)

    @_guarded
    def _upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        if up is not self._up:
            return
        self._detach()
        req = self._req
        if self._resp is None:
            if (
                self._reused
                and not self._retried
                and not up.reader.pending
                and not self._req_had_body
                and req is not None
                and req.method in _IDEMPOTENT
            ):
                # A pooled connection the origin had closed: try once on a fresh one.
                self._retried = True
                self._state = _CONNECTING
                assert self._hop is not None
                self._dial(self._hop)
                return
            self._fail(
                BadGateway(
                    "the origin closed the connection without a complete response",
                    "connection_terminated",
                )
            )
            return
        if isinstance(self._resp_body, UntilCloseDecoder):
            self._resp_body.done = True
            if self._out_chunked:
                self._to_client += 5
                self.transport.write(b"0\r\n\r\n")
            self._resp_body = None
            self._up_reusable = False
            if self._req_body is None:
                self._response_complete()
            else:
                self._close()
            return
        if self._resp_body is not None:
            self._truncate(
                BadGateway(
                    "the origin closed the connection mid-response", "http_response_incomplete"
                )
            )
            return
        # The whole response came before the whole request body (e.g. a 413), and the
        # origin is gone: nothing more can be sent, so the exchange is over. The response
        # said Connection: close (see _begin_response).
        self._response_complete()

    # -- errors and closing -----------------------------------------------------------

    def _truncate(self, err: ProxyError) -> None:
        """A failure after the response started: close, so the client sees truncation."""
        self.log.info("response cut short: {why}", why=err.reason)
        self._emit(self._status, err.error_type or "http_response_incomplete")
        self._close()

    def _fail(self, err: ProxyError) -> None:
        """Answer C{err} as a short text/plain response (if nothing was sent yet), close."""
        if self._state == _CLOSING:
            return
        if self._resp_started:
            self._truncate(err)
            return
        extra = b""
        if isinstance(err, ProxyAuthRequired) and self.factory.authenticator is not None:
            extra = (
                b"Proxy-Authenticate: "
                + basic_challenge(self.factory.authenticator.realm)
                + b"\r\n"
            )
        elif isinstance(err, TooManyRequests):
            extra = b"Retry-After: %d\r\n" % err.retry_after
        lines = error_response(err, self.factory.name, extra)
        self._to_client += sum(map(len, lines))
        self.transport.writeSequence(lines)
        self._emit(err.status, err.error_type)
        self._close()

    def _internal_error(self, failure: Failure) -> None:
        """
        A bug met while handling this connection: log it once with its traceback, answer
        500 with C{Proxy-Status: aproxy; error=proxy_internal_error} (or just close, once
        a response started) and close this connection only.
        """
        req = self._req
        self.log.failure(
            "internal error handling {request} from {client}; that connection is closed",
            failure,
            request=req.method.decode("ascii", "replace")
            + " "
            + req.target[:200].decode("ascii", "replace")
            if req is not None
            else "a connection",
            client=self._client_ip,
        )
        try:
            if self._state == _CLOSING:
                self.transport.loseConnection()
            else:
                self._fail(InternalError("internal error in the proxy (it was logged)"))
        except Exception:
            # The connection's state is beyond repair: drop it without a word.
            self.transport.abortConnection()

    def _stop_upstream(self, abort: bool) -> None:
        """
        Cancel the timer, any credential check and any dial (a queued hash or lookup is
        dropped); close the upstream connection in flight.
        """
        self._cancel_timer()
        if self._checking is not None:
            checking, self._checking = self._checking, None
            checking.cancel()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        up = self._detach()
        if up is not None:
            _abandon(up, abort)

    def _close(self) -> None:
        if self._state == _CLOSING:
            return
        self._state = _CLOSING
        self._stop_upstream(abort=False)
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
        self.log.info("client {client} did not close in time: aborted", client=self._client_ip)
        self.transport.abortConnection()

    def _ungate(self) -> None:
        if self._gated:
            self._gated = False
            self._output.source = None
            self.transport.unregisterProducer()


def _abandon(up: UpstreamProtocol, abort: bool) -> None:
    """Close an upstream connection nobody will read from again (abort: drop its buffer)."""
    up.on_lost = _forget
    up.on_data = _drop
    if abort:
        up.transport.abortConnection()
    else:
        up.transport.loseConnection()


def _forget(proto: UpstreamProtocol, reason: Failure) -> None:
    """The end of an upstream connection nobody needs any more."""


def _drop(data: bytes) -> None:
    """Bytes from an upstream connection nobody reads any more."""
