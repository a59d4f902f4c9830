"""
Stages: where code of its own steps into a request on its way through the proxy, the seams
that the cache, TLS interception and the addon API build on.

- Stage A, L{IRequestStage.answer}: before any upstream connection is made, a stage may
  answer the request itself (a cache hit, a generated PAC file, a blocked page), at once or
  later (a L{Deferred}: the client is paused meanwhile), with a body in memory or streamed
  from an L{IAnswerBody} that follows the client's pace. It may also add fields to the
  request that goes upstream (a cache's conditional revalidation), through the
  L{StageRequest} it is given.
- When the origin's final response head arrives, L{IRequestStage.replace_response} may put
  an answer in its place (a cache that revalidated: a 304 becomes the stored response), and
  a stage may add fields to a relayed response head (C{Cache-Status}).
- Stage B, L{IRequestStage.request_filter} and L{IRequestStage.response_filter}: a stage
  may see, and change, a request or response body chunk by chunk on its way through (a copy
  stored for the cache, a filter). The chunks pass synchronously, so the producer/consumer
  flow control between the two connections is the same as without a filter: a slow reader
  still pauses the fast writer, and nothing is held whole. A body a filter is given is
  re-framed as chunked (close-delimited to an HTTP/1.0 client), since a filter may change
  its length. A filter whose body will not reach its client whole is told so
  (L{IBodyFilter.abandoned}), and may ask for the rest to be read to it anyway (a cache
  that finishes an object other clients wait for).

Stages are given to L{aproxy.client.factory.ProxyFactory} and kept across reloads. With no
stage installed, a request costs one test of an empty tuple, no more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from aproxy.http.head import RequestHead, ResponseHead, Target

__all__ = [
    "Answer",
    "IAnswerBody",
    "IAnswerSink",
    "IBodyFilter",
    "IRequestStage",
    "StageRequest",
    "answer_bytes",
    "chain_filters",
    "finished",
    "first_answer",
    "replace_response",
    "request_filter",
    "response_filter",
]


@dataclass(slots=True)
class StageRequest:
    """
    What a stage is told of a request, and what it asks for it on the way.

    @ivar head: The request head as the client sent it.
    @ivar target: Where it goes (absolute form split; for a CONNECT, the authority).
    @ivar client: The client's address, or C{"unix"} on a unix socket.
    @ivar user: The user it authenticated as, if any.
    @ivar upstream_fields: Field lines (each ending in CRLF) a stage adds to the request
        sent upstream.
    @ivar upstream_drop: Lowercase names of client fields a stage leaves out of it.
    @ivar response_fields: Field lines a stage adds to the origin's response head on its
        way to the client (set at the latest in L{IRequestStage.response_filter}).
    @ivar notes: What stages say of the request for its record (e.g. C{"cache"}).
    @ivar state: Each stage's own state for this request, under the stage itself: it
        lives exactly as long as the request.
    @ivar peer: The request goes to the member of a cache fleet that owns its URL (see
        L{aproxy.upstream.routes.Fleet}): a cache neither answers nor stores it here.
    @ivar parent: The exit a stage chose for this request (at stage A): a parent proxy
        URL as for C{--upstream}, or C{"direct"}; L{None} leaves it to the routes.
    @ivar error_fields: Field lines a stage adds to the proxy's own error answer to the
        request (an origin it could not reach: C{Cache-Status}).
    @ivar gateway_timeout: An origin that can't be reached is answered 504, not 502 (a
        cache that holds a response it may not serve stale, RFC 9111 section 4.2.4).
    @ivar fallback: What answers the request in place of the proxy's 502 or 504 when the
        origin can't be reached before its response starts (a cache's stale copy, RFC
        9111 section 4.2.4), if anything: called once, it may still say L{None}.
    """

    head: RequestHead
    target: Target
    client: str
    user: str | None
    upstream_fields: bytes = b""
    upstream_drop: tuple[bytes, ...] = ()
    response_fields: bytes = b""
    notes: dict[str, str] = field(default_factory=dict)
    state: dict[object, Any] = field(default_factory=dict)
    peer: bool = False
    parent: str | None = None
    error_fields: bytes = b""
    gateway_timeout: bool = False
    fallback: Callable[[], Answer | None] | None = None


# Not frozen (a frozen dataclass's __init__ costs twice as much, once per cache hit):
# an Answer is still not changed once made.
@dataclass(slots=True)
class Answer:
    """
    A response a stage gives in place of the origin's.

    @ivar status: The status code.
    @ivar reason: The reason phrase.
    @ivar fields: Field lines as (name, value) pairs; the proxy writes the framing itself
        (C{Content-Length}), and C{Connection} when it closes.
    @ivar body: The whole body (when it is not streamed from C{source}).
    @ivar source: Where a streamed body comes from, or L{None} for C{body}.
    @ivar length: The C{Content-Length} to announce when it is not C{len(body)}: the
        length of a streamed body (L{None}: not known yet; it then goes chunked), or of
        the body a C{HEAD} answer describes.
    @ivar block: Field lines already written out (each ending in CRLF), sent before
        C{fields}: a stored response's, serialized once rather than per answer.
    """

    status: int
    reason: bytes = b"OK"
    fields: Sequence[tuple[bytes, bytes]] = field(default_factory=tuple)
    body: bytes = b""
    source: Any = None
    length: int | None = None
    block: bytes = b""


class IAnswerSink(Interface):
    """Where an L{IAnswerBody} sends its bytes: the exchange that answers."""

    def answer_data(data: bytes) -> None:  # noqa: N805
        """The next bytes of the body."""

    def answer_done() -> None:
        """The body is complete (exactly the announced length was sent)."""

    def answer_failed(why: str) -> None:  # noqa: N805
        """The body can't be completed: the client connection is closed, cut short."""


