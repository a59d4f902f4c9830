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
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.client.connection import (
    DEADLINE_CONNECT,
    DEADLINE_READ,
    PAUSE_DIAL,
    ClientPauser,
    OutputGate,
)
from aproxy.client.context import ProxyContext
from aproxy.client.guard import guarded
from aproxy.client.phases import Phase
from aproxy.client.plan import (
    BULK,
    check_connect_port,
    check_http_port,
    plan_request,
    plan_response,
)
from aproxy.client.runtime import Runtime
from aproxy.client.wire import bulk_reads, write_soon
from aproxy.errors import BadGateway, BadRequest, Forbidden, ProxyError
from aproxy.http.answers import local_answer
from aproxy.http.body import ChunkedDecoder, UntilCloseDecoder, chunk
from aproxy.http.head import (
    RequestHead,
    ResponseHead,
    Target,
    parse_authority,
    parse_response_head,
    serialize_response_head,
)
from aproxy.observe.records import Exchange
from aproxy.upstream.connector import connect_error
from aproxy.upstream.dialer import Hop
from aproxy.upstream.protocol import UpstreamProtocol
from aproxy.workpool import as_client

__all__ = ["MAX_INTERIM", "ClientExchange", "ClientSide", "abandon"]

# Interim (1xx) responses relayed per request: a 100 Continue and a few 103 Early Hints are
# normal; hundreds are an origin gone wrong (or hostile).
MAX_INTERIM = 32
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ClientSide(Protocol):
    """What an exchange asks of its client connection (L{ProxyProtocol} provides it)."""

    transport: Any
    clock: IReactorTime
    factory: ProxyContext
    user: str | None
    client_ip: str | None
    eof: bool
    last: bool
    output: OutputGate
    deadline_kind: int
    phase: Phase

    def move(self, phase: Phase) -> None:
        """Move the connection to C{phase} (checked against the phase table)."""

    def pause_for(self, reason: int) -> None:
        """Stop reading from the client for C{reason}."""

    def unpause_for(self, reason: int) -> None:
        """Withdraw C{reason} to stop reading from the client."""

    def set_deadline(self, kind: int, timeout: float) -> None:
        """Wait at most C{timeout} seconds for C{kind}."""

    def extend_deadline(self, timeout: float) -> None:
        """Push the deadline in force to C{timeout} seconds from now (activity)."""

    def hold(self, data: bytes) -> None:
        """Keep client bytes for later (bounded: pauses the client past a limit)."""

    def stash(self, data: bytes) -> None:
        """Keep client bytes for the next step (not bounded: the caller read them)."""

    def take_pending(self) -> bytes:
        """The client bytes held so far, handed over and forgotten."""

    def fail(self, err: ProxyError) -> None:
        """Answer C{err} (or close, once a response started) and close."""

    def close(self) -> None:
        """Close the connection (after what was written)."""

    def internal_error(self, failure: Failure) -> None:
        """A bug: log it once and end the connection."""

    def open_tunnel(self, up: UpstreamProtocol, to_origin: bytes, to_client: bytes) -> None:
        """Switch the connection to a raw relay with C{up}."""

    def exchange_done(self, keep: bool) -> None:
        """The exchange ended: read the next request (C{keep}) or close."""


