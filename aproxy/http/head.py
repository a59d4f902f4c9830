"""
Sans-IO HTTP/1.1 message heads (RFC 9112): bytes in, parsed heads or a L{ProxyError} out.

Nothing here touches a socket, a reactor or a clock. L{HeadReader} collects bytes until a
complete head (safe when fed one byte at a time), L{parse_request_head} and
L{parse_response_head} validate it strictly, and the C{serialize_*} functions write the head
that the proxy forwards, with hop-by-hop fields removed and the framing re-emitted. Anything
ambiguous is rejected rather than repaired, so no peer can read a message differently from us.
"""

from __future__ import annotations

import re
from typing import Final, TypeVar

from aproxy.errors import (
    BadGateway,
    BadRequest,
    HeaderTooLarge,
    NotImplementedByProxy,
    ProxyError,
    URITooLong,
    VersionNotSupported,
)
from aproxy.http.grammar import TOKEN, TOKEN_RE
from aproxy.http.target import Target, parse_absolute_target, parse_authority

__all__ = [
    "BODY_CHUNKED",
    "BODY_CLOSE",
    "BODY_LENGTH",
    "BODY_NONE",
    "HeadReader",
    "RequestHead",
    "ResponseHead",
    "Target",
    "framing_fields",
    "parse_absolute_target",
    "parse_authority",
    "parse_request_head",
    "parse_response_head",
    "response_body_kind",
    "serialize_request_head",
    "serialize_response_head",
    "with_fields",
]

# How a message body is delimited (RFC 9112 section 6.3).
BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_CLOSE: Final = 3

_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# The space before an empty reason phrase is required by RFC 9112 section 4, but some
# origins leave it out; the status line is unambiguous either way, so it is accepted.
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HOST_FIELD = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")

# Hop-by-hop fields (RFC 9110 section 7.6.1) plus the framing fields, which the proxy always
# re-emits itself: forwarding them as received could let a Connection token remove the
# field that delimits the body.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
        b"content-length",
    }
)
_KNOWN_CODINGS: Final = frozenset(
    {b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"}
)
# The fields whose values and positions the parser notes while it checks the head: the
# framing and hop-by-hop fields and a few more the proxy acts on. They are found with one
# regular expression over the lowercased field block instead of a Python loop per line.
_NOTED_NAMES: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"max-forwards",
        b"via",
        b"x-forwarded-for",
    }
)
_NOTED_LINE = re.compile(rb"\n(" + b"|".join(sorted(_NOTED_NAMES)) + rb"):")
# field-line = field-name ":" OWS field-value OWS (RFC 9112 section 5). The block regex
# checks the shape of every line at once; the byte check below rejects NUL and the other
# control characters (RFC 9110 section 5.5) anywhere in it.
_FIELD_BLOCK = re.compile(rb"(?:" + TOKEN + rb":[^\r\n]*\r\n)*")
_FIELD_BYTES: Final = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])


