"""
How a shared cache revalidates a stored response and answers a client's own conditional
and range requests from it (RFC 9110 sections 13 and 14, RFC 9111 sections 4.3.1-4.3.2):
the validators to send, whether If-None-Match or If-Modified-Since match, the fields a
304 repeats, and the single range to answer with a 206.

Sans-IO, like L{aproxy.cache.rules}: field lines as (name, value) pairs, times passed in.
"""

from __future__ import annotations

import re
from typing import Final

from aproxy.cache.control import (
    Fields,
    field_lines,
    field_values,
    first_date,
    parse_entity_tag,
    parse_http_date,
)

__all__ = ["conditional_match", "not_modified_fields", "parse_range", "validation_fields"]

# The fields a 304 carries over from the 200 it stands for (RFC 9110 section 15.4.5).
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"content-location", b"date", b"etag", b"vary", b"cache-control", b"expires"}
)
_RANGE: Final = re.compile(rb"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)", re.IGNORECASE)


def _etag(resp_fields: Fields) -> bytes | None:
    """The stored response's ETag value, if it has a well-formed one."""
    lines = field_lines(resp_fields, b"etag")
    if not lines or parse_entity_tag(lines[0]) is None:
        return None
    return lines[0].strip(b" \t")


def validation_fields(resp_fields: Fields) -> bytes:
    """
    The precondition fields that revalidate a stored response (RFC 9111 section 4.3.1):
    If-None-Match with its entity tag, If-Modified-Since with its Last-Modified.

    @return: Field lines, each ending in CRLF; C{b""} when the response has no validator
        (the cache then forwards the request unconditionally).
    """
    out = b""
    etag = _etag(resp_fields)
    if etag is not None:
        out += b"If-None-Match: " + etag + b"\r\n"
    last_modified = field_lines(resp_fields, b"last-modified")
    if last_modified and parse_http_date(last_modified[0]) is not None:
        out += b"If-Modified-Since: " + last_modified[0].strip(b" \t") + b"\r\n"
    return out


def conditional_match(
    method: bytes,
    req_fields: Fields,
    resp_fields: Fields,
    response_time: float | None = None,
) -> bool | None:
    """
    Evaluate a request's If-None-Match or If-Modified-Since against a stored 200 response
    (RFC 9110 sections 13.1.2, 13.1.3, in the order of 13.2.2; RFC 9111 section 4.3.2).

    @param method: The request method; only GET and HEAD are evaluated.
    @param response_time: When the stored response was received: the modification date
        used when it has neither Last-Modified nor Date (RFC 9111 section 4.3.2).
    @return: L{True} to answer 304, L{False} to answer in full, L{None} when the request
        has no precondition this evaluates (none, or only invalid ones).
    """
    if method not in (b"GET", b"HEAD"):
        return None
    tags = [
        member
        for member in field_values(req_fields, b"if-none-match")
        if member == b"*" or parse_entity_tag(member) is not None
    ]
    if tags:
        if b"*" in tags:
            return True
        # Weak comparison (RFC 9110 section 8.8.3.2): the opaque tags are equal.
        stored = _etag(resp_fields)
        stored_tag = parse_entity_tag(stored) if stored is not None else None
        if stored_tag is None:
            return False
        opaque = {tag[1] for tag in map(parse_entity_tag, tags) if tag is not None}
        return stored_tag[1] in opaque
    # Section 13.1.3: ignored unless it is one valid HTTP-date (and when If-None-Match is
    # present, which returned above when it held any valid member).
    lines = field_lines(req_fields, b"if-modified-since")
    if len(lines) != 1:
        return None
    since = parse_http_date(lines[0], response_time)
    if since is None:
        return None
    modified = first_date(resp_fields, b"last-modified", response_time)
    if modified is None:
        modified = first_date(resp_fields, b"date", response_time)
    if modified is None:
        modified = response_time
    if modified is None:
        return False
    return modified <= since


def not_modified_fields(resp_fields: Fields) -> list[tuple[bytes, bytes]]:
    """
    The stored fields a 304 answered from the cache repeats (RFC 9110 section 15.4.5):
    Content-Location, Date, ETag, Vary, Cache-Control and Expires, in stored order.
    """
    return [(n, v) for n, v in resp_fields if n.lower() in _NOT_MODIFIED_FIELDS]


def _range_number(digits: bytes) -> int:
    """A range position; a longer number than any length is capped (int() has limits)."""
    return int(digits) if len(digits) <= 18 else 10**18


def parse_range(
    req_fields: Fields, resp_fields: Fields, length: int
) -> tuple[int, int] | int | None:
    """
    The byte range to answer from a stored complete response (RFC 9110 sections 14.1.1,
    14.2, 13.1.5).

    @param length: The stored content's length.
    @return: (first, last) inclusive, clipped to C{length}, for a satisfiable single range;
        C{416} when it is unsatisfiable; L{None} to answer the full response: no Range,
        several ranges or lines, another unit, a malformed or invalid range, a failed
        If-Range, or a suffix range of an empty representation (a 200 of the whole, empty,
        content serves it).
    """
    lines = field_lines(req_fields, b"range")
    if len(lines) != 1:
        return None
    m = _RANGE.fullmatch(lines[0].strip(b" \t"))
    if m is None:
        return None
    if not _if_range_holds(req_fields, resp_fields):
        return None
    first_text, last_text = m.groups()
    if first_text:
        first = _range_number(first_text)
        if last_text and _range_number(last_text) < first:
            return None
        if first >= length:
            return 416
        last = _range_number(last_text) if last_text else length - 1
        return first, min(last, length - 1)
    if not last_text:
        return None
    suffix = _range_number(last_text)
    if suffix == 0:
        return 416
    if length == 0:
        return None
    return max(0, length - suffix), length - 1


def _if_range_holds(req_fields: Fields, resp_fields: Fields) -> bool:
    """
    Whether If-Range, if present, lets the range apply (RFC 9110 section 13.1.5): a strong
    entity tag strongly equal to the stored one, or a date equal to the stored
    Last-Modified when that is a strong validator for an intermediate cache (section
    8.8.2.2: at least 60 seconds before the stored Date).
    """
    lines = field_lines(req_fields, b"if-range")
    if not lines:
        return True
    if len(lines) > 1:
        return False
    value = lines[0].strip(b" \t")
    tag = parse_entity_tag(value)
    if tag is not None:
        stored = _etag(resp_fields)
        stored_tag = parse_entity_tag(stored) if stored is not None else None
        return not tag[0] and stored_tag is not None and not stored_tag[0] and stored_tag == tag
    when = parse_http_date(value)
    modified = first_date(resp_fields, b"last-modified", None)
    date = first_date(resp_fields, b"date", None)
    if when is None or modified is None or date is None:
        return False
    return when == modified and modified <= date - 60