class ClientExchange:
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

    def __init__(self, conn: ClientSide, runtime: Runtime, head: RequestHead) -> None:
        self.conn = conn
        self.runtime = runtime
        self.head = head
        self.started = conn.clock.seconds()
        self.target: Target | None = None
        self.hop: Hop | None = None
        self.checking: Deferred[str | None] | None = None
        self.req_body: Any = None
        self.req_chunked = False
        self.req_had_body = False
        self.out_head = b""
        self.up: UpstreamProtocol | None = None
        self.reused = False
        self.retried = False
        self.connecting: Deferred[Any] | None = None
        self.resp: ResponseHead | None = None
        self.resp_body: Any = None
        self.response_started = False
        self.interims = 0
        self.out_chunked = False
        self.keep_client = False
        self.up_reusable = False
        self.is_connect = False
        self.upgrade: bytes | None = None
        self.linked = False
        self.to_client = 0
        self.to_origin = 0
        self.status = 0
        self.emitted = False
        self.dial_started = 0.0
        self._pauser: ClientPauser | None = None

    def internal_error(self, failure: Failure) -> None:
        """A bug in a callback of this exchange: the connection handles it."""
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
        hop = rt.dialer.plan(target.scheme, target.host, target.port, False)
        self.hop = hop
        plan = plan_request(head, target, hop, rt, conn.client_ip)
        if plan.answer_locally:
            self._answer_locally(rest)
            return
        self.upgrade = plan.upgrade
        self.out_head = plan.head
        body = plan.body
        if body is not None:
            self.req_body = body
            self.req_had_body = True
            self.req_chunked = isinstance(body, ChunkedDecoder)
            if self.req_chunked or (head.content_length or 0) >= BULK:
                bulk_reads(conn.transport)
        conn.stash(rest)
        up = factory.reuse(hop, rt)
        if up is not None:
            conn.move(Phase.FORWARDING)
            self._attach(up, True)
        else:
            self._dial(hop)

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
        self.conn.stash(rest)
        self.hop = hop = rt.dialer.plan(b"", host, port, True)
        self._dial(hop)

    def _answer_locally(self, rest: bytes) -> None:
        head = self.head
        conn = self.conn
        closing = not head.keep_alive or head.codings is not None or bool(head.content_length)
        answer = local_answer(head, closing)
        self.to_client += len(answer)
        conn.transport.write(answer)
        self.emit(200, None)
        conn.stash(rest)
        conn.exchange_done(not closing)

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
        upt = self.up.transport  # type: ignore[union-attr]
        if self.req_chunked:
            out = []
            for piece in pieces:
                out += chunk(piece)
            if body.done:
                out.append(b"0\r\n" + b"".join(body.trailers) + b"\r\n")
            if out:
                data = b"".join(out)
                self.to_origin += len(data)
                write_soon(upt, data)
        else:
            for piece in pieces:
                self.to_origin += len(piece)
                write_soon(upt, piece)
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
        target = self.target
        assert target is not None
        err = connect_error(failure, target.host, target.port)
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
        up.on_data = self._upstream_data
        up.on_lost = self._upstream_lost
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

    def stop(self, abort: bool) -> None:
        """
        Stop what this exchange started: a credential check and a dial (a queued hash
        or lookup is dropped) and the upstream connection in flight.
        """
        if self.checking is not None:
            checking, self.checking = self.checking, None
            checking.cancel()
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        up = self.detach()
        if up is not None:
            abandon(up, abort)

    # -- the response -----------------------------------------------------------------

    @guarded
    def _upstream_data(self, data: bytes) -> None:
        self.conn.extend_deadline(self.runtime.config.read_timeout)
        if self.resp is not None:
            self._response_data(data, None)
            return
        reader = self.up.reader  # type: ignore[union-attr]
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
                self.conn.fail(e)
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
        self.interims += 1
        if self.interims > MAX_INTERIM:
            self.log.info("origin sent more than {limit} interim responses: 502", limit=MAX_INTERIM)
            self.conn.fail(
                BadGateway(
                    f"the origin sent more than {MAX_INTERIM} interim (1xx) responses",
                    "http_protocol_error",
                )
            )
            return False
        if self.head.minor:
            # RFC 9110 section 15.2: forward 1xx, but never to an HTTP/1.0 client.
            interim = serialize_response_head(resp, b"", self.runtime.via, None)
            self.to_client += len(interim)
            self.conn.transport.write(interim)
        return True

    def _switch_protocols(self, resp: ResponseHead, rest: bytes) -> None:
        up = self.up
        conn = self.conn
        if self.upgrade is None or up is None:
            conn.fail(BadGateway("the origin switched protocols unasked", "http_protocol_error"))
            return
        upgrade = resp.values(b"upgrade")
        fields = b"Upgrade: " + b", ".join(upgrade) + b"\r\n" if upgrade else b""
        switching = serialize_response_head(resp, fields, self.runtime.via, b"Upgrade")
        self.to_client += len(switching)
        conn.transport.write(switching)
        self.status = 101
        self.response_started = True
        conn.open_tunnel(up, conn.take_pending(), rest)

    def _begin_response(self, resp: ResponseHead, rest: bytes) -> None:
        hop = self.hop
        conn = self.conn
        if resp.status == 407 and hop is not None and hop.absolute:
            # The parent's challenge is for us, not the client, who can't answer it.
            assert hop.parent is not None
            conn.fail(
                BadGateway(
                    f"parent proxy {hop.parent.name} requires authentication (407): "
                    "check the credentials in its URL",
                    "destination_unavailable",
                    details=f"parent {hop.parent.name} answered 407",
                )
            )
            return
        plan = plan_response(
            self.head, resp, self.req_body is None and not conn.eof and not conn.last
        )
        self.out_chunked = plan.chunked
        self.keep_client = plan.keep_client
        # An origin that answered before the request body was complete may or may not
        # read the rest as body: never reuse such a connection.
        self.up_reusable = plan.reusable and self.req_body is None
        head = serialize_response_head(resp, plan.framing, self.runtime.via, plan.connection)
        self.resp = resp
        self.response_started = True
        self.status = resp.status
        decoder = plan.decoder
        if decoder is None or decoder.done:
            self.to_client += len(head)
            write_soon(conn.transport, head)
            self.resp_body = None
            if rest:
                self.up_reusable = False
            if self.req_body is None:
                self._response_complete()
            return
        self.resp_body = decoder
        if plan.bulk:
            bulk_reads(self.up.transport)  # type: ignore[union-attr]
        self._response_data(rest, head)

    def _response_data(self, data: bytes, head: bytes | None) -> None:
        decoder = self.resp_body
        conn = self.conn
        if decoder is None:
            # Bytes after a complete response, before the request finished: the origin is
            # misbehaving; it won't be reused.
            self.up_reusable = False
            return
        try:
            pieces, rest = decoder.feed(data) if data else ([], b"")
        except ProxyError as e:
            if head is not None:
                self.to_client += len(head)
                conn.transport.write(head)
            conn.fail(e)
            return
        out = [head] if head is not None else []
        if self.out_chunked:
            for piece in pieces:
                out += chunk(piece)
            if decoder.done:
                out.append(b"0\r\n" + b"".join(decoder.trailers) + b"\r\n")
        else:
            out += pieces
        if len(out) == 1:
            data = out[0]
            self.to_client += len(data)
            write_soon(conn.transport, data)
        elif out:
            data = b"".join(out)
            self.to_client += len(data)
            write_soon(conn.transport, data)
        if decoder.done:
            self.resp_body = None
            if rest:
                self.up_reusable = False
            if self.req_body is None:
                self._response_complete()

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
            if (
                self.reused
                and not self.retried
                and not up.reader.pending
                and not self.req_had_body
                and self.head.method in _IDEMPOTENT
            ):
                # A pooled connection the origin had closed: try once on a fresh one.
                self.retried = True
                assert self.hop is not None
                self._dial(self.hop)
                return
            conn.fail(
                BadGateway(
                    "the origin closed the connection without a complete response",
                    "connection_terminated",
                )
            )
            return
        if isinstance(self.resp_body, UntilCloseDecoder):
            self.resp_body.done = True
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
        """Report this exchange, once, to the factory's observers (if any)."""
        if self.emitted or not self.conn.factory.observers:
            return
        self.emitted = True
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
    )
    for observer in conn.factory.observers:
        observer(record)


def abandon(up: UpstreamProtocol, abort: bool) -> None:
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
