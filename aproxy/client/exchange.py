"""
L{ClientExchange}: one request and its response on a client connection, from the moment
its head is authorized to the moment the response is complete (or the exchange becomes a
tunnel, or fails).

It holds everything that belongs to one request (its head, target, hop, upstream
connection, body decoders, byte counts), so a new request starts with a new object and
nothing is reset by hand. It decides with L{aproxy.client.plan} what goes upstream and what
goes back, owns the upstream connection while it forwards, streams both bodies re-framed,
and reports its L{aproxy.observe.records.Exchange} record when it ends. What belongs to the
connection (reading heads, pipelining, timers, pausing, closing, tunnels) it asks of the
L{ClientSide} it was made for: the L{aproxy.client.protocol.ProxyProtocol}.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.addons.run import AddonFailure
from aproxy.client.answering import AnswerHalf, Drain
from aproxy.client.connection import (
    DEADLINE_CONNECT,
    DEADLINE_READ,
    PAUSE_DIAL,
    ClientPauser,
)
from aproxy.client.guard import guarded
from aproxy.client.hooks import HookHalf
from aproxy.client.phases import Phase
from aproxy.client.plan import (
    BULK,
    check_connect_port,
    check_http_port,
    frame_pieces,
    plan_request,
)
from aproxy.client.response import ResponseHalf
from aproxy.client.routing import RouteHalf
from aproxy.client.runtime import Runtime
from aproxy.client.side import ClientSide
from aproxy.client.stages import (
    Answer,
    IBodyFilter,
    StageRequest,
    chain_filters,
    finished,
    first_answer,
    request_filter,
)
from aproxy.client.wire import bulk_reads, write_soon
from aproxy.errors import BadGateway, BadRequest, Forbidden, ProxyError
from aproxy.http.body import ChunkedDecoder, UntilCloseDecoder, chunk
from aproxy.http.head import (
    RequestHead,
    ResponseHead,
    Target,
    parse_authority,
)
from aproxy.observe.records import Exchange
from aproxy.upstream.connector import connect_error
from aproxy.upstream.dialer import Hop
from aproxy.upstream.protocol import UpstreamProtocol, abandon
from aproxy.workpool import as_client

__all__ = ["ClientExchange", "abandon", "report_refused"]

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ClientExchange(AnswerHalf, ResponseHalf, RouteHalf, HookHalf):
    """
    One request/response exchange (see the module docstring).

    @ivar head: The request head.
    @ivar runtime: The configuration it runs on, taken when it started.
    @ivar started: When its head was complete, on the connection's clock.
    @ivar target: Where it goes (absolute form split, or the CONNECT authority).
    @ivar hop: How it gets there (directly, or through which parent).
    @ivar status: The status sent to the client so far (0: none yet).
    @ivar response_started: Whether any of the response went to the client.
    @ivar checking: The credential check in progress (cancelled if the client leaves).
    """

    log = Logger()

    # A request's state starts from these class-level values; an instance sets only what
    # changes for it, so a new exchange (one per request) costs a few assignments, not
    # thirty-odd (measured: a tenth of the per-request Python time).
    target: Target | None = None
    hop: Hop | None = None
    checking: Deferred[Any] | None = None
    req_body: Any = None
    req_chunked = False
    req_had_body = False
    out_head = b""
    up: UpstreamProtocol | None = None
    reused = False
    retried = False
    connecting: Deferred[Any] | None = None
    resp: ResponseHead | None = None
    resp_body: Any = None
    response_started = False
    interims = 0
    out_chunked = False
    keep_client = False
    up_reusable = False
    is_connect = False
    upgrade: bytes | None = None
    linked = False
    to_client = 0
    to_origin = 0
    status = 0
    emitted = False
    dial_started = 0.0
    _pauser: ClientPauser | None = None
    # What stages see of this request, and their body filters (none by default).
    view: StageRequest | None = None
    established = False  # (a CONNECT's 200 went before the dial: see intercept.session)
    req_filter: IBodyFilter | None = None
    resp_filter: IBodyFilter | None = None

    def __init__(self, conn: ClientSide, runtime: Runtime, head: RequestHead) -> None:
        self.conn = conn
        self.runtime = runtime
        self.head = head
        self.started = conn.clock.seconds()

    def internal_error(self, failure: Failure) -> None:
        """
        A bug in a callback of this exchange: the connection handles it. An addon's
        failure (its transformer raised) was logged already, naming the addon.
        """
        if isinstance(failure.value, AddonFailure):
            self._addon_failed(failure.value)
            return
        self.conn.internal_error(failure)

    # -- the request ------------------------------------------------------------------

    def authorized(self, rest: bytes) -> None:
        """
        The request may go on (its credentials, if any, were accepted): check where it
        goes, decide what goes upstream, and reuse or dial an upstream connection.

        @param rest: Client bytes received after the head.
        @raise ProxyError: If the request is refused.
        """
        conn = self.conn
        factory = conn.factory
        rt = self.runtime
        head = self.head
        factory.loops.check_via(head)
        if head.method == b"CONNECT":
            self._start_connect(rest)
            return
        target = factory.parse_target(head.target, head.method)
        self.target = target
        check_http_port(rt.config, target.port)
        factory.check_destination(target.host, target.port, rt)
        self.hop = self._routed(
            rt.dialer.plan(target.scheme, target.host, target.port, False), False
        )
        if rt.addons is not None:
            self._hook_request(rest, self._staged)
            return
        if rt.stages and self._stage_a(rest):
            return
        self._forward(rest)

    def _staged(self, rest: bytes) -> None:
        """After the addons' request hooks: the stages, then upstream."""
        if self.runtime.stages and self._stage_a(rest):
            return
        self._forward(rest)

    def _forward(self, rest: bytes) -> None:
        """Decide what goes upstream, and reuse or dial an upstream connection for it."""
        conn = self.conn
        head = self.head
        rt = self.runtime
        target = self.target
        self.hop = hop = self._stage_route(self.hop)
        assert target is not None and hop is not None
        req_filter = self.req_filter
        plan = plan_request(head, target, hop, rt, conn.client_ip, req_filter, self.view)
        if plan.answer_locally:
            self._answer_locally(rest)
            return
        self.upgrade = plan.upgrade
        self.out_head = plan.head
        body = plan.body
        if body is not None:
            self.req_body = body
            self.req_had_body = True
            reframed = req_filter is not None and not req_filter.observe_only
            if reframed and getattr(req_filter, "length", None) is not None:
                self.req_chunked = False  # (a filter that gave its length up front)
            else:
                self.req_chunked = isinstance(body, ChunkedDecoder) or reframed
            if self.req_chunked or (head.content_length or 0) >= BULK:
                bulk_reads(conn.transport)
        conn.stash(rest)
        up = conn.factory.reuse(hop, rt)
        if up is not None:
            conn.move(Phase.FORWARDING)
            self._attach(up, True)
        else:
            self._dial(hop)

    def _stage_a(self, rest: bytes) -> bool:
        """
        Give the stages the request before any upstream connection is made: the first
        that answers answers it (now, or later: the request then waits); otherwise take
        the first request body filter offered.

        @return: Whether a stage answered, or will.
        """
        conn = self.conn
        head = self.head
        assert self.target is not None
        route = self.route
        peer = (
            route is not None
            and route.peer
            and self.hop is not None
            and self.hop.parent is not None
        )
        view = StageRequest(head, self.target, conn.client_ip or "unix", conn.user, peer=peer)
        self.view = view
        stages = self.runtime.stages
        if head.codings is not None or head.content_length:
            # (A stage's filter sees the body first, then an addon's transformers.)
            self.req_filter = chain_filters(request_filter(stages, view), self.req_filter)
        answer = first_answer(stages, view)
        if answer is None:
            return False
        # (The class test first: isinstance on Deferred, an ABC, costs a Python call.)
        if answer.__class__ is not Answer and isinstance(answer, Deferred):
            self._wait_for_stage(answer, rest)
        else:
            self.send_answer(answer, rest)
        return True

    def _start_connect(self, rest: bytes) -> None:
        head = self.head
        if head.codings is not None or head.content_length:
            raise BadRequest("a CONNECT request has no content")
        host, port = parse_authority(head.target)
        self.target = Target(b"", host, port, head.target, b"")
        rt = self.runtime
        self.conn.factory.check_destination(host, port, rt)
        check_connect_port(rt.config, port)
        self.is_connect = True
        self.status = 200
        self.hop = self._routed(rt.dialer.plan(b"", host, port, True), True)
        if rt.addons is not None:
            self._hook_request(rest, self._open_connect)
            return
        self._open_connect(rest)

    def request_data(self, data: bytes) -> None:
        """Client bytes while forwarding: request body (re-framed) or the next request."""
        conn = self.conn
        body = self.req_body
        if body is None:
            conn.hold(data)
            return
        if conn.deadline_kind == DEADLINE_READ:
            conn.extend_deadline(self.runtime.config.read_timeout)
        try:
            pieces, rest = body.feed(data)
        except ProxyError as e:
            conn.fail(e)
            return
        out = frame_pieces(pieces, body, self.req_filter, self.req_chunked)
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.to_origin += len(data)
            write_soon(self.up.transport, data)  # type: ignore[union-attr]
        if body.done:
            self.req_body = None
            bulk_reads(conn.transport, False)
            if rest:
                conn.hold(rest)
            if self.resp is not None and self.resp_body is None:
                self._response_complete()

    # -- the upstream connection ------------------------------------------------------

    def _dial(self, hop: Hop) -> None:
        conn = self.conn
        if conn.phase is not Phase.DIALING:  # (it is, when a fleet member failed)
            conn.move(Phase.DIALING)
        self.dial_started = conn.clock.seconds()
        conn.pause_for(PAUSE_DIAL)
        conn.set_deadline(DEADLINE_CONNECT, self.runtime.config.connect_timeout)
        # The client's address bounds its share of the name lookups this may start.
        d = as_client(conn.client_ip, self.runtime.dialer.open, hop)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(hop.key,))

    @guarded
    def _connected(self, up: UpstreamProtocol, key: Hashable) -> None:
        self.connecting = None
        conn = self.conn
        factory = conn.factory
        observers = factory.connect_observers
        if observers:
            took = conn.clock.seconds() - self.dial_started
            for observer in observers:
                observer(took)
        up.key = key
        if conn.phase is not Phase.DIALING:
            up.transport.loseConnection()
            return
        try:
            # The name may have led back to this proxy: a request loop.
            factory.loops.check_connected(up.transport.getPeer(), up.transport.getHost())
        except Forbidden as loop:
            up.transport.abortConnection()
            conn.fail(loop)
            return
        conn.unpause_for(PAUSE_DIAL)
        if self.is_connect:
            if not self.established:
                self.to_client += len(_ESTABLISHED)
                conn.transport.write(_ESTABLISHED)
            conn.open_tunnel(up, conn.take_pending(), b"")
            return
        conn.move(Phase.FORWARDING)
        self._attach(up, False)

    @guarded
    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(CancelledError) or self.conn.phase is not Phase.DIALING:
            return
        if self.failover():
            return
        target = self.target
        assert target is not None
        err = self.route_error(connect_error(failure, target.host, target.port))
        self.log.info(
            "upstream {host}:{port} failed: {why}",
            host=target.host,
            port=target.port,
            why=err.reason,
        )
        self.conn.fail(err)

    def _attach(self, up: UpstreamProtocol, reused: bool) -> None:
        """Own C{up}: send the request head and whatever body the client sent so far."""
        conn = self.conn
        self.up = up
        self.reused = reused
        up.hand_to(self)
        upt = up.transport
        pauser = self._pauser
        if pauser is None:
            pauser = self._pauser = ClientPauser(conn)
        upt.registerProducer(pauser, True)
        conn.output.attach(upt)
        self.linked = True
        self.to_origin += len(self.out_head)
        write_soon(upt, self.out_head)
        conn.set_deadline(DEADLINE_READ, self.runtime.config.read_timeout)
        pending = conn.take_pending()
        if pending:
            self.request_data(pending)

    def detach(self) -> UpstreamProtocol | None:
        """Unlink the upstream connection in flight from the client, and return it."""
        up = self.up
        self.up = None
        if self.linked:
            self.linked = False
            self.conn.output.source = None
            if up is not None and not up.lost:
                up.transport.unregisterProducer()
        return up

    def ended(self) -> None:
        """The exchange is over: the stages that saw it, and its route, are told (once)."""
        self.route_done()
        view = self.view
        if view is not None:
            self.view = None
            finished(self.runtime.stages, view)

    def stop(self, abort: bool) -> None:
        """
        Stop what this exchange started: a credential check and a dial (a queued hash
        or lookup is dropped) and the upstream connection in flight; and tell the
        stages it is over.
        """
        try:
            self._stop(abort)
        finally:
            self.ended()

    def _stop(self, abort: bool) -> None:
        if self.checking is not None:
            checking, self.checking = self.checking, None
            checking.cancel()
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        if self.answering is not None:
            self.stop_answer()
        up = self.detach()
        if self.req_filter is not None and self.req_body is not None:
            req_filter, self.req_filter = self.req_filter, None
            req_filter.abandoned(False)
        resp_filter = self.resp_filter
        if resp_filter is not None and self.resp_body is not None:
            # The response body is unfinished: its filter may want the rest anyway.
            self.resp_filter = None
            decoder, self.resp_body = self.resp_body, None
            if up is not None and not up.lost and resp_filter.abandoned(True):
                Drain(
                    up, decoder, resp_filter, self.conn.clock, self.runtime.config.read_timeout
                ).start()
                return
            if up is None or up.lost:
                resp_filter.abandoned(False)
        if up is not None:
            abandon(up, abort)

    # -- the response -----------------------------------------------------------------

    # The exchange owns its upstream connection while it forwards (see UpstreamOwner).

    @guarded
    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Response bytes from the origin: heads (interim ones, then the final one), body."""
        self.conn.extend_deadline(self.runtime.config.read_timeout)
        if self.resp is not None:
            self._response_data(data, None)
        else:
            self._response_heads(data)

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin half-closed: HTTP has no use for that, close (its end follows)."""
        up.transport.loseConnection()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """The origin connection ended."""
        self._upstream_lost(up, reason)

    def _response_complete(self) -> None:
        self.emit(self.status, None)
        up = self.detach()
        if up is not None:
            upt = up.transport
            bulk_reads(upt, False)
            if self.up_reusable and self.req_body is None and self.runtime.config.pool_size:
                upt.resumeProducing()
                self.conn.factory.pool.release(up)
            else:
                abandon(up, abort=False)
        self.conn.exchange_done(self.keep_client)

    @guarded
    def _upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        if up is not self.up:
            return
        self.detach()
        conn = self.conn
        if self.resp is None:
            again = not up.reader.pending and not self.req_had_body
            again = again and self.head.method in _IDEMPOTENT
            if again and self.reused and not self.retried:
                # A pooled connection the origin had closed: try once on a fresh one.
                self.retried = True
                assert self.hop is not None
                self._dial(self.hop)
                return
            if again and self.failover():
                return  # (a pool's member that died before answering: the next one)
            conn.fail(
                BadGateway(
                    "the origin closed the connection without a complete response",
                    "connection_terminated",
                )
            )
            return
        if isinstance(self.resp_body, UntilCloseDecoder):
            self.resp_body.done = True
            tail = self.resp_filter.end() if self.resp_filter is not None else b""
            if tail:
                tail = b"".join(chunk(tail)) if self.out_chunked else tail
                self.to_client += len(tail)
                conn.transport.write(tail)
            if self.out_chunked:
                self.to_client += 5
                conn.transport.write(b"0\r\n\r\n")
            self.resp_body = None
            self.up_reusable = False
            if self.req_body is None:
                self._response_complete()
            else:
                conn.close()
            return
        if self.resp_body is not None:
            conn.fail(
                BadGateway(
                    "the origin closed the connection mid-response", "http_response_incomplete"
                )
            )
            return
        # The whole response came before the whole request body (e.g. a 413), and the
        # origin is gone: nothing more can be sent, so the exchange is over. The response
        # said Connection: close (see plan_response).
        self._response_complete()

    def emit(
        self, status: int, error: str | None, tunnel_to_client: int = 0, tunnel_to_origin: int = 0
    ) -> None:
        """Report this exchange, once, to the factory's observers and addons (if any)."""
        if self.emitted or not (self.conn.factory.observers or self.hooks is not None):
            return
        self.emitted = True
        if self.hooks is not None:
            self._hooks_end(error, tunnel_to_client, tunnel_to_origin)
        if self.conn.factory.observers:
            _report(self, status, error, tunnel_to_client, tunnel_to_origin)


