"""
Answers from stored responses: what a hit needs of an object, worked out once
(L{Prepared}), the object a lookup found (L{Found}), and the answer it makes
(L{answer_from}): a 304 to a matching precondition, a 206 or 416 to a range, or the whole
stored response, with its body in memory or streamed from memory or its file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, BinaryIO

from aproxy.cache import preconditions, rules
from aproxy.cache.background import stale_if_error
from aproxy.cache.fill import BytesSource, FileSource, Fill, FillReader
from aproxy.cache.store import Meta
from aproxy.client.stages import Answer
from aproxy.http.head import RequestHead

__all__ = ["Found", "Prepared", "answer_from", "follower_answer", "stale_answer"]

# Objects at most this large are answered in one write from memory; larger ones stream.
_SMALL = 64 * 1024


class Prepared:
    """
    What a hit needs of a stored response's metadata, worked out once per object (kept
    with it in the memory tier).

    @ivar freshness: Its freshness lifetime and age.
    @ivar block: Its stored field lines (but Age) as they go to the client.
    """

    __slots__ = ("block", "freshness")

    def __init__(self, meta: Meta) -> None:
        self.freshness = rules.Freshness(
            meta.status, meta.fields, meta.request_time, meta.response_time
        )
        self.block = b"".join(
            name + b": " + value + b"\r\n" for name, value in rules.without_age(meta.fields)
        )


@dataclass
class Found:
    """
    A stored variant chosen for a request, and its body (bytes, or an open file).

    @ivar memory: Whether it came from the memory tier.
    """

    meta: Meta
    prepared: Prepared
    memory: bool
    body: bytes | None = None
    file: BinaryIO | None = None

    def close(self) -> None:
        """Close the body's file, if one was opened and not handed over."""
        file, self.file = self.file, None
        if file is not None:
            file.close()


def answer_from(
    found: Found,
    head: RequestHead,
    age: float,
    lifetime: float,
    fwd_status: int | None,
    plain: bool = False,
    value: bytes | None = None,
) -> tuple[Answer, str, int]:
    """
    Answer request C{head} from C{found}: a 304, a 206, or the whole stored response (the
    latter alone for a C{plain} request, one without preconditions or a range).

    @param fwd_status: The status of the revalidation that refreshed it (a 304), if any.
    @param value: The C{Cache-Status} value, when not the one these imply.
    @return: The answer, the request's result for the log (C{TCP_MEM_HIT}, ...) and the
        body bytes it serves without the origin.
    """
    meta = found.meta
    ttl = lifetime - age
    if fwd_status is None:
        # (What rules.cache_status(hit=True, ttl=ttl) writes, without its general case:
        # a hit's one field value that changes per request.)
        status_value = b"aproxy; hit; ttl=%d" % math.floor(ttl)
        result = "TCP_MEM_HIT" if found.memory else "TCP_HIT"
    else:
        status_value = rules.cache_status(fwd="stale", fwd_status=fwd_status, ttl=ttl)
        result = "TCP_REFRESH_UNMODIFIED"
    if value is not None:
        status_value = value
    extra = [(b"Age", b"%d" % int(age)), (b"Cache-Status", status_value)]
    length = meta.length
    if not plain and meta.status == 200:
        fields = head.fields
        if preconditions.conditional_match(head.method, fields, meta.fields):
            found.close()
            fields_304 = preconditions.not_modified_fields(meta.fields) + extra
            answer = Answer(304, b"Not Modified", fields_304)
            return answer, "TCP_INM_HIT" if fwd_status is None else result, 0
        wanted = (
            preconditions.parse_range(fields, meta.fields, length)
            if head.method == b"GET"
            else None
        )
        if isinstance(wanted, int):
            found.close()
            unsatisfiable = [(b"Content-Range", b"bytes */%d" % length), *extra]
            return Answer(416, b"Range Not Satisfiable", unsatisfiable), result, 0
        if wanted is not None:
            first, last = wanted
            part = [
                (n, v) for n, v in rules.without_age(meta.fields) if n.lower() != b"content-range"
            ]
            part.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, length)))
            answer = _with_body(found, 206, b"Partial Content", part + extra, first, last, head)
            return answer, result, last - first + 1
    answer = _with_body(found, meta.status, meta.reason, extra, 0, length - 1, head, True)
    return answer, result, length if head.method == b"GET" else 0


def _with_body(
    found: Found,
    status: int,
    reason: bytes,
    fields: list[tuple[bytes, bytes]],
    first: int,
    last: int,
    head: RequestHead,
    stored: bool = False,
) -> Answer:
    """
    An answer with the body bytes C{first}..C{last} of C{found} (none to a C{HEAD}), and
    its stored fields before C{fields} when C{stored}.
    """
    size = last - first + 1
    block = found.prepared.block if stored else b""
    if head.method == b"HEAD":
        found.close()
        return Answer(status, reason, fields, length=size, block=block)
    body = found.body
    if body is not None:
        part = body[first : last + 1] if (first, last + 1) != (0, len(body)) else body
        if size <= _SMALL:
            return Answer(status, reason, fields, part, block=block)
        source: Any = BytesSource(part)
    else:
        file = found.file
        assert file is not None
        found.file = None
        source = FileSource(file, size, first, last)
    return Answer(status, reason, fields, source=source, length=size, block=block)


def stale_answer(
    found: Found, head: RequestHead, now: float, fwd_status: int | None = None
) -> tuple[Answer, int] | None:
    """
    Answer request C{head} from C{found}, stale, because its origin could not be reached
    (RFC 9111 section 4.2.4; the caller checked it may) or answered C{fwd_status}, a
    server error, and C{stale-if-error} allows it (RFC 5861 section 4), saying so in
    C{Cache-Status}.

    @return: The answer and the body bytes it serves without the origin, or L{None}.
    """
    fresh = found.prepared.freshness
    age = fresh.age(now)
    if fwd_status is not None and not stale_if_error(head.fields, fresh, age):
        return None
    detail = "origin-unreachable" if fwd_status is None else "stale-if-error"
    value = rules.cache_status(
        fwd="stale", fwd_status=fwd_status, ttl=fresh.lifetime - age, detail=detail
    )
    answer, _, saved = answer_from(found, head, age, fresh.lifetime, None, value=value)
    return answer, saved


def follower_answer(fill: Fill, method: bytes, now: float) -> Answer:
    """
    The answer to a request that follows C{fill}, a fetch in progress whose head arrived
    (a collapsed miss): its head, and its body streamed as it arrives.
    """
    meta = fill.meta
    assert meta is not None
    status_value = rules.cache_status(fwd="uri-miss", collapsed=True)
    age = rules.current_age(meta.fields, meta.request_time, meta.response_time, now)
    out = [
        *rules.without_age(meta.fields),
        (b"Age", b"%d" % int(age)),
        (b"Cache-Status", status_value),
    ]
    if method == b"HEAD":
        return Answer(meta.status, meta.reason, out, length=meta.length)
    # (A length not known yet, -1, streams chunked: see answer_bytes.)
    length = meta.length if meta.length >= 0 else None
    return Answer(meta.status, meta.reason, out, source=FillReader(fill), length=length)