class HeadReader:
    """
    Collects bytes until a complete message head (everything up to the empty line).

    Feed it whatever arrives; it answers L{None} ("need more") until the head is complete,
    then the head without its final empty line. Bytes after the head stay in L{rest} for the
    caller. It rejects bare-LF line endings as soon as it sees one and enforces the size
    limits while the head is still arriving, so a client can't hold memory by never
    finishing a line.

    @ivar rest: Bytes received after the head, handed back untouched.
    """

    __slots__ = ("_buf", "_is_request", "_max_line", "_max_size", "rest")

    def __init__(self, max_size: int, max_line: int, is_request: bool = True) -> None:
        self._max_size = max_size
        self._max_line = max_line
        self._is_request = is_request
        self._buf = bytearray()
        self.rest = b""

    @property
    def pending(self) -> bool:
        """Whether part of a head has been received but not yet completed."""
        return bool(self._buf)

    def feed(self, data: bytes) -> bytes | None:
        """
        Add received bytes.

        @return: The complete head (request or status line and field lines joined by CRLF,
            without the terminating empty line), or L{None} if more bytes are needed.
        @raise ProxyError: If the head is malformed or too large.
        """
        buf = self._buf
        if not buf:
            if self._is_request:
                # RFC 9112 section 2.2: ignore empty lines before a request line.
                while data[:2] == b"\r\n":
                    data = data[2:]
                if not data:
                    return None
            end = data.find(b"\r\n\r\n")
            if end >= 0 and end + 4 <= self._max_size:
                head = data[:end]
                if head.count(b"\n") != head.count(b"\r\n"):
                    raise self._error(BadRequest, "bare LF line ending in the head")
                self.rest = data[end + 4 :]
                self._check_first_line(head)
                return head
        start = len(buf)
        buf += data
        if self._is_request and buf[:2] == b"\r\n":
            while buf[:2] == b"\r\n":
                del buf[:2]
            start = 0
        end = buf.find(b"\r\n\r\n", max(start - 3, 0))
        # Only the head's own bytes are checked: what follows it is a body or the next
        # message, where an LF means nothing to us.
        stop = len(buf) if end < 0 else end + 4
        lf = buf.count(b"\n", start, stop)
        if lf and lf != buf.count(b"\r\n", max(start - 1, 0), stop):
            self._buf = bytearray()
            raise self._error(BadRequest, "bare LF line ending in the head")
        if end < 0:
            first = buf.find(b"\r\n")
            if first < 0:
                # The first line is still arriving; a final CR may be the start of its CRLF,
                # so it does not count, as it would not once the line is complete.
                first = len(buf) - buf.endswith(b"\r")
            if first > self._max_line:
                self._buf = bytearray()
                raise self._error(URITooLong, "request line too long")
            if len(buf) > self._max_size:
                self._buf = bytearray()
                raise self._error(HeaderTooLarge, "request head too large")
            return None
        if end + 4 > self._max_size:
            self._buf = bytearray()
            self._check_first_line(bytes(buf[:end]))
            raise self._error(HeaderTooLarge, "request head too large")
        head = bytes(buf[:end])
        self.rest = bytes(buf[end + 4 :])
        self._buf = bytearray()
        self._check_first_line(head)
        return head

    def _check_first_line(self, head: bytes) -> None:
        first = head.find(b"\r\n")
        length = len(head) if first < 0 else first
        if length > self._max_line:
            raise self._error(URITooLong, "request line too long")

    def _error(self, kind: type[ProxyError], reason: str) -> ProxyError:
        if self._is_request:
            return kind(reason)
        if kind is HeaderTooLarge or kind is URITooLong:
            # RFC 9209 section 2.3.13: the origin's head is over the proxy's limit.
            return BadGateway(
                "the origin's response head is larger than --max-head-size",
                "http_response_header_section_size",
            )
        return BadGateway("invalid response from origin: " + reason, "http_protocol_error")


class _Head:
    """What request and response heads share: fields and framing."""

    __slots__ = (
        "_fields",
        "block",
        "codings",
        "connection",
        "content_length",
        "minor",
        "noted",
        "spans",
    )

    minor: int
    block: bytes
    spans: list[tuple[bytes, int, int]]
    connection: frozenset[bytes]
    content_length: int | None
    codings: list[bytes] | None
    noted: dict[bytes, list[bytes]]
    _fields: list[tuple[bytes, bytes]] | None

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """The field lines in order as (name, value), names as received, values trimmed."""
        fields = self._fields
        if fields is None:
            fields = []
            for line in self.block.split(b"\r\n")[:-1]:
                name, _, value = line.partition(b":")
                fields.append((name, value.strip(b" \t")))
            self._fields = fields
        return fields

    @property
    def chunked(self) -> bool:
        """Whether the message body is chunked (its last transfer coding is C{chunked})."""
        return self.codings is not None and self.codings[-1:] == [b"chunked"]

    def values(self, lname: bytes) -> list[bytes]:
        """All values of one of the fields the parser notes (by lowercase name)."""
        return self.noted.get(lname, [])


class RequestHead(_Head):
    """
    A validated request head.

    @ivar method: The method, e.g. C{b"GET"}.
    @ivar target: The request-target exactly as received.
    @ivar minor: The HTTP minor version (the major version is always 1).
    @ivar block: The field lines exactly as received, each ending in CRLF.
    @ivar connection: The lowercased tokens of all C{Connection} fields.
    @ivar content_length: The body length, if delimited by C{Content-Length}.
    @ivar codings: The transfer codings in order, if C{Transfer-Encoding} is present.
    @ivar keep_alive: Whether the client wants the connection kept open afterwards.
    """

    __slots__ = ("keep_alive", "method", "target")

    method: bytes
    target: bytes
    keep_alive: bool