class IAnswerBody(Interface):
    """
    A streamed answer body. It is the client output's producer while it is sent: paused
    when the client's buffer fills, resumed when it drains, stopped when the client
    leaves (release what it holds then).
    """

    def start(sink: IAnswerSink) -> None:  # noqa: N805
        """Begin sending the body to C{sink}."""

    def pauseProducing() -> None:
        """The client's buffer is full: send nothing until resumed."""

    def resumeProducing() -> None:
        """The client's buffer drained: go on."""

    def stopProducing() -> None:
        """The client is gone (or the exchange failed): stop for good, release resources."""


class IBodyFilter(Interface):
    """Sees a body chunk by chunk, and may change it."""

    observe_only = Attribute(
        """True when L{data} always returns its chunk unchanged and L{end} returns
        C{b""} (a cache's copy): the body then keeps its framing (its
        C{Content-Length}) instead of being re-framed as chunked."""
    )

    def data(chunk: bytes) -> bytes:  # noqa: N805 (zope interfaces omit self)
        """
        One chunk of the body as it arrived.

        @return: The bytes to pass on in its place (the chunk itself to only observe it;
            C{b""} to hold it back for later).
        """

    def end() -> bytes:
        """The body is complete. @return: Bytes to add at its end (usually C{b""})."""

    def abandoned(can_finish: bool) -> bool:  # noqa: N805
        """
        The body will not reach its client whole: the client left, or the exchange
        failed. L{end} is then not called, unless this returns C{True}.

        @param can_finish: The origin connection is still open and the body's framing is
            known, so the rest could be read without the client.
        @return: With C{can_finish}, C{True} has the proxy read the rest of the body to
            this filter anyway (L{data} and L{end} follow, or L{abandoned} again with
            C{False} if that fails); otherwise ignored.
        """


class IRequestStage(Interface):
    """
    A stage of the request path. Each method is called for every request and returns
    L{None} to let the request go on as it would without the stage.
    """

    name = Attribute("A short name for logs.")

    def answer(request: StageRequest) -> Answer | Deferred[Answer | None] | None:  # noqa: N805
        """
        Stage A: answer C{request} here, before any upstream connection is made. A
        L{Deferred} answers later (L{None} then lets the request go on); it is cancelled
        if the client leaves first.
        """

    def replace_response(request: StageRequest, head: ResponseHead) -> Answer | None:  # noqa: N805
        """
        The origin's final response head to C{request}: an answer to send in its place
        (the origin's body, if any, is not read and its connection is not reused).
        """

    def request_filter(request: StageRequest) -> IBodyFilter | None:  # noqa: N805
        """Stage B: a filter for the body of C{request} on its way to the origin."""

    def response_filter(request: StageRequest, head: ResponseHead) -> IBodyFilter | None:  # noqa: N805
        """Stage B: a filter for the body of the response C{head} on its way back."""

    def finished(request: StageRequest) -> None:  # noqa: N805
        """
        The exchange of C{request} ended, however it did (answered, relayed, failed, its
        client gone): release what is held for it. Called once per request a stage saw.
        """


