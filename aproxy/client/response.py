"""
L{ResponseHalf}: the response half of a L{aproxy.client.exchange.ClientExchange}, how the
origin's answer goes back to the client: interim (1xx) heads relayed, a 101 turned into a
tunnel, the final head re-framed (L{aproxy.client.plan.plan_response}) and its body
streamed through, filtered by a stage if one asks to.

The state stays in the one exchange object; this class only holds the code of its second
half, so that each half reads on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from aproxy.client.plan import frame_pieces, plan_response
from aproxy.client.runtime import Runtime
from aproxy.client.side import ClientSide
from aproxy.client.stages import (
    Answer,
    IBodyFilter,
    StageRequest,
    replace_response,
    response_filter,
)
from aproxy.client.wire import bulk_reads, write_soon
from aproxy.errors import BadGateway, ProxyError
from aproxy.http.head import (
    BODY_NONE,
    RequestHead,
    ResponseHead,
    parse_response_head,
    response_body_kind,
    serialize_response_head,
)
from aproxy.upstream.dialer import Hop
from aproxy.upstream.protocol import UpstreamProtocol, abandon

__all__ = ["MAX_INTERIM", "ResponseHalf"]

# Interim (1xx) responses relayed per request: a 100 Continue and a few 103 Early Hints are
# normal; hundreds are an origin gone wrong (or hostile).
MAX_INTERIM = 32


class ResponseHalf:
    """The code of an exchange's response half (its state is the exchange's)."""

    log = Logger()
    conn: ClientSide
    runtime: Runtime
    head: RequestHead
    hop: Hop | None
    up: UpstreamProtocol | None
    view: StageRequest | None
    upgrade: bytes | None
    req_body: Any
    resp: ResponseHead | None
    resp_body: Any
    resp_filter: IBodyFilter | None
    hooks: Any
    response_hooked: bool
    resp_edit: tuple[tuple[bytes, ...], bytes]
    response_started: bool
    interims: int
    out_chunked: bool
    keep_client: bool
    up_reusable: bool
    to_client: int
    status: int

    def _response_complete(self) -> None:
        """The response (and the request) are complete (the exchange decides what next)."""
        raise NotImplementedError

    def detach(self) -> UpstreamProtocol | None:
        """Unlink the upstream connection (the exchange does it)."""
        raise NotImplementedError

    def send_answer(self, answer: Answer, rest: bytes) -> None:
        """Send a stage's answer (see L{aproxy.client.answering.AnswerHalf})."""
        raise NotImplementedError

    if TYPE_CHECKING:

        def _hook_response(self, resp: ResponseHead, rest: bytes) -> None:
            """Run the addons' response hooks (see L{aproxy.client.hooks.HookHalf})."""
            ...

    def _replaced(self, resp: ResponseHead, answer: Answer, rest: bytes) -> None:
        """
        A stage answers in place of the origin's response C{resp}: the origin connection
        goes back to the pool when nothing of it is left unread, and is closed otherwise.
        """
        up = self.detach()
        conn = self.conn
        if up is not None:
            clean = (
                response_body_kind(resp, self.head.method) == BODY_NONE
                and not rest
                and resp.keep_alive
                and self.req_body is None
                and self.runtime.config.pool_size
            )
            if clean:
                up.transport.resumeProducing()
                conn.factory.pool.release(up)
            else:
                abandon(up, abort=False)
        self.send_answer(answer, conn.take_pending())

    def _response_heads(self, data: bytes) -> None:
        """Response heads from the origin: interim ones relayed, then the final one."""
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
        rt = self.runtime
        view = self.view
        if rt.stages and view is not None:
            answer = replace_response(rt.stages, view, resp)
            if answer is not None:
                self._replaced(resp, answer, rest)
                return
            self.resp_filter = response_filter(rt.stages, view, resp)
        if rt.addons is not None and self.hooks is not None and not self.response_hooked:
            self._hook_response(resp, rest)  # (it goes on with _relay_response)
            return
        self._relay_response(resp, rest)

    def _relay_response(self, resp: ResponseHead, rest: bytes) -> None:
        """Send the final response head, re-framed, and then its body as it comes."""
        conn = self.conn
        rt = self.runtime
        view = self.view
        extra = view.response_fields if view is not None else b""
        drop, edited = self.resp_edit
        plan = plan_response(
            self.head,
            resp,
            self.req_body is None and not conn.eof and not conn.last,
            self.resp_filter is not None and not self.resp_filter.observe_only,
        )
        self.out_chunked = plan.chunked
        self.keep_client = plan.keep_client
        # An origin that answered before the request body was complete may or may not
        # read the rest as body: never reuse such a connection.
        self.up_reusable = plan.reusable and self.req_body is None
        head = serialize_response_head(
            resp, plan.framing + extra + edited, rt.via, plan.connection, drop
        )
        self.resp = resp
        self.response_started = True
        self.status = resp.status
        decoder = plan.decoder
        if decoder is None or (decoder.done and self.resp_filter is None):
            self.to_client += len(head)
            write_soon(conn.transport, head)
            self.resp_body = None
            if decoder is None and self.resp_filter is not None:
                # No body (a 204, say): a stage's filter still sees it end, so the cache
                # commits the object rather than leave its followers waiting for bytes.
                resp_filter, self.resp_filter = self.resp_filter, None
                resp_filter.end()
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
        if head is None:
            out = frame_pieces(pieces, decoder, self.resp_filter, self.out_chunked)
        else:
            try:
                out = frame_pieces(pieces, decoder, self.resp_filter, self.out_chunked)
            except Exception:
                # A filter that failed before the head went out: nothing of the response
                # was sent, so the client gets the error answer, not a bare close.
                self.response_started = False
                raise
            out.insert(0, head)
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.to_client += len(data)
            write_soon(conn.transport, data)
        if decoder.done:
            self.resp_body = None
            if rest:
                self.up_reusable = False
            if self.req_body is None:
                self._response_complete()