class ResponseHead(_Head):
    """
    A validated response head.

    @ivar status: The status code.
    @ivar reason: The reason phrase as received.
    @ivar keep_alive: Whether the origin lets the connection be reused afterwards.
    """

    __slots__ = ("keep_alive", "reason", "status")

    status: int
    reason: bytes
    keep_alive: bool


_H = TypeVar("_H", RequestHead, ResponseHead)


def _parse_fields(raw: bytes, head: _Head, err: type[ProxyError], what: str) -> bytes:
    """
    Check the field lines of C{raw} (a head without its final empty line), note the
    fields in L{_NOTED_NAMES}, and return the first line.
    """
    first_end = raw.find(b"\r\n")
    if first_end < 0:
        head.block = b""
        head.spans = []
        head.noted = {}
        head.connection = frozenset()
        head._fields = None
        return raw
    block = raw[first_end + 2 :] + b"\r\n"
    if _FIELD_BLOCK.fullmatch(block) is None:
        if b"\n " in block or b"\n\t" in block or block[:1] in (b" ", b"\t"):
            raise _err(err, what, "obsolete line folding")
        raise _err(err, what, "malformed field line")
    if block.translate(None, _FIELD_BYTES):
        raise _err(err, what, "malformed field line: control character")
    noted: dict[bytes, list[bytes]] = {}
    spans = []
    for m in _NOTED_LINE.finditer(b"\n" + block.lower()):
        lname = m.group(1)
        value_start = m.end() - 1
        end = block.index(b"\r\n", value_start)
        value = block[value_start:end].strip(b" \t")
        if lname in noted:
            noted[lname].append(value)
        else:
            noted[lname] = [value]
        spans.append((lname, m.start(), end + 2))
    head.block = block
    head.spans = spans
    head.noted = noted
    head._fields = None
    conn = noted.get(b"connection")
    head.connection = _tokens(conn, err, what) if conn else frozenset()
    return raw[:first_end]


def _err(err: type[ProxyError], what: str, reason: str) -> ProxyError:
    if err is BadGateway:
        return BadGateway(f"invalid {what} from origin: {reason}", "http_protocol_error")
    return err(reason)


# The Connection values nearly every message carries, already split: a head's connection
# tokens come from here without a split, a regular expression and a set per message.
_COMMON_TOKENS: Final = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def _tokens(values: list[bytes], err: type[ProxyError], what: str) -> frozenset[bytes]:
    if len(values) == 1:
        common = _COMMON_TOKENS.get(values[0])
        if common is not None:
            return common
    out = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item:
                continue
            if TOKEN_RE.fullmatch(item) is None:
                raise _err(err, what, "malformed Connection field")
            out.add(item.lower())
    return frozenset(out)


def _framing(head: _Head, err: type[ProxyError], what: str, lenient_cl: bool) -> None:
    noted = head.noted
    te = noted.get(b"transfer-encoding")
    cl = noted.get(b"content-length")
    head.codings = None
    head.content_length = None
    if te is not None:
        if cl is not None:
            raise _err(err, what, "both Content-Length and Transfer-Encoding")
        if head.minor == 0:
            # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            raise _err(err, what, "Transfer-Encoding in an HTTP/1.0 message")
        codings = []
        for value in te:
            for item in value.split(b","):
                item = item.strip(b" \t")
                if TOKEN_RE.fullmatch(item) is None:
                    raise _err(err, what, "malformed Transfer-Encoding")
                codings.append(item.lower())
        for coding in codings:
            if coding not in _KNOWN_CODINGS:
                if err is BadRequest:
                    raise NotImplementedByProxy(
                        "unsupported transfer coding " + coding.decode("ascii")
                    )
                raise _err(err, what, "unsupported transfer coding")
        if codings.count(b"chunked") > 1:
            raise _err(err, what, "chunked applied twice")
        if b"chunked" in codings[:-1]:
            # RFC 9112 section 6.1: chunked is the final coding when present. A body coded
            # after chunking could only be re-framed by chunking it twice, so it can't be
            # forwarded as received and is rejected instead.
            raise _err(err, what, "chunked is not the final transfer coding")
        if codings[-1] != b"chunked" and err is BadRequest:
            raise BadRequest("Transfer-Encoding does not end in chunked")
        head.codings = codings
    elif cl is not None:
        if len(cl) == 1 and len(cl[0]) <= 18 and cl[0].isdigit():
            # The usual single plain number (bytes.isdigit is ASCII digits only).
            head.content_length = int(cl[0])
            return
        items = [item.strip(b" \t") for value in cl for item in value.split(b",")]
        if len(items) > 1 and not (lenient_cl and len(set(items)) == 1):
            raise _err(err, what, "several Content-Length values")
        if _DIGITS.fullmatch(items[0]) is None:
            raise _err(err, what, "malformed Content-Length")
        head.content_length = int(items[0])