def first_answer(stages: Sequence[IRequestStage], request: StageRequest) -> Any:
    """
    The answer of the first stage that answers C{request} itself, if any: an L{Answer},
    or a L{Deferred} of one (whose L{None} means no stage answers).
    """
    for stage in stages:
        answer = stage.answer(request)
        if answer is not None:
            return answer
    return None


def replace_response(
    stages: Sequence[IRequestStage], request: StageRequest, head: ResponseHead
) -> Answer | None:
    """The answer the first stage that replaces the response C{head} gives, if any."""
    for stage in stages:
        answer: Answer | None = stage.replace_response(request, head)
        if answer is not None:
            return answer
    return None


def request_filter(stages: Sequence[IRequestStage], request: StageRequest) -> Any:
    """The first request body filter a stage offers for C{request}, if any."""
    for stage in stages:
        found = stage.request_filter(request)
        if found is not None:
            return found
    return None


def response_filter(
    stages: Sequence[IRequestStage], request: StageRequest, head: ResponseHead
) -> Any:
    """The first response body filter a stage offers for C{head}, if any."""
    for stage in stages:
        found = stage.response_filter(request, head)
        if found is not None:
            return found
    return None


def answer_bytes(
    answer: Answer,
    via: bytes | None,
    minor: int,
    closing: bool,
    head_only: bool = False,
    chunked: bool = False,
) -> bytes:
    """
    Write C{answer} as an HTTP/1.1 response, framed by C{Content-Length} (none on a 304
    or a 204, which have no body and whose length would describe another response, RFC
    9110 sections 8.6 and 15.4.5), with its body when it is in memory.

    @param via: The proxy's C{Via} value, appended like on every relayed response.
    @param minor: The request's HTTP minor version (for C{Via}).
    @param closing: Whether the connection closes after it.
    @param head_only: The request was a C{HEAD}: the head alone.
    @param chunked: The streamed body goes chunked (its length is not known): no
        C{Content-Length}. A streamed body of unknown length that is not chunked is
        delimited by the close.
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, answer.reason), answer.block]
    lines += [name + b": " + value + b"\r\n" for name, value in answer.fields]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif answer.status in (204, 304):
        pass
    elif answer.length is not None:
        lines.append(b"Content-Length: %d\r\n" % answer.length)
    elif answer.source is None:
        lines.append(b"Content-Length: %d\r\n" % len(answer.body))
    if via is not None:
        lines.append(b"Via: 1.%d %s\r\n" % (minor, via))
    if closing:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only and answer.source is None and answer.status not in (204, 304):
        lines.append(answer.body)  # (a 204 or 304 has none, whatever it was given)
    return b"".join(lines)


def finished(stages: Sequence[IRequestStage], request: StageRequest) -> None:
    """Tell every stage that the exchange of C{request} ended."""
    for stage in stages:
        stage.finished(request)


@implementer(IBodyFilter)
class Chained:
    """
    Two body filters in a row: a stage's (the cache's copy, which sees the origin's
    bytes) and then an addon's transformers. Once the client is gone only the first is
    fed on (a cache may finish its object), the transformers are dropped.
    """

    observe_only = False

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second: Any = second

    def data(self, chunk: bytes) -> bytes:
        """Through the first filter, then the second (while the client is there)."""
        chunk = self.first.data(chunk)
        second = self.second
        out: bytes = second.data(chunk) if second is not None and chunk else chunk
        return out

    def end(self) -> bytes:
        """End both, the first's tail passing through the second."""
        tail: bytes = self.first.end()
        second = self.second
        if second is None:
            return tail
        out: bytes = (second.data(tail) if tail else b"") + second.end()
        return out

    def abandoned(self, can_finish: bool) -> bool:
        """The first decides whether to read on; the second is dropped."""
        if self.second is not None:
            self.second.abandoned(False)
            self.second = None
        return bool(self.first.abandoned(can_finish))


def chain_filters(first: Any, second: Any) -> Any:
    """C{first} then C{second} as one body filter (either may be L{None})."""
    if first is None:
        return second
    if second is None:
        return first
    return Chained(first, second)
