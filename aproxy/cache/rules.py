"""
The decisions of a shared HTTP cache (RFC 9111): what may be stored and which fields, how
long it stays fresh, how old it is, whether a request accepts it, what an unsafe request
invalidates, and the Cache-Status field (RFC 9211) that reports all this. How a stored
response is revalidated and answers preconditions and ranges (RFC 9110) is in
L{aproxy.cache.preconditions}.

Sans-IO: no Twisted, no clock (times are POSIX seconds passed in), no storage. Field lines
come as (name, value) pairs with the name in any case. The parsing helpers live in
L{aproxy.cache.control} and are re-exported here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Final
from urllib.parse import urljoin

from aproxy.cache.control import (
    MAX_DELTA,
    Fields,
    cache_status,
    delta_seconds,
    field_lines,
    field_values,
    first_date,
    http_date,
    parse_cache_control,
    parse_entity_tag,
    parse_http_date,
)

__all__ = [
    "FRESH",
    "MAX_DELTA",
    "STALE_OK",
    "VALIDATE",
    "Fields",
    "Freshness",
    "cache_key",
    "cache_status",
    "choose",
    "current_age",
    "delta_seconds",
    "field_lines",
    "field_values",
    "freshness_lifetime",
    "has_explicit_freshness",
    "http_date",
    "invalidation_keys",
    "is_unsafe",
    "parse_cache_control",
    "parse_entity_tag",
    "parse_http_date",
    "request_cc_flags",
    "storable",
    "stored_fields",
    "updated_fields",
    "vary_key",
    "vary_names",
    "without_age",
]

#: L{choose}: the stored response is fresh enough for the request; serve it.
FRESH: Final = 0
#: L{choose}: stale, but the request's max-stale accepts it and the response allows it.
STALE_OK: Final = 1
#: L{choose}: forward a validation request (or an unconditional one) before answering.
VALIDATE: Final = 2

#: Statuses "heuristically cacheable" by default (RFC 9110 section 15.1).
HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: Statuses whose caching rules this cache implements, for must-understand (RFC 9111
#: section 5.2.2.3): the heuristically cacheable ones and the redirections it may store
#: with explicit freshness.
UNDERSTOOD_STATUSES: Final = HEURISTIC_STATUSES | {302, 303, 307}

_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}
_SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Connection options and the hop-by-hop fields RFC 9110 section 7.6.1 names, removed before
# forwarding and so before storage (RFC 9111 section 3.1); Proxy-Connection is the
# pre-standard spelling clients still send.
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer"}
    | {b"transfer-encoding", b"upgrade"}
)
# Fields about the proxy a cache forwards through, never stored (RFC 9111 section 3.1);
# Content-Length comes from the stored content. (Age is stored as received: the age
# computation of section 4.2.3 starts from it. Answers send the current age instead.)
_NOT_STORED: Final = (
    _HOP_BY_HOP
    | {b"content-length"}
    | {b"proxy-authenticate", b"proxy-authentication-info", b"proxy-authorization"}
)
# Fields that describe the stored content itself: an update from a 304 or HEAD response
# keeps the stored ones, since the content they describe is the stored one (RFC 9111
# section 3.2 lets a cache keep "header fields that the cache's stored response depends
# upon"; a changed Content-Encoding or Content-Range would misdescribe the stored bytes).
_KEPT_ON_UPDATE: Final = frozenset({b"content-encoding", b"content-md5", b"content-range", b"etag"})
_ABSOLUTE_URI: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#]*)([^#]*)")
_HOST_PORT: Final = re.compile(rb"([A-Za-z0-9\-._~%]+)(?::([0-9]*))?")
_V6_HOST_PORT: Final = re.compile(rb"\[([0-9A-Fa-f:.]+)\](?::([0-9]*))?")
_AROUND_COMMAS: Final = re.compile(rb"[ \t]*,[ \t]*")


def _has(fields: Fields, lname: bytes) -> bool:
    """Whether any field line is named C{lname}."""
    return any(name.lower() == lname for name, _ in fields)


def cache_key(scheme: bytes, host: bytes, port: int, path: bytes) -> bytes:
    """
    The primary cache key (RFC 9111 section 2): the target URI.

    @param scheme: C{b"http"} or C{b"https"}, in any case.
    @param host: The host, in any case; an IPv6 address without brackets.
    @param port: The port; written only when it is not the scheme's default.
    @param path: Path and query exactly as the request sent them (not normalized, so two
        spellings of one URI are two entries rather than one wrong one).
    @return: E.g. C{b"http://example.com/a?b"} or C{b"https://[::1]:8443/"}.
    """
    scheme = scheme.lower()
    host = host.lower()
    if b":" in host:
        host = b"[" + host + b"]"
    if _DEFAULT_PORTS.get(scheme) != port:
        host += b":%d" % port
    return scheme + b"://" + host + path


def storable(method: bytes, status: int, req_fields: Fields, resp_fields: Fields) -> str | None:
    """
    Whether a shared cache may store this response (RFC 9111 section 3).

    @param method: The request method; only GET responses are stored (a HEAD is answered
        from a stored GET, section 4.3.5 keeps HEAD responses for freshening only).
    @return: L{None} if it may be stored, else a short reason for logs and the Cache-Status
        C{detail}: C{"method"}, C{"status"}, C{"partial"}, C{"must-understand"},
        C{"no-store"}, C{"private"}, C{"authorization"}, C{"vary"} or
        C{"no-explicit-freshness"}.
    """
    if method != b"GET":
        return "method"
    # Final statuses only; 304 updates a stored response (section 4.3.4), it is not one.
    if not 200 <= status <= 599 or status == 304:
        return "status"
    # Section 3.3 lets a cache store incomplete responses only if it combines them (3.4),
    # which this one does not.
    if status == 206:
        return "partial"
    cc = parse_cache_control(resp_fields)
    ignore_no_store = False
    if "must-understand" in cc:
        # Section 5.2.2.3: store only with status rules we implement; then no-store (which
        # must-understand is sent with, for older caches) is ignored.
        if status not in UNDERSTOOD_STATUSES:
            return "must-understand"
        ignore_no_store = True
    if "no-store" in parse_cache_control(req_fields) or ("no-store" in cc and not ignore_no_store):
        return "no-store"
    # Section 5.2.2.7: a shared cache stores no private response, qualified or not (the
    # qualified form is allowed to mean the whole response).
    if "private" in cc:
        return "private"
    # Section 3.5: responses to authenticated requests only when explicitly allowed.
    if _has(req_fields, b"authorization") and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return "authorization"
    # Section 4.1: "Vary: *" always fails to match.
    if vary_names(resp_fields) is None:
        return "vary"
    if not ("public" in cc or has_explicit_freshness(resp_fields) or status in HEURISTIC_STATUSES):
        return "no-explicit-freshness"
    return None


def has_explicit_freshness(resp_fields: Fields) -> bool:
    """
    Whether the response states its freshness (s-maxage, max-age or an Expires field,
    RFC 9111 section 4.2.1), so L{freshness_lifetime} does not use the heuristic.
    """
    cc = parse_cache_control(resp_fields)
    return "s-maxage" in cc or "max-age" in cc or _has(resp_fields, b"expires")


def freshness_lifetime(
    status: int,
    resp_fields: Fields,
    response_time: float,
    heuristic_fraction: float = 0.1,
    heuristic_max: float = 86400.0,
) -> float:
    """
    How long a stored response stays fresh in a shared cache (RFC 9111 section 4.2.1).

    The first of: s-maxage, max-age, Expires minus Date; an invalid delta-seconds or Expires
    (C{0} included, section 5.3) means already stale. Without any, a heuristic (section
    4.2.2) for heuristically cacheable statuses or C{public}: C{heuristic_fraction} of the
    time since Last-Modified, at most C{heuristic_max}.

    @param response_time: When the response was received; stands for a missing or invalid
        Date.
    @return: Seconds, never negative.
    """
    cc = parse_cache_control(resp_fields)
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            seconds = delta_seconds(cc[directive])
            return 0.0 if seconds is None else float(seconds)
    date = first_date(resp_fields, b"date", response_time)
    if date is None:
        date = response_time
    expires_lines = field_lines(resp_fields, b"expires")
    if expires_lines:
        # Section 4.2.1: with several Expires lines, the first is used.
        expires = parse_http_date(expires_lines[0], response_time)
        return 0.0 if expires is None else max(0.0, expires - date)
    if status not in HEURISTIC_STATUSES and "public" not in cc:
        return 0.0
    last_modified = first_date(resp_fields, b"last-modified", response_time)
    if last_modified is None:
        return 0.0
    return max(0.0, min(heuristic_fraction * (date - last_modified), heuristic_max))


def current_age(
    resp_fields: Fields, request_time: float, response_time: float, now: float
) -> float:
    """
    The current age of a stored response (RFC 9111 section 4.2.3, computed as written).

    @param request_time: When the request that got this response was sent.
    @param response_time: When the response was received.
    @param now: The time of the use.
    @return: Seconds.
    """
    return _initial_age(resp_fields, request_time, response_time) + now - response_time


class Freshness:
    """
    What a stored response's own fields say about its freshness, worked out once and kept
    with the object (a hit then costs no parsing of its fields).

    @ivar lifetime: Its L{freshness_lifetime}.
    @ivar no_cache: Its C{Cache-Control} says C{no-cache}: every use is validated.
    @ivar no_stale: It may never be served stale (C{must-revalidate},
        C{proxy-revalidate} or C{s-maxage}: RFC 9111 sections 5.2.2.2, 5.2.2.8, 5.2.2.10).
    @ivar swr: Its C{stale-while-revalidate} window in seconds (RFC 5861 section 3), or 0.
    @ivar sie: Its C{stale-if-error} window in seconds (RFC 5861 section 4), or 0.
    """

    __slots__ = ("_initial", "_response_time", "lifetime", "no_cache", "no_stale", "sie", "swr")

    def __init__(
        self, status: int, resp_fields: Fields, request_time: float, response_time: float
    ) -> None:
        self._initial = _initial_age(resp_fields, request_time, response_time)
        self._response_time = response_time
        self.lifetime = freshness_lifetime(status, resp_fields, response_time)
        cc = parse_cache_control(resp_fields)
        self.no_cache = "no-cache" in cc
        self.no_stale = any(d in cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage"))
        self.swr = delta_seconds(cc.get("stale-while-revalidate")) or 0
        self.sie = delta_seconds(cc.get("stale-if-error")) or 0

    def age(self, now: float) -> float:
        """Its L{current_age} at C{now}."""
        return self._initial + now - self._response_time


def _initial_age(resp_fields: Fields, request_time: float, response_time: float) -> float:
    """The corrected initial age of RFC 9111 section 4.2.3 (the age when it was received)."""
    ages = field_values(resp_fields, b"age")
    age_value = delta_seconds(ages[0].decode("latin-1")) if ages else None
    date_value = first_date(resp_fields, b"date", response_time)
    if date_value is None:
        date_value = response_time
    apparent_age = max(0.0, response_time - date_value)
    response_delay = response_time - request_time
    corrected_age_value = (age_value or 0) + response_delay
    return max(apparent_age, corrected_age_value)


def vary_names(resp_fields: Fields) -> tuple[bytes, ...] | None:
    """
    The request fields a response varies on (RFC 9111 section 4.1).

    @return: Lowercased names, sorted and without duplicates; C{()} without Vary; L{None}
        when C{*} is listed (no later request can match).
    """
    names = {value.lower() for value in field_values(resp_fields, b"vary")}
    if b"*" in names:
        return None
    return tuple(sorted(names))


def vary_key(names: Sequence[bytes], req_fields: Fields) -> bytes:
    """
    The secondary cache key (RFC 9111 section 4.1): the request's values of the fields a
    response varies on, normalized so that equal keys mean matching requests.

    Lines of one field are combined with commas and the whitespace around commas removed
    (section 4.1 allows both normalizations). A missing field differs from an empty one.

    @param names: Field names (see L{vary_names}), in the order to use.
    @return: C{b""} when C{names} is empty.
    """
    parts = []
    for name in names:
        lname = name.lower()
        lines = field_lines(req_fields, lname)
        if not lines:
            parts.append(lname + b"!")
            continue
        value = _AROUND_COMMAS.sub(b",", b", ".join(lines))
        # Length-prefixed, so no value can imitate the next field's entry.
        parts.append(lname + b"=%d:" % len(value) + value)
    return b"\n".join(parts)


def choose(req_fields: Fields, resp_fields: Fields, lifetime: float, age: float) -> int:
    """
    Whether a stored response may answer a request (RFC 9111 sections 4.2, 5.2.1, 5.2.2).

    @param lifetime: The response's L{freshness_lifetime}.
    @param age: Its L{current_age} now.
    @return: L{FRESH}, L{STALE_OK} or L{VALIDATE}.
    """
    req = parse_cache_control(req_fields)
    resp = parse_cache_control(resp_fields)
    # Section 5.2.2.4: the qualified form is treated as the unqualified one, the safe
    # reading (the named fields would need revalidation anyway).
    if "no-cache" in resp or "no-cache" in req:
        return VALIDATE
    # Section 5.4: Pragma: no-cache counts only without a Cache-Control field.
    if not _has(req_fields, b"cache-control") and any(
        value.lower() == b"no-cache" for value in field_values(req_fields, b"pragma")
    ):
        return VALIDATE
    if "max-age" in req:
        # Section 5.2.1.1; an invalid value is read as 0, the most careful choice.
        max_age = delta_seconds(req["max-age"]) or 0
        if age > max_age:
            return VALIDATE
    if "min-fresh" in req:
        # Section 5.2.1.3; an invalid value is ignored (there is no number to honour).
        min_fresh = delta_seconds(req["min-fresh"])
        if min_fresh is not None and lifetime - age < min_fresh:
            return VALIDATE
    if age < lifetime:
        return FRESH
    # Stale (section 4.2). Section 5.2.1.2: max-stale without a value accepts any
    # staleness; an invalid value accepts none.
    if "max-stale" not in req:
        return VALIDATE
    max_stale_value = req["max-stale"]
    if max_stale_value is not None:
        max_stale = delta_seconds(max_stale_value)
        if max_stale is None or age - lifetime > max_stale:
            return VALIDATE
    # Sections 5.2.2.2, 5.2.2.8 and 5.2.2.10 (s-maxage implies proxy-revalidate for a
    # shared cache) forbid serving stale.
    if any(d in resp for d in ("must-revalidate", "proxy-revalidate", "s-maxage")):
        return VALIDATE
    return STALE_OK


def request_cc_flags(req_fields: Fields) -> tuple[bool, bool]:
    """
    The request's C{no-store} (RFC 9111 section 5.2.1.5) and C{only-if-cached} (section
    5.2.1.7) directives.

    @return: (no_store, only_if_cached).
    """
    cc = parse_cache_control(req_fields)
    return "no-store" in cc, "only-if-cached" in cc


def stored_fields(resp_fields: Fields) -> list[tuple[bytes, bytes]]:
    """
    The fields of a response to keep in the cache (RFC 9111 section 3.1).

    Dropped: hop-by-hop fields and those the Connection field names (RFC 9110 section
    7.6.1), Proxy-Authenticate, Proxy-Authentication-Info and Proxy-Authorization,
    Content-Length (the stored content gives it), and the fields
    named by a qualified C{no-cache} or C{private} directive (sections 5.2.2.4, 5.2.2.7).
    """
    drop = set(_NOT_STORED)
    drop.update(value.lower() for value in field_values(resp_fields, b"connection"))
    cc = parse_cache_control(resp_fields)
    for directive in ("no-cache", "private"):
        names = cc.get(directive)
        if names:
            drop.update(n.strip(" \t").lower().encode("latin-1") for n in names.split(","))
    return [(n, v) for n, v in resp_fields if n.lower() not in drop]


def updated_fields(stored: Fields, fresh: Fields) -> list[tuple[bytes, bytes]]:
    """
    A stored response's fields updated from a 304 or HEAD response (RFC 9111 section 3.2).

    Every field of C{fresh} that may be stored (L{stored_fields}) replaces all stored lines
    of that name, in the place of the first one; new names are appended. Fields the update
    names in a qualified no-cache or private directive are dropped afterwards. The fields
    that describe the stored content (Content-Encoding, Content-MD5, Content-Range, ETag)
    are never taken from the update.
    """
    incoming: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in stored_fields(fresh):
        lname = name.lower()
        if lname not in _KEPT_ON_UPDATE:
            incoming.setdefault(lname, []).append((name, value))
    merged: list[tuple[bytes, bytes]] = []
    for name, value in stored:
        lname = name.lower()
        if lname == b"age" and lname not in incoming:
            # The refreshed response's age starts from its own Age: none means none.
            continue
        if lname not in incoming:
            merged.append((name, value))
        elif incoming[lname]:
            merged.extend(incoming[lname])
            incoming[lname] = []
    for lines in incoming.values():
        merged.extend(lines)
    return stored_fields(merged)


def without_age(fields: Fields) -> list[tuple[bytes, bytes]]:
    """Stored fields as an answer sends them: without the Age received (it sends its own)."""
    return [(n, v) for n, v in fields if n.lower() != b"age"]


def is_unsafe(method: bytes) -> bool:
    """Whether a method is unsafe (RFC 9110 section 9.2.1): not GET, HEAD, OPTIONS, TRACE."""
    return method not in _SAFE_METHODS


def _origin(key: bytes) -> bytes:
    """The scheme and authority part of a cache key."""
    start = key.find(b"://") + 3
    end = key.find(b"/", start)
    return key if end < 0 else key[:end]


def _key_of_uri(uri: bytes) -> bytes | None:
    """The cache key of an absolute http(s) URI, or L{None} if it is not one."""
    m = _ABSOLUTE_URI.fullmatch(uri)
    if m is None:
        return None
    scheme, authority, path = m.groups()
    scheme = scheme.lower()
    default = _DEFAULT_PORTS.get(scheme)
    host_port = _V6_HOST_PORT.fullmatch(authority) or _HOST_PORT.fullmatch(authority)
    if default is None or host_port is None:
        return None
    host, port_text = host_port.groups()
    if authority.startswith(b"["):
        try:
            host = str(ipaddress.IPv6Address(host.decode("ascii"))).encode("ascii")
        except ValueError:
            return None
    port = default
    if port_text:
        port = int(port_text) if len(port_text) <= 5 else 0
        if not 0 < port < 65536:
            return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return cache_key(scheme, host, port, path)


def invalidation_keys(method: bytes, status: int, key: bytes, resp_fields: Fields) -> list[bytes]:
    """
    The cache keys an unsafe request's response invalidates (RFC 9111 section 4.4).

    @param key: The request's L{cache_key}.
    @return: For an unsafe method answered with 2xx or 3xx, C{key} and the keys of the
        Location and Content-Location URIs that share its origin (absolute, or references
        resolved against C{key}); C{[]} otherwise.
    """
    if not is_unsafe(method) or not 200 <= status < 400:
        return []
    keys = [key]
    origin = _origin(key)
    for lname in (b"location", b"content-location"):
        for line in field_lines(resp_fields, lname):
            ref = line.strip(b" \t").partition(b"#")[0]
            if not ref:
                continue
            if ref.startswith(b"/") and not ref.startswith(b"//"):
                candidate: bytes | None = origin + ref
            else:
                candidate = _key_of_uri(ref if b"://" in ref else urljoin(key, ref))
            if candidate is not None and _origin(candidate) == origin and candidate not in keys:
                keys.append(candidate)
    return keys
