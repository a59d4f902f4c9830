"""
Stages: where code of its own steps into a request on its way through the proxy, the seams
that the cache, TLS interception and the addon API build on.

- Stage A, L{IRequestStage.answer}: before any upstream connection is made, a stage may
  answer the request itself (a cache hit, a generated PAC file, a blocked page).
- Stage B, L{IRequestStage.request_filter} and L{IRequestStage.response_filter}: a stage
  may see, and change, a request or response body chunk by chunk on its way through (a copy
  stored for the cache, a filter). The chunks pass synchronously, so the producer/consumer
  flow control between the two connections is the same as without a filter: a slow reader
  still pauses the fast writer, and nothing is held whole. A body a filter is given is
  re-framed as chunked (close-delimited to an HTTP/1.0 client), since a filter may change
  its length.

Stages are given to L{aproxy.client.factory.ProxyFactory} and kept across reloads. With no
stage installed, a request costs one test of an empty tuple, no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface

from aproxy.http.head import RequestHead, ResponseHead, Target

__all__ = [
    "Answer",
    "IBodyFilter",
    "IRequestStage",
    "StageRequest",
    "answer_bytes",
    "first_answer",
    "request_filter",
    "response_filter",
]


@dataclass(frozen=True, slots=True)
class StageRequest:
    """
    What a stage is told of a request.

    @ivar head: The request head as the client sent it.
    @ivar target: Where it goes (absolute form split; for a CONNECT, the authority).
    @ivar client: The client's address, or C{"unix"} on a unix socket.
    @ivar user: The user it authenticated as, if any.
    """

    head: RequestHead
    target: Target
    client: str
    user: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    """
    A response a stage gives in place of the origin's.

    @ivar status: The status code.
    @ivar reason: The reason phrase.
    @ivar fields: Field lines as (name, value) pairs; the proxy writes the framing itself
        (C{Content-Length}), and C{Connection} when it closes.
    @ivar body: The whole body.
    """

    status: int
    reason: bytes = b"OK"
    fields: Sequence[tuple[bytes, bytes]] = field(default_factory=tuple)
    body: bytes = b""


class IBodyFilter(Interface):
    """Sees a body chunk by chunk, and may change it."""

    def data(chunk: bytes) -> bytes:  # noqa: N805 (zope interfaces omit self)
        """
        One chunk of the body as it arrived.

        @return: The bytes to pass on in its place (the chunk itself to only observe it;
            C{b""} to hold it back for later).
        """

    def end() -> bytes:
        """The body is complete. @return: Bytes to add at its end (usually C{b""})."""


class IRequestStage(Interface):
    """
    A stage of the request path. Each method is called for every request and returns
    L{None} to let the request go on as it would without the stage.
    """

    name = Attribute("A short name for logs.")

    def answer(request: StageRequest) -> Answer | None:  # noqa: N805
        """Stage A: answer C{request} here, before any upstream connection is made."""

    def request_filter(request: StageRequest) -> IBodyFilter | None:  # noqa: N805
        """Stage B: a filter for the body of C{request} on its way to the origin."""

    def response_filter(request: StageRequest, head: ResponseHead) -> IBodyFilter | None:  # noqa: N805
        """Stage B: a filter for the body of the response C{head} on its way back."""


def first_answer(stages: Sequence[IRequestStage], request: StageRequest) -> Answer | None:
    """The answer of the first stage that answers C{request} itself, if any."""
    for stage in stages:
        answer: Answer | None = stage.answer(request)
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


def answer_bytes(answer: Answer, via: bytes | None, minor: int, closing: bool) -> bytes:
    """
    Write C{answer} as an HTTP/1.1 response, framed by C{Content-Length}.

    @param via: The proxy's C{Via} value, appended like on every relayed response.
    @param minor: The request's HTTP minor version (for C{Via}).
    @param closing: Whether the connection closes after it.
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, answer.reason)]
    lines += [name + b": " + value + b"\r\n" for name, value in answer.fields]
    lines.append(b"Content-Length: %d\r\n" % len(answer.body))
    if via is not None:
        lines.append(b"Via: 1.%d %s\r\n" % (minor, via))
    if closing:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(answer.body)
    return b"".join(lines)