def _report(
    x: ClientExchange, status: int, error: str | None, to_client: int, to_origin: int
) -> None:
    """Build the record of C{x} and hand it to every observer."""
    conn = x.conn
    req = x.head
    record = Exchange(
        x.started,
        conn.client_ip or "unix",
        conn.user,
        req.method.decode("ascii"),
        req.target.decode("ascii", "replace"),
        status,
        x.to_client + to_client,
        x.to_origin + to_origin,
        conn.clock.seconds() - x.started,
        x.hop.label if x.hop is not None else "direct",
        error,
        "HTTP/1.1" if req.minor else "HTTP/1.0",
        fields=req.block,
        cache=x.view.notes.get("cache") if x.view is not None else None,
    )
    for observer in conn.factory.observers:
        observer(record)


def report_refused(conn: ClientSide, err: ProxyError, sent: int) -> None:
    """
    Report a request refused before it had a parsed head (malformed, too large, too
    slow, or a client refused at admission), so that the access log and the metrics
    count it too; method and target are unknown, written C{-}.
    """
    record = Exchange(
        conn.clock.seconds(),
        conn.client_ip or "unix",
        None,
        "-",
        "-",
        err.status,
        sent,
        0,
        0.0,
        "direct",
        err.error_type,
        "-",
    )
    for observer in conn.factory.observers:
        observer(record)
