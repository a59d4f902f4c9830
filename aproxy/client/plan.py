"""
The pure decisions of an exchange: what goes upstream for a request (the head, how its
body is read) and how a response goes back (its framing, whether the connections stay
open). No I/O and no state: an L{aproxy.client.exchange.ClientExchange} asks and acts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from aproxy.client.runtime import Runtime
from aproxy.client.stages import IBodyFilter, StageRequest
from aproxy.config import ProxyConfig
from aproxy.errors import BadRequest, Forbidden
from aproxy.http.body import ChunkedDecoder, LengthDecoder, UntilCloseDecoder, chunk
from aproxy.http.head import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    RequestHead,
    ResponseHead,
    Target,
    framing_fields,
    response_body_kind,
    serialize_request_head,
)
from aproxy.upstream.dialer import Hop

__all__ = [
    "BULK",
    "XFF_NAMES",
    "RequestPlan",
    "ResponsePlan",
    "check_connect_port",
    "check_http_port",
    "frame_pieces",
    "plan_request",
    "plan_response",
]

# Bodies (responses, and requests from clients) at least this large, and chunked ones, are
# read in bigger pieces (see wire.bulk_reads).
BULK = 1 << 20
# X-Forwarded-For and the spellings CGI and WSGI read as the same variable
# (HTTP_X_FORWARDED_FOR): what --x-forwarded-for strip removes, from heads and trailers.
XFF_NAMES = frozenset(
    {b"x-forwarded-for", b"x-forwarded_for", b"x_forwarded-for", b"x_forwarded_for"}
)
_NO_NAMES: frozenset[bytes] = frozenset()


def check_http_port(config: ProxyConfig, port: int) -> None:
    """
    Refuse an absolute-form request to a port outside C{--http-ports}, whatever the
    route: through a parent the port is reached all the same.

    @raise Forbidden: 403 C{http_request_denied} naming the option.
    """
    if not config.http_port_allowed(port):
        raise Forbidden(
            f"requests to port {port} are not allowed (see the --http-ports option)",
            "http_request_denied",
            details=f"port {port}",
        )


def check_connect_port(config: ProxyConfig, port: int) -> None:
    """
    Refuse a CONNECT to a port outside C{--connect-ports}: a port rule, not an address
    one, so C{http_request_denied} (RFC 9209 section 2.3.10).

    @raise Forbidden: 403 naming the option, and what tunnelling clients need.
    """
    if not config.connect_allowed(port):
        raise Forbidden(
            f"CONNECT to port {port} is not allowed (see the --connect-ports option;"
            " clients that tunnel http:// and ws:// requests need --connect-ports 80,443)",
            "http_request_denied",
            details=f"port {port}",
        )


class RequestPlan(NamedTuple):
    """
    What to do with a request.

    @ivar answer_locally: The proxy is its last hop (C{Max-Forwards: 0} on OPTIONS or
        TRACE, RFC 9110 section 7.6.2): answer it here; the other fields are unset.
    @ivar head: The head to send upstream.
    @ivar body: The decoder of the request body, or L{None} when it has none.
    @ivar upgrade: The C{Upgrade} value forwarded (a protocol switch asked for), or L{None}.
    """

    answer_locally: bool = False
    head: bytes = b""
    body: Any = None
    upgrade: bytes | None = None


_LOCAL = RequestPlan(answer_locally=True)


def plan_request(
    head: RequestHead,
    target: Target,
    hop: Hop,
    runtime: Runtime,
    client_ip: str | None,
    req_filter: IBodyFilter | None = None,
    view: StageRequest | None = None,
) -> RequestPlan:
    """
    Decide what goes upstream for C{head}: Max-Forwards, the one case Upgrade is passed
    on, X-Forwarded-For, a parent's own credentials, and the body's decoder.

    @param req_filter: The stage body filter of the request: unless it only observes, the
        body goes chunked (its length may change), or with the C{Content-Length} the
        filter gives up front (its C{length}).
    @param view: What the stages saw of the request, with the fields they add and drop.

    @raise BadRequest: For a malformed Max-Forwards.
    """
    reframe = req_filter is not None and not req_filter.observe_only
    length = getattr(req_filter, "length", None) if reframe else None
    if length is not None:
        reframe = False
    extra = hop.fields
    if view is not None:
        extra += view.upstream_fields
    drop: tuple[bytes, ...] = view.upstream_drop if view is not None else ()
    if head.method in (b"OPTIONS", b"TRACE"):
        values = head.values(b"max-forwards")
        if values:
            if len(values) > 1 or not values[0].isdigit():
                raise BadRequest("malformed Max-Forwards field")
            hops = int(values[0])
            if hops == 0:
                return _LOCAL
            extra += b"Max-Forwards: %d\r\n" % (hops - 1)
            drop += (b"max-forwards",)
    upgrade_values = head.values(b"upgrade")
    upgrade = None
    if (
        upgrade_values
        and b"upgrade" in head.connection
        and head.minor
        and not (head.codings is not None or head.content_length)
    ):
        # The one case Connection and Upgrade are forwarded (RFC 9110 section 7.8).
        upgrade = b", ".join(upgrade_values)
        extra += b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
    xff = runtime.config.x_forwarded_for
    body: Any = None
    if head.codings is not None:
        body = ChunkedDecoder(True, XFF_NAMES if xff == "strip" else _NO_NAMES)
    elif head.content_length:
        body = LengthDecoder(head.content_length)
    if xff == "strip":
        drop += tuple(XFF_NAMES)
    elif xff == "add" and client_ip is not None:
        extra += b"X-Forwarded-For: " + client_ip.encode("ascii") + b"\r\n"
    if hop.absolute:
        # To an HTTP parent: a proxy request, with the parent's own credentials.
        assert hop.parent is not None
        extra += hop.parent.authorization or b""
    out = serialize_request_head(
        head, target, runtime.via, extra, drop, hop.absolute, reframe, length
    )
    return RequestPlan(False, out, body, upgrade)


def frame_pieces(pieces: list[bytes], decoder: Any, body_filter: Any, chunked: bool) -> list[bytes]:
    """
    The bytes to send for body C{pieces} just decoded by C{decoder}: through the body
    filter of a stage, if any, and framed as chunks when the body goes on chunked (with
    the last chunk and the trailers once C{decoder} is done).
    """
    if body_filter is not None:
        pieces = [body_filter.data(piece) for piece in pieces]
        if decoder.done:
            pieces.append(body_filter.end())
    if not chunked:
        return pieces
    out: list[bytes] = []
    for piece in pieces:
        out += chunk(piece)
    if decoder.done:
        out.append(b"0\r\n" + b"".join(decoder.trailers) + b"\r\n")
    return out


class ResponsePlan(NamedTuple):
    """
    How a response goes back to the client.

    @ivar decoder: The decoder of its body, or L{None} when it has none.
    @ivar framing: The framing field lines the proxy writes for it.
    @ivar chunked: Whether the body goes to the client chunked.
    @ivar keep_client: Whether the client connection stays open after it.
    @ivar reusable: Whether the origin connection may be reused after it (as far as the
        response says).
    @ivar connection: The C{Connection} value to send, or L{None} for none.
    @ivar bulk: Whether the body is large (or of unknown length): read in bigger pieces.
    """

    decoder: Any
    framing: bytes
    chunked: bool
    keep_client: bool
    reusable: bool
    connection: bytes | None
    bulk: bool


def plan_response(
    req: RequestHead, resp: ResponseHead, may_keep: bool, reframe: bool = False
) -> ResponsePlan:
    """
    Decide how C{resp} (to C{req}) is framed for the client and whether the connections
    stay open (RFC 9112 sections 6 and 9).

    @param may_keep: Whether the client connection may stay open as far as the proxy is
        concerned (the request body is complete, the client did not half-close, the
        proxy is not shutting down).
    @param reframe: A body with a length goes back chunked (close-delimited to an
        HTTP/1.0 client), since a filter may change its length.
    """
    kind = response_body_kind(resp, req.method)
    client11 = req.minor >= 1
    keep = req.keep_alive and may_keep
    chunked = False
    framing = b""
    decoder: Any = None
    length = resp.content_length or 0
    if kind == BODY_LENGTH and reframe:
        decoder = LengthDecoder(length)
        if client11:
            chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep = False
    elif kind == BODY_LENGTH:
        decoder = LengthDecoder(length)
        framing = b"Content-Length: %d\r\n" % length
    elif kind == BODY_NONE:
        if resp.content_length is not None and resp.status != 204:
            # HEAD and 304 keep the length they describe (RFC 9110 section 8.6).
            framing = b"Content-Length: %d\r\n" % resp.content_length
    else:
        decoder = ChunkedDecoder(False) if kind == BODY_CHUNKED else UntilCloseDecoder()
        if client11:
            chunked = True
            framing = framing_fields(BODY_CHUNKED, None, resp.codings)
        else:
            keep = False
    if not keep:
        connection: bytes | None = b"close"
    else:
        connection = None if client11 else b"keep-alive"
    return ResponsePlan(
        decoder,
        framing,
        chunked,
        keep,
        resp.keep_alive and kind != BODY_CLOSE,
        connection,
        kind != BODY_LENGTH or length >= BULK,
    )
