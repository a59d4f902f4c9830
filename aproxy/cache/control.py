"""
Field syntax for the cache: reading list-valued fields, Cache-Control directives,
delta-seconds, HTTP-dates and entity tags (RFC 9110 sections 5.6, 8.8.3; RFC 9111
sections 1.2.2, 5.2), and writing HTTP-dates and the Cache-Status field (RFC 9211). Pure
functions over field lines; L{aproxy.cache.rules} re-exports the public ones, so callers
import them from there.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Sequence
from typing import Final

from aproxy.http.grammar import QUOTED_STRING, TOKEN

__all__ = [
    "MAX_DELTA",
    "Fields",
    "cache_status",
    "delta_seconds",
    "field_lines",
    "field_values",
    "first_date",
    "http_date",
    "parse_cache_control",
    "parse_entity_tag",
    "parse_http_date",
]

#: Header field lines: (name as received, in any case; value without surrounding spaces).
Fields = Sequence[tuple[bytes, bytes]]

#: The largest delta-seconds a cache passes on (RFC 9111 section 1.2.2: 2147483648).
MAX_DELTA: Final = 2**31

_TOKEN_RE: Final = re.compile(TOKEN)
_QUOTED_RE: Final = re.compile(QUOTED_STRING)
_SF_TOKEN: Final = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_QUOTED_PAIR: Final = re.compile(rb"\\(.)", re.DOTALL)
# entity-tag = [ weakness ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE (RFC 9110 8.8.3).
_ENTITY_TAG: Final = re.compile(rb'(W/)?("[\x21\x23-\x7e\x80-\xff]*")')

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
_MONTH_NUMBER: Final = {name.lower(): i + 1 for i, name in enumerate(_MONTHS)}
_TIME: Final = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_DAY_NAME: Final = "(?:" + "|".join(_DAYS) + ")"
_LONG_DAY_NAME: Final = "(?:" + "|".join(_LONG_DAYS) + ")"
_MONTH: Final = "(" + "|".join(_MONTHS) + ")"
# RFC 9110 section 5.6.7. The grammar is case-sensitive; names are matched without case
# since recipients "are encouraged to be robust in parsing timestamps".
_IMF_FIXDATE: Final = re.compile(
    _DAY_NAME + r", ([0-9]{2}) " + _MONTH + r" ([0-9]{4}) " + _TIME + " GMT", re.IGNORECASE
)
_RFC850: Final = re.compile(
    _LONG_DAY_NAME + r", ([0-9]{2})-" + _MONTH + r"-([0-9]{2}) " + _TIME + " GMT", re.IGNORECASE
)
_ASCTIME: Final = re.compile(
    _DAY_NAME + " " + _MONTH + r" ([0-9]{2}| [0-9]) " + _TIME + r" ([0-9]{4})", re.IGNORECASE
)


def field_lines(fields: Fields, lname: bytes) -> list[bytes]:
    """
    The values of every field line named C{lname}, unsplit: for fields whose value may hold
    commas that do not separate members (dates, URI references, entity tags).

    @param lname: The field name in lowercase; names are compared without case.
    """
    return [value for name, value in fields if name.lower() == lname]


def field_values(fields: Fields, lname: bytes) -> list[bytes]:
    """
    The members of a list-valued field (RFC 9110 section 5.6.1) over all its lines.

    Each line is split on commas outside quoted strings, each member is stripped of spaces
    and tabs, and empty members are dropped (recipients must accept them).

    @param lname: The field name in lowercase; names are compared without case.
    """
    members: list[bytes] = []
    for value in field_lines(fields, lname):
        start = 0
        quoted = escaped = False
        for i, byte in enumerate(value):
            if escaped:
                escaped = False
            elif quoted and byte == 0x5C:  # backslash: a quoted-pair
                escaped = True
            elif byte == 0x22:  # DQUOTE
                quoted = not quoted
            elif byte == 0x2C and not quoted:
                members.append(value[start:i])
                start = i + 1
        members.append(value[start:])
    return [m for m in (m.strip(b" \t") for m in members) if m]


def _unquote(value: bytes) -> bytes:
    """The content of a quoted-string (RFC 9110 section 5.6.4), quoted-pairs undone."""
    return _QUOTED_PAIR.sub(rb"\1", value[1:-1])


def parse_cache_control(fields: Fields) -> dict[str, str | None]:
    """
    The directives of all Cache-Control field lines (RFC 9111 section 5.2).

    Names are lowercased. A value is the token or the unquoted quoted-string after C{=}
    (both forms are accepted for every directive, section 5.2); a directive without C{=}
    has L{None}. When a directive occurs more than once, the first occurrence is used
    (section 4.2.1 allows this or treating the response as stale). An element whose name
    is not a token is skipped; one whose value is neither a token nor a quoted-string keeps
    its raw text, so that a malformed C{max-age} reads as invalid (hence stale) rather than
    absent.

    @return: Directive name to value, in the order first seen.
    """
    directives: dict[str, str | None] = {}
    for element in field_values(fields, b"cache-control"):
        raw_name, eq, raw_value = element.partition(b"=")
        name = raw_name.strip(b" \t")
        if _TOKEN_RE.fullmatch(name) is None:
            continue
        key = name.decode("ascii").lower()
        if key in directives:
            continue
        if not eq:
            directives[key] = None
            continue
        value = raw_value.strip(b" \t")
        if _QUOTED_RE.fullmatch(value) is not None:
            value = _unquote(value)
        directives[key] = value.decode("latin-1")
    return directives


def delta_seconds(value: str | None) -> int | None:
    """
    Read a delta-seconds value (RFC 9111 section 1.2.2): ASCII digits only.

    @param value: The directive's value, already unquoted.
    @return: The number of seconds, at most L{MAX_DELTA}; L{None} when the value is missing
        or not a non-negative integer (a sign, a fraction, spaces, other digits).
    """
    if not value or not value.isascii() or not value.isdigit():
        return None
    # Long digit strings are capped before int() (which refuses past 4300 digits).
    if len(value) > 10:
        return MAX_DELTA
    return min(int(value), MAX_DELTA)


def _two_digit_year(yy: int, now: float | None) -> int:
    """
    The full year of an rfc850-date's two-digit year.

    With C{now}, RFC 9110 section 5.6.7: a year that appears to be more than 50 years in
    the future is the most recent past year with the same last two digits (the year is
    taken from the same century as C{now}, or the next one if that lies 50 years back or
    more). Without it, the POSIX strptime pivot: 69-99 are 19xx, 00-68 are 20xx.
    """
    if now is None:
        return 1900 + yy if yy >= 69 else 2000 + yy
    current = time.gmtime(now).tm_year
    year = current - current % 100 + yy
    if year <= current - 50:
        year += 100
    if year > current + 50:
        year -= 100
    return year


def _days_in_month(year: int, month: int) -> int:
    """How many days C{month} of C{year} has (Gregorian calendar)."""
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def parse_http_date(value: bytes, now: float | None = None) -> float | None:
    """
    Read an HTTP-date (RFC 9110 section 5.6.7): IMF-fixdate, or the obsolete rfc850-date
    and asctime-date formats.

    @param value: The field value.
    @param now: The time of reading, for the 50-year rule on an rfc850-date's two-digit
        year; without it, see L{_two_digit_year}.
    @return: POSIX seconds, or L{None} for anything else (including numbers like C{0}
        or C{-1}, which some servers send in Expires to mean "already expired").
    """
    try:
        text = value.strip(b" \t").decode("ascii")
    except UnicodeDecodeError:
        return None
    if m := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
        full_year = int(year)
    elif m := _RFC850.fullmatch(text):
        day, month, year, hh, mm, ss = m.groups()
        full_year = _two_digit_year(int(year), now)
    elif m := _ASCTIME.fullmatch(text):
        month, day, hh, mm, ss, year = m.groups()
        full_year = int(year)
    else:
        return None
    month_number = _MONTH_NUMBER[month.lower()]
    day_number = int(day)
    # second = 2DIGIT, 60 allowed for a leap second (timegm rolls it over).
    if not 1 <= day_number <= _days_in_month(full_year, month_number):
        return None
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return None
    fields = (full_year, month_number, day_number, int(hh), int(mm), int(ss), 0, 0, 0)
    return float(calendar.timegm(fields))


def http_date(when: float) -> bytes:
    """
    Write C{when} (POSIX seconds, the fraction dropped) as an IMF-fixdate, the preferred
    HTTP-date format (RFC 9110 section 5.6.7), without any locale.
    """
    t = time.gmtime(int(when // 1))
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode("ascii")


def parse_entity_tag(value: bytes) -> tuple[bool, bytes] | None:
    """
    Read one entity-tag (RFC 9110 section 8.8.3).

    @return: (weak, opaque-tag with its quotes), or L{None} if C{value} is not one.
    """
    m = _ENTITY_TAG.fullmatch(value.strip(b" \t"))
    if m is None:
        return None
    return m.group(1) is not None, m.group(2)


def _sf_item(value: str) -> str:
    """A structured-field token if C{value} is one, else an sf-string (RFC 8941)."""
    if _SF_TOKEN.fullmatch(value):
        return value
    printable = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    ttl: float | None = None,
    collapsed: bool = False,
    detail: str | None = None,
    name: bytes = b"aproxy",
) -> bytes:
    """
    A Cache-Status field value (RFC 9211 section 2) for this cache.

    @param hit: Answered from the cache without going forward (section 2.1).
    @param fwd: Why the request went forward: C{"bypass"}, C{"method"}, C{"uri-miss"},
        C{"vary-miss"}, C{"miss"}, C{"request"}, C{"stale"} or C{"partial"} (section 2.2).
    @param fwd_status: The status the forward request got (section 2.3).
    @param stored: The forwarded response was stored (section 2.5).
    @param ttl: Remaining freshness in seconds, floored; negative when stale (section 2.4).
    @param collapsed: The request was collapsed into another's forward (section 2.6).
    @param detail: Implementation-specific detail, e.g. why it was not stored (section
        2.8): written as a token when it is one, else as a string.
    @param name: The cache's name, the list member's item.
    @return: E.g. C{b"aproxy; fwd=stale; fwd-status=304; ttl=60"}.
    """
    parts = [_sf_item(name.decode("latin-1"))]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append("fwd=" + _sf_item(fwd))
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status:d}")
    if stored:
        parts.append("stored")
    if ttl is not None:
        parts.append(f"ttl={math.floor(ttl):d}")
    if collapsed:
        parts.append("collapsed")
    if detail is not None:
        parts.append("detail=" + _sf_item(detail))
    return "; ".join(parts).encode("ascii")


def first_date(fields: Fields, lname: bytes, now: float | None) -> float | None:
    """The first line of a date field, parsed; L{None} if absent or not an HTTP-date."""
    lines = field_lines(fields, lname)
    return parse_http_date(lines[0], now) if lines else None