def parse_request_head(raw: bytes) -> RequestHead:
    """
    Parse and validate a request head as returned by L{HeadReader.feed}.

    @raise BadRequest: For anything malformed or ambiguous (RFC 9112 sections 3, 5, 6).
    @raise VersionNotSupported: For a major version other than 1.
    @raise NotImplementedByProxy: For an unknown transfer coding.
    """
    first_end = raw.find(b"\r\n")
    m = _REQUEST_LINE.fullmatch(raw if first_end < 0 else raw[:first_end])
    if m is None:
        raise BadRequest("malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1":
        raise VersionNotSupported("only HTTP/1.x is supported")
    head = RequestHead()
    head.method = method
    head.target = target
    head.minor = int(minor)
    _parse_fields(raw, head, BadRequest, "request")
    hosts = head.noted.get(b"host")
    if hosts is None:
        if head.minor:
            raise BadRequest("missing Host field")
    elif len(hosts) > 1:
        raise BadRequest("more than one Host field")
    elif _HOST_FIELD.fullmatch(hosts[0]) is None:
        raise BadRequest("malformed Host field")
    _framing(head, BadRequest, "request", lenient_cl=False)
    conn = head.connection
    if head.minor:
        head.keep_alive = b"close" not in conn
    else:
        pconn = head.noted.get(b"proxy-connection")
        head.keep_alive = b"keep-alive" in conn or (
            pconn is not None and b"keep-alive" in _tokens(pconn, BadRequest, "request")
        )
    return head


def parse_response_head(raw: bytes) -> ResponseHead:
    """
    Parse and validate a response head from an origin.

    @raise BadGateway: If the origin's head is not valid HTTP/1.x.
    """
    first_end = raw.find(b"\r\n")
    m = _STATUS_LINE.fullmatch(raw if first_end < 0 else raw[:first_end])
    if m is None:
        raise BadGateway("invalid response from origin: bad status line", "http_protocol_error")
    major, minor, status, reason = m.groups()
    code = int(status)
    if major != b"1" or not 100 <= code <= 599:
        raise BadGateway("invalid response from origin: bad status line", "http_protocol_error")
    head = ResponseHead()
    head.minor = int(minor)
    head.status = code
    head.reason = reason or b""
    _parse_fields(raw, head, BadGateway, "response")
    _framing(head, BadGateway, "response", lenient_cl=True)
    conn = head.connection
    head.keep_alive = (b"close" not in conn) if head.minor else (b"keep-alive" in conn)
    return head


def with_fields(head: _H, fields: list[tuple[bytes, bytes]]) -> _H:
    """
    C{head} with C{fields} in place of its field lines, parsed and checked anew (the
    start line and the framing fields stay as they were: an addon's edits).

    @raise ValueError: If the new fields would change how the body is delimited.
    @raise ProxyError: If they make a head the parser refuses.
    """
    block = b"\r\n".join(name + b": " + value for name, value in fields)
    new: _Head
    if isinstance(head, RequestHead):
        line = b"%s %s HTTP/1.%d" % (head.method, head.target, head.minor)
        new = parse_request_head(line + b"\r\n" + block if block else line)
    else:
        assert isinstance(head, ResponseHead)
        line = b"HTTP/1.%d %d %s" % (head.minor, head.status, head.reason)
        new = parse_response_head(line + b"\r\n" + block if block else line)
    if new.content_length != head.content_length or new.codings != head.codings:
        raise ValueError("the new fields change how the body is delimited")
    return new


def response_body_kind(head: ResponseHead, request_method: bytes) -> int:
    """
    How the response body is delimited (RFC 9112 section 6.3).

    @return: One of L{BODY_NONE}, L{BODY_LENGTH}, L{BODY_CHUNKED}, L{BODY_CLOSE}.
    """
    status = head.status
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return BODY_NONE
    if head.codings is not None:
        return BODY_CHUNKED if head.codings[-1] == b"chunked" else BODY_CLOSE
    if head.content_length is not None:
        return BODY_LENGTH
    return BODY_CLOSE


def _forwarded_block(head: _Head, drop: tuple[bytes, ...]) -> bytes:
    """
    The field block without hop-by-hop fields, the fields the Connection field names, the
    framing fields (the proxy writes its own) and C{drop}; other lines stay as received.
    """
    conn = head.connection
    if (conn and not conn <= _NOTED_NAMES | {b"close"}) or not _NOTED_NAMES.issuperset(drop):
        # Connection (or drop) names a field the parser did not note: filter line by line.
        gone = _HOP_BY_HOP | conn | frozenset(drop)
        return b"".join(
            line + b"\r\n"
            for line in head.block.split(b"\r\n")[:-1]
            if line.partition(b":")[0].lower() not in gone
        )
    block = head.block
    parts = []
    pos = 0
    for lname, start, end in head.spans:
        if lname in _HOP_BY_HOP or lname in conn or lname in drop:
            parts.append(block[pos:start])
            pos = end
    if not pos:
        return block
    parts.append(block[pos:])
    return b"".join(parts)


def framing_fields(kind: int, length: int | None, codings: list[bytes] | None) -> bytes:
    """The framing field line to emit for a body delimited by C{kind}."""
    if kind == BODY_LENGTH:
        return b"Content-Length: %d\r\n" % (length or 0)
    if kind == BODY_CHUNKED:
        inner = [c for c in codings or () if c != b"chunked"]
        return b"Transfer-Encoding: " + b", ".join([*inner, b"chunked"]) + b"\r\n"
    return b""


def serialize_request_head(
    head: RequestHead,
    target: Target,
    via: bytes | None,
    extra_fields: bytes = b"",
    drop: tuple[bytes, ...] = (),
    absolute: bool = False,
    chunked: bool = False,
    length: int | None = None,
) -> bytes:
    """
    Write the head forwarded to the origin: origin-form target, C{Host} from the target,
    hop-by-hop fields removed, the framing re-emitted and C{Via} appended.

    @param via: The C{Via} field value to append, or L{None} for none.
    @param extra_fields: Already-serialised field lines to add (e.g. C{Max-Forwards}).
    @param drop: Further lowercase field names to leave out (those C{extra_fields} replace).
    @param absolute: Write the target in absolute form, for a parent proxy.
    @param chunked: Send a body chunked whatever its framing was (a filter may change its
        length).
    @param length: Send the body with this C{Content-Length} whatever its framing was
        (a filter that gives its length up front).
    """
    path = target.path
    if absolute:
        # RFC 9112 section 3.2.2; an OPTIONS for the whole server ("*") is written
        # without a path (section 3.2.4).
        path = target.scheme + b"://" + target.authority + (b"" if path == b"*" else path)
    parts = [head.method + b" " + path + b" HTTP/1.1\r\nHost: " + target.authority + b"\r\n"]
    parts.append(_forwarded_block(head, (b"host", *drop)))
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    elif head.codings is not None:
        parts.append(framing_fields(BODY_CHUNKED, None, head.codings))
    elif chunked and head.content_length:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    if extra_fields:
        parts.append(extra_fields)
    if via is not None:
        parts.append(b"Via: 1.%d %s\r\n" % (head.minor, via))
    parts.append(b"\r\n")
    return b"".join(parts)


def serialize_response_head(
    head: ResponseHead,
    framing: bytes,
    via: bytes | None,
    connection: bytes | None,
) -> bytes:
    """
    Write the response head sent to the client: the proxy's own C{HTTP/1.1} status line,
    hop-by-hop fields removed, C{framing} (as from L{framing_fields}), C{Via} appended and
    an optional C{Connection} field of the proxy's own.
    """
    parts = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
    parts.append(_forwarded_block(head, ()))
    if framing:
        parts.append(framing)
    if via is not None:
        parts.append(b"Via: 1.%d %s\r\n" % (head.minor, via))
    if connection is not None:
        parts.append(b"Connection: " + connection + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
