"""
Request-smuggling tests: ambiguous framing never reaches an origin.

A table of classic smuggling vectors (CL.TE, TE.CL, TE.TE mutations, lenient lengths,
chunk-size tricks, field-name, request-line and Host tricks) is fed to a real
L{ProxyProtocol}, whole and one byte at a time. Each vector is either rejected with its
status and a close, the origin seeing at most a head the proxy framed itself and a body
prefix it never completes, or forwarded with the proxy's own framing and nothing after it.
Property tests check that a forwarded head re-parses to the same request and that the
chunked decoder does not depend on how its input is cut.

Where RFC 9112 leaves the answer open, the vector's note says which reading is tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aproxy.errors import BadGateway, BadRequest, ProxyError
from aproxy.http.body import ChunkedDecoder, LengthDecoder, chunk
from aproxy.http.head import (
    HeadReader,
    RequestHead,
    parse_absolute_target,
    parse_request_head,
    serialize_request_head,
)
from tests.support import OK_5, ProxyTestCase

MAX_SIZE = 65536
MAX_LINE = 16384
_SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=200)

# The request a smuggler hopes the origin reads as a second, separate request.
SMUGGLED = b"GET http://evil.example/smuggled HTTP/1.1\r\nHost: evil.example\r\n\r\n"
VIA = b"Via: 1.1 aproxy\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


def req(
    *lines: bytes,
    body: bytes = b"",
    method: bytes = b"POST",
    target: bytes = b"http://a.example/",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = b"a.example",
) -> bytes:
    """A request to C{target} with a Host field (unless L{None}), C{lines} and C{body}."""
    head = [method + b" " + target + b" " + version]
    if host is not None:
        head.append(b"Host: " + host)
    return b"\r\n".join([*head, *lines]) + b"\r\n\r\n" + body


def fwd(*lines: bytes, method: bytes = b"POST", path: bytes = b"/", via: bytes = VIA) -> bytes:
    """The head the origin should get: origin form, Host from the target, C{lines}, Via."""
    out = method + b" " + path + b" HTTP/1.1\r\nHost: a.example\r\n"
    return out + b"".join(line + b"\r\n" for line in lines) + via + b"\r\n"


CL5 = b"Content-Length: 5"
TE_CHUNKED = b"Transfer-Encoding: chunked"


@dataclass(frozen=True)
class Vector:
    """
    One smuggling attempt and what must come of it.

    @ivar name: Identifier, used in the generated test method names.
    @ivar behaviour: One sentence stating the expected behaviour (the test's docstring).
    @ivar data: Everything the client sends, usually ending with L{SMUGGLED}.
    @ivar status: The status the client gets, or L{None} when the request is forwarded.
    @ivar head: The exact head the origin gets (for a forwarded request, or for one whose
        body is found bad only after its head went out); L{None} when nothing is dialled.
    @ivar body: The decoded body the origin gets, for a forwarded request.
    """

    name: str
    behaviour: str
    data: bytes
    status: int | None
    head: bytes | None = None
    body: bytes = b""


def rejected(name: str, behaviour: str, data: bytes, status: int = 400) -> Vector:
    """A vector whose head is rejected before anything is dialled."""
    return Vector(name, behaviour, data, status)


def bad_chunks(name: str, behaviour: str, chunks: bytes) -> Vector:
    """A chunked POST whose head is forwarded and whose body C{chunks} is then rejected."""
    return Vector(name, behaviour, req(TE_CHUNKED, body=chunks + SMUGGLED), 400, fwd(TE_CHUNKED))


VECTORS: list[Vector] = [
    # -- Content-Length and Transfer-Encoding together ------------------------------------
    rejected(
        "cl_te",
        "Content-Length followed by Transfer-Encoding is 400 (RFC 9112 section 6.3 allows it).",
        req(b"Content-Length: 6", TE_CHUNKED, body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_cl",
        "Transfer-Encoding followed by Content-Length is 400.",
        req(
            TE_CHUNKED,
            b"Content-Length: 4",
            body=b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
        ),
    ),
    rejected(
        "cl_te_unknown_coding",
        "Content-Length with an unknown transfer coding is 400 (both fields), not 501.",
        req(CL5, b"Transfer-Encoding: xchunked", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "te_in_http10",
        "Transfer-Encoding in an HTTP/1.0 request is 400: faulty framing (RFC 9112 6.1).",
        req(TE_CHUNKED, version=b"HTTP/1.0", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_cl_in_http10",
        "Transfer-Encoding and Content-Length in an HTTP/1.0 request is 400.",
        req(TE_CHUNKED, CL5, version=b"HTTP/1.0", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    # -- Transfer-Encoding mutations ------------------------------------------------------
    rejected(
        "te_xchunked",
        "An unknown transfer coding (xchunked) is 501 (RFC 9112 section 6.1).",
        req(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
        501,
    ),
    rejected(
        "te_chunked_identity",
        "chunked, identity is 501: identity is no longer a registered transfer coding.",
        req(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED),
        501,
    ),
    rejected(
        "te_identity_chunked",
        "identity, chunked is 501 too, although chunked is last.",
        req(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n" + SMUGGLED),
        501,
    ),
    rejected(
        "te_gzip_only",
        "A request coding that does not end in chunked is 400 (RFC 9112 section 6.3).",
        req(b"Transfer-Encoding: gzip", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_chunked_then_unknown_field",
        "A second Transfer-Encoding field with an unknown coding is 501.",
        req(TE_CHUNKED, b"Transfer-Encoding: x", body=b"0\r\n\r\n" + SMUGGLED),
        501,
    ),
    rejected(
        "te_chunked_twice_fields",
        "chunked in two Transfer-Encoding fields is 400 (chunked applied twice).",
        req(TE_CHUNKED, TE_CHUNKED, body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_space_before_colon",
        "Whitespace between Transfer-Encoding and its colon is 400 (RFC 9112 section 5.1).",
        req(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_tab_before_colon",
        "A tab between Transfer-Encoding and its colon is 400.",
        req(b"Transfer-Encoding\t: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_vertical_tab",
        "A vertical tab instead of OWS before chunked is 400 (a control character).",
        req(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_form_feed",
        "A form feed after chunked is 400 (a control character).",
        req(b"Transfer-Encoding: chunked\x0c", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_nul",
        "A NUL after chunked is 400.",
        req(b"Transfer-Encoding: chunked\x00", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_quoted",
        'A quoted "chunked" is 400: a transfer coding is a token, not a quoted-string.',
        req(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_obs_fold",
        "chunked on an obs-fold continuation line is 400 (RFC 9112 section 5.2).",
        req(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_obs_fold_tab",
        "A Transfer-Encoding list folded with a tab is 400.",
        req(b"Transfer-Encoding: gzip,", b"\tchunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_indented_line",
        "A Transfer-Encoding line indented by a space is a fold of the line before: 400.",
        req(b"X-A: b", b" Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_trailing_comma",
        "chunked, (an empty list element) is 400, as test_http1 pins for ', chunked'; "
        "RFC 9110 section 5.6.1 would ignore the empty element (a strict, safe deviation).",
        req(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_empty",
        "An empty Transfer-Encoding is 400: chunked is not the final coding.",
        req(b"Transfer-Encoding:", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_after_bare_lf",
        "A Transfer-Encoding line after a bare LF is 400, not read as a field line.",
        req(b"X-A: b\nTransfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "te_after_bare_cr",
        "A Transfer-Encoding line after a bare CR is 400, not read as a field line.",
        req(b"X-A: b\rTransfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    Vector(
        "te_leading_tab",
        "A tab before chunked is OWS: the body is forwarded chunked by the proxy's framing.",
        req(b"Transfer-Encoding:\tchunked", body=HELLO_CHUNKED),
        None,
        fwd(TE_CHUNKED),
        b"hello",
    ),
    Vector(
        "te_uppercase",
        "CHUNKED is chunked (codings are case-insensitive) and re-emitted in lowercase.",
        req(b"Transfer-Encoding: CHUNKED", body=HELLO_CHUNKED),
        None,
        fwd(TE_CHUNKED),
        b"hello",
    ),
    Vector(
        "te_underscore_name",
        "Transfer_Encoding is an unknown field (_ is a tchar), forwarded under CL framing.",
        req(b"Transfer_Encoding: chunked", CL5, body=b"hello"),
        None,
        fwd(b"Transfer_Encoding: chunked", CL5),
        b"hello",
    ),
    Vector(
        "te_named_by_connection",
        "Connection: Transfer-Encoding cannot strip the framing: the proxy re-emits it.",
        req(b"Connection: Transfer-Encoding", TE_CHUNKED, body=HELLO_CHUNKED),
        None,
        fwd(TE_CHUNKED),
        b"hello",
    ),
    # -- Content-Length -------------------------------------------------------------------
    rejected(
        "cl_plus_sign",
        "Content-Length: +5 is 400 (1*DIGIT only).",
        req(b"Content-Length: +5", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_hex",
        "Content-Length: 0x5 is 400.",
        req(b"Content-Length: 0x5", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_negative",
        "Content-Length: -1 is 400.",
        req(b"Content-Length: -1", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_decimal",
        "Content-Length: 5.0 is 400.",
        req(b"Content-Length: 5.0", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_inner_space",
        "Content-Length: 5 5 is 400.",
        req(b"Content-Length: 5 5", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_same_list",
        "Content-Length: 5 ,5 is 400: RFC 9110 section 8.6 lets a recipient reject it.",
        req(b"Content-Length: 5 ,5", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_trailing_comma",
        "Content-Length: 5, is 400.",
        req(b"Content-Length: 5,", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_nul",
        "A NUL after the length is 400.",
        req(b"Content-Length: 5\x00", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_empty",
        "An empty Content-Length is 400.",
        req(b"Content-Length:", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_twenty_digits",
        "A 20-digit Content-Length is 400 rather than a wrapped or truncated number.",
        req(b"Content-Length: 18446744073709551621", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_two_fields_same",
        "Two identical Content-Length fields are 400 (RFC 9110 section 8.6 allows rejecting).",
        req(CL5, CL5, body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_two_fields_differ",
        "Two different Content-Length fields are 400.",
        req(CL5, b"Content-Length: 0", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "cl_space_before_colon",
        "Whitespace between Content-Length and its colon is 400.",
        req(b"Content-Length : 5", body=b"hello" + SMUGGLED),
    ),
    Vector(
        "cl_leading_ows",
        "OWS around the length is legal: Content-Length:  5 is forwarded as 5.",
        req(b"Content-Length: \t 5 ", body=b"hello"),
        None,
        fwd(CL5),
        b"hello",
    ),
    Vector(
        "cl_leading_zero",
        "Content-Length: 05 is legal (1*DIGIT) and forwarded as Content-Length: 5.",
        req(b"Content-Length: 05", body=b"hello"),
        None,
        fwd(CL5),
        b"hello",
    ),
    Vector(
        "cl_get_with_pipelined_body",
        "A GET body holding a request line is body: it is forwarded, never parsed as a request.",
        req(b"Content-Length: %d" % len(SMUGGLED), method=b"GET", body=SMUGGLED),
        None,
        fwd(b"Content-Length: %d" % len(SMUGGLED), method=b"GET"),
        SMUGGLED,
    ),
    Vector(
        "cl_named_by_connection",
        "Connection: Content-Length cannot strip the framing: the proxy re-emits it.",
        req(b"Connection: Content-Length", CL5, body=b"hello"),
        None,
        fwd(CL5),
        b"hello",
    ),
    # -- chunk sizes, extensions and trailers ---------------------------------------------
    bad_chunks("chunk_hex_prefix", "A chunk size 0x5 is 400.", b"0x5\r\nhello\r\n0\r\n\r\n"),
    bad_chunks("chunk_negative", "A chunk size -5 is 400.", b"-5\r\nhello\r\n0\r\n\r\n"),
    bad_chunks("chunk_plus", "A chunk size +5 is 400.", b"+5\r\nhello\r\n0\r\n\r\n"),
    bad_chunks(
        "chunk_trailing_space",
        "A space after the size without an extension is 400.",
        b"5 \r\nhello\r\n0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_overflow",
        "A 17-digit chunk size is 400 rather than an overflowed number.",
        b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_ext_unterminated_quote",
        'An extension value with an unterminated quote (5;ext="x) is 400.',
        b'5;ext="unterminated\r\nhello\r\n0\r\n\r\n',
    ),
    bad_chunks(
        "chunk_size_bare_lf",
        "A chunk-size line ended by a bare LF is 400.",
        b"5\nhello\r\n0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_last_bare_lf",
        "A last-chunk line ended by a bare LF is 400.",
        b"5\r\nhello\r\n0\n\r\n",
    ),
    bad_chunks(
        "chunk_missing_crlf",
        "Chunk data not followed by CRLF is 400.",
        b"5\r\nhello0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_data_too_long",
        "Chunk data longer than its size is 400.",
        b"5\r\nhelloXX\r\n0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_data_bare_lf",
        "Chunk data followed by a bare LF is 400.",
        b"5\r\nhello\n0\r\n\r\n",
    ),
    bad_chunks(
        "chunk_trailer_obs_fold",
        "A folded trailer field is 400.",
        b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    ),
    bad_chunks(
        "chunk_trailer_space_before_colon",
        "A trailer with whitespace before its colon is 400.",
        b"5\r\nhello\r\n0\r\nX-T : a\r\n\r\n",
    ),
    Vector(
        "chunk_ext_bws",
        "BWS before a chunk extension (5 ;ext) is legal: the body is forwarded.",
        req(TE_CHUNKED, body=b"5 ;ext\r\nhello\r\n0\r\n\r\n"),
        None,
        fwd(TE_CHUNKED),
        b"hello",
    ),
    Vector(
        "chunk_leading_zeros",
        "Leading zeros in chunk sizes (0005, 000) are legal and the body is forwarded.",
        req(TE_CHUNKED, body=b"0005\r\nhello\r\n000\r\n\r\n"),
        None,
        fwd(TE_CHUNKED),
        b"hello",
    ),
    # -- field names ----------------------------------------------------------------------
    rejected(
        "name_space_before_colon",
        "Whitespace between a field name and its colon is 400.",
        req(b"X-A : b", CL5, body=b"hello" + SMUGGLED),
    ),
    rejected(
        "name_nul",
        "A NUL in a field name is 400.",
        req(b"Content\x00Length: 5", body=b"hello" + SMUGGLED),
    ),
    rejected(
        "name_non_ascii",
        "A non-ASCII octet in a field name is 400.",
        req(b"Transfer-Encod\xc4\xb1ng: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    rejected(
        "name_empty",
        "A field line with an empty name (: x) is 400.",
        req(b": x", CL5, body=b"hello" + SMUGGLED),
    ),
    rejected(
        "name_no_colon",
        "A field line without a colon is 400, not glued to the next line.",
        req(b"X-A", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    ),
    # -- request lines --------------------------------------------------------------------
    rejected(
        "line_double_space",
        "Two spaces after the method are 400.",
        b"GET  http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_tabs",
        "Tabs as request-line separators are 400.",
        b"GET\thttp://a.example/\tHTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_trailing_space",
        "A space after HTTP/1.1 is 400.",
        b"GET http://a.example/ HTTP/1.1 \r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_leading_cr",
        "A bare CR before the method is 400, not an empty line.",
        b"\rGET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_leading_lf",
        "A bare LF before the method is 400, not an empty line.",
        b"\nGET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_target_whitespace",
        "Whitespace inside an absolute target is 400.",
        b"GET http://a.example/a b HTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_target_fragment",
        "A fragment in the target is 400 (request-target has no fragment, RFC 9112 3.2).",
        b"GET http://a.example/x#frag HTTP/1.1\r\nHost: a.example\r\n\r\n" + SMUGGLED,
    ),
    rejected(
        "line_http2",
        "HTTP/2.0 in a request line is 505.",
        req(method=b"GET", version=b"HTTP/2.0", body=SMUGGLED),
        505,
    ),
    Vector(
        "line_leading_empty_lines",
        "Empty lines before the request line are ignored (RFC 9112 section 2.2).",
        b"\r\n\r\n" + req(CL5, body=b"hello"),
        None,
        fwd(CL5),
        b"hello",
    ),
    # -- Host -----------------------------------------------------------------------------
    rejected(
        "host_twice",
        "Two Host fields are 400 (RFC 9112 section 3.2).",
        req(b"Host: evil.example", method=b"GET", body=SMUGGLED),
    ),
    rejected(
        "host_with_space",
        "A Host value with inner whitespace is 400.",
        req(method=b"GET", host=b"a.example evil.example", body=SMUGGLED),
    ),
    rejected(
        "host_list",
        "A Host value holding a list is 400.",
        req(method=b"GET", host=b"a.example, evil.example", body=SMUGGLED),
    ),
    rejected(
        "host_missing",
        "An HTTP/1.1 request without Host is 400.",
        req(method=b"GET", host=None, body=SMUGGLED),
    ),
    Vector(
        "host_mismatch",
        "A Host that differs from the target is replaced by the target's authority.",
        req(CL5, host=b"evil.example", body=b"hello"),
        None,
        fwd(CL5),
        b"hello",
    ),
]


@dataclass
class OriginView:
    """What one origin connection received, read as an HTTP/1.1 request would be."""

    head: bytes
    body: bytes
    complete: bool
    after: bytes


def origin_view(test: SynchronousTestCase, data: bytes) -> OriginView:
    """
    Read C{data} (all an origin connection received) as one request: its head, the body
    its own framing delimits, whether that body is complete and any bytes after it.
    """
    reader = HeadReader(MAX_SIZE, MAX_LINE)
    raw = reader.feed(data)
    test.assertIsNotNone(raw, f"the origin got no complete head: {data!r}")
    assert raw is not None
    head = parse_request_head(raw)
    rest = reader.rest
    decoder: ChunkedDecoder | LengthDecoder
    if head.chunked:
        decoder = ChunkedDecoder()
    else:
        decoder = LengthDecoder(head.content_length or 0)
    pieces, after = decoder.feed(rest)
    return OriginView(raw + b"\r\n\r\n", b"".join(pieces), decoder.done, after)


class _VectorTests(ProxyTestCase):
    """Runs one L{Vector} through a L{ProxyProtocol}."""

    def drive(self, pieces: list[bytes]) -> None:
        """Feed C{pieces} to the proxy, completing each dial as soon as it is made."""
        done = 0
        for piece in pieces:
            self.proto.dataReceived(piece)
            while done < len(self.connector.attempts):
                attempt = self.connector.attempts[done]
                if not attempt.deferred.called:
                    attempt.succeed()
                done += 1

    def check(self, vector: Vector, bytewise: bool) -> None:
        """Send C{vector} whole or byte by byte and check what the client and origin get."""
        data = vector.data
        self.drive([data[i : i + 1] for i in range(len(data))] if bytewise else [data])
        attempts = self.connector.attempts
        for attempt in attempts:
            self.assertEqual((attempt.host, attempt.port), ("a.example", 80))
        if vector.head is None:
            self.assertEqual(attempts, [], "a rejected head must not cause a dial")
        else:
            self.assertEqual(len(attempts), 1)
            upstream = attempts[0].transport
            assert upstream is not None
            view = origin_view(self, upstream.value())
            self.assertEqual(view.head, vector.head)
            self.assertEqual(view.after, b"", "bytes after the framed request reached the origin")
        if vector.status is not None:
            self.check_rejected(vector)
        else:
            self.check_forwarded(vector)

    def check_rejected(self, vector: Vector) -> None:
        """The client got C{vector.status} and a close; no origin got a complete request."""
        assert vector.status is not None
        value = self.client.value()
        self.assertTrue(
            value.startswith(b"HTTP/1.1 %d " % vector.status), f"client got {value[:40]!r}"
        )
        self.assertIn(b"\r\nConnection: close\r\n", value)
        self.assertTrue(self.client.disconnecting)
        for attempt in self.connector.attempts:
            upstream = attempt.transport
            assert upstream is not None
            self.assertTrue(upstream.disconnecting)
            self.assertNotIn(b"smuggled", upstream.value())
            self.assertFalse(origin_view(self, upstream.value()).complete)

    def check_forwarded(self, vector: Vector) -> None:
        """The origin got the proxy's head and the body; the response is relayed alone."""
        self.assertEqual(self.client.value(), b"")
        self.assertFalse(self.client.disconnecting)
        attempt = self.connector.attempts[0]
        upstream = attempt.transport
        assert upstream is not None
        view = origin_view(self, upstream.value())
        self.assertEqual(view.body, vector.body)
        self.assertTrue(view.complete)
        self.assertFalse(upstream.disconnecting)
        attempt.respond(OK_5)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(value.endswith(b"\r\n\r\nhello"))
        self.assertEqual(value.count(b"HTTP/1.1 "), 1)
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(len(self.connector.attempts), 1)


def _vector_test(vector: Vector, bytewise: bool) -> Callable[[_VectorTests], None]:
    def test(self: _VectorTests) -> None:
        self.check(vector, bytewise)

    how = "fed one byte at a time" if bytewise else "fed whole"
    test.__name__ = f"test_{vector.name}_{'bytewise' if bytewise else 'whole'}"
    test.__doc__ = f"{vector.behaviour[:-1]} ({how})."
    return test


class SmugglingVectorTests(_VectorTests):
    """Each smuggling vector, whole and byte by byte: rejected or framed by the proxy."""


for _vector in VECTORS:
    for _bytewise in (False, True):
        _test = _vector_test(_vector, _bytewise)
        assert not hasattr(SmugglingVectorTests, _test.__name__), _test.__name__
        setattr(SmugglingVectorTests, _test.__name__, _test)
del _vector, _bytewise, _test


class VectorTableTests(SynchronousTestCase):
    """The vector table itself is well formed."""

    def test_names_unique(self) -> None:
        """Every vector has its own name, so each gets its own pair of test methods."""
        names = [v.name for v in VECTORS]
        self.assertEqual(len(names), len(set(names)))

    def test_rejected_vectors_carry_smuggled_request(self) -> None:
        """Every rejected vector carries the request a smuggler wants the origin to see."""
        for vector in VECTORS:
            if vector.status is not None:
                self.assertIn(SMUGGLED, vector.data, vector.name)


# -- round trip of forwarded heads ---------------------------------------------------------

_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HOP_BY_HOP = frozenset(
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
# Names the generated end-to-end fields avoid: the ones the parser or the proxy acts on.
_SPECIAL = _HOP_BY_HOP | {b"host", b"via", b"max-forwards", b"x-forwarded-for"}

_names = (
    st.text(alphabet=_TCHARS, min_size=1, max_size=12)
    .map(str.encode)
    .filter(lambda n: n.lower() not in _SPECIAL)
)
_words = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8
).map(str.encode)
_values = st.lists(st.tuples(_words, st.sampled_from([b" ", b"\t", b" \t "])), max_size=3).map(
    lambda parts: b"".join(w + s for w, s in parts).rstrip(b" \t")
)
# Fields the proxy must drop (hop-by-hop) or keep (end-to-end fields it also notes).
_hop_fields = st.sampled_from(
    [
        (b"Connection", b"keep-alive"),
        (b"connection", b"close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic eDp5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"websocket"),
    ]
)
_kept_fields = st.sampled_from(
    [(b"Via", b"1.0 other"), (b"Max-Forwards", b"3"), (b"X-Forwarded-For", b"192.0.2.1")]
)
_unreserved = "abcXYZ019-._~"
_pchar = st.one_of(
    st.sampled_from(list(_unreserved + "!$&'()*+,;=:@")),
    st.sampled_from(["%20", "%2F", "%25", "%41", "%e9", "%C3%A9"]),
)
_segments = st.lists(st.lists(_pchar, max_size=6).map("".join), max_size=4)
_queries = st.lists(st.one_of(_pchar, st.sampled_from(["/", "?"])), max_size=10).map("".join)
_hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-zA-Z0-9]{1,6}){0,2}", fullmatch=True),
    st.sampled_from(["192.0.2.7", "[::1]", "[2001:db8::1]", "Example.COM"]),
)
_ports = st.sampled_from(["", ":", ":80", ":8080", ":1", ":65535"])
_methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "HEAD", "PATCH"]),
    st.text(alphabet=_TCHARS, min_size=1, max_size=8).filter(lambda m: m != "CONNECT"),
).map(str.encode)


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    """A valid absolute-form request head, CRLF CRLF included."""
    method = draw(_methods)
    minor = draw(st.sampled_from([0, 1]))
    path = ""
    if draw(st.booleans()):
        path = "/" + "/".join(draw(_segments))
    if draw(st.booleans()):
        path += "?" + draw(_queries)
    scheme = draw(st.sampled_from(["http", "HTTP", "https"]))
    target = f"{scheme}://{draw(_hosts)}{draw(_ports)}{path}".encode()
    fields = draw(st.lists(st.tuples(_names, _values), max_size=6))
    for extra in draw(st.lists(st.one_of(_hop_fields, _kept_fields), max_size=3)):
        fields.insert(draw(st.integers(0, len(fields))), extra)
    if draw(st.booleans()) and fields:
        # A Connection field naming an end-to-end field makes that field hop-by-hop.
        named = draw(st.sampled_from(fields))[0]
        fields.append((b"Connection", named.swapcase()))
    if minor or draw(st.booleans()):
        host = draw(st.sampled_from([b"other.example", b"", b"[::1]:8", b"a.example:80"]))
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", host))
    framing = draw(st.sampled_from(["none", "length", "chunked"] if minor else ["none", "length"]))
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % draw(st.integers(0, 10**15))))
    elif framing == "chunked":
        coding = draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked", b"gzip,chunked"]))
        fields.append((b"Transfer-Encoding", coding))
    lines = [method + b" " + target + b" HTTP/1.%d" % minor]
    lines += [n + b":" + draw(st.sampled_from([b"", b" ", b"\t"])) + v for n, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _read(test: SynchronousTestCase, data: bytes) -> RequestHead:
    """Read and parse one request head that must fill C{data} exactly."""
    reader = HeadReader(MAX_SIZE, MAX_LINE)
    raw = reader.feed(data)
    test.assertIsNotNone(raw)
    assert raw is not None
    test.assertEqual(reader.rest, b"")
    return parse_request_head(raw)


class RoundTripTests(SynchronousTestCase):
    """A head the proxy forwards re-parses to the same request, as the origin reads it."""

    @_SETTINGS
    @given(_heads())
    def test_forwarded_head_reparses_the_same(self, data: bytes) -> None:
        """Method, framing and end-to-end fields survive; Host is the authority; one Via."""
        first = _read(self, data)
        target = parse_absolute_target(first.target, first.method)
        out = serialize_request_head(first, target, via=b"aproxy")
        second = _read(self, out)

        self.assertEqual(second.method, first.method)
        self.assertEqual(second.target, target.path)
        self.assertEqual(second.minor, 1)
        self.assertEqual(second.content_length, first.content_length)
        self.assertEqual(second.codings, first.codings)
        self.assertEqual(second.chunked, first.chunked)

        gone = _HOP_BY_HOP | first.connection | {b"host"}
        expected = [(n, v) for n, v in first.fields if n.lower() not in gone]
        got = second.fields
        self.assertEqual(got[0], (b"Host", target.authority))
        self.assertEqual(second.values(b"host"), [target.authority])
        self.assertEqual(got[-1], (b"Via", b"1.%d aproxy" % first.minor))
        framing = [(n, v) for n, v in got[1:-1] if n.lower() in _HOP_BY_HOP]
        self.assertEqual(len(framing), int(first.content_length is not None or first.chunked))
        self.assertEqual([f for f in got[1:-1] if f not in framing], expected)
        kept_vias = [v for n, v in expected if n.lower() == b"via"]
        self.assertEqual(second.values(b"via"), [*kept_vias, b"1.%d aproxy" % first.minor])
        self.assertEqual(second.connection, frozenset())


# -- chunked decoder -----------------------------------------------------------------------

# What follows a body on the wire; the decoder must hand it back untouched.
TRAILING = b"GET http://x.example/ HTTP/1.1\r\n\n\r\x00\r\n\r\n"

_ext_names = st.text(alphabet=_TCHARS, min_size=1, max_size=5).map(str.encode)
_ext_values = st.one_of(
    _ext_names,
    st.sampled_from([b'""', b'"a b"', b'"q\\"uote"', b'"\\\\"', b'"\xff;="']),
)
_bws = st.sampled_from([b"", b" ", b"\t", b" \t"])


@st.composite
def _extensions(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        out += draw(_bws) + b";" + draw(_bws) + draw(_ext_names)
        if draw(st.booleans()):
            out += draw(_bws) + b"=" + draw(_bws) + draw(_ext_values)
    return out


@st.composite
def _chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes]]:
    """A valid chunked body: (the wire bytes, the data, the trailer lines with CRLF)."""
    wire = b""
    data = b""
    for piece in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5)):
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper()
        size = b"0" * draw(st.integers(0, 3)) + size
        wire += size + draw(_extensions()) + b"\r\n" + piece + b"\r\n"
        data += piece
    wire += b"0" * draw(st.integers(1, 3)) + draw(_extensions()) + b"\r\n"
    trailers = [
        name + b":" + draw(_bws) + value + b"\r\n"
        for name, value in draw(st.lists(st.tuples(_ext_names, _values), max_size=3))
    ]
    wire += b"".join(trailers) + b"\r\n"
    return wire, data, trailers


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


Outcome = tuple[str, bytes, bool, tuple[bytes, ...], bytes]


def _decode(pieces: list[bytes], is_request: bool) -> Outcome:
    """Feed C{pieces}: the error class name, or the data, done, trailers and leftover."""
    decoder = ChunkedDecoder(is_request)
    data = []
    after = []
    try:
        for piece in pieces:
            got, rest = decoder.feed(piece)
            data += got
            after.append(rest)
    except ProxyError as e:
        expected = BadRequest if is_request else BadGateway
        if type(e) is not expected:
            raise AssertionError(f"{type(e).__name__}, expected {expected.__name__}") from e
        return (type(e).__name__, b"", False, (), b"")
    return ("", b"".join(data), decoder.done, tuple(decoder.trailers), b"".join(after))


class ChunkedDecoderPropertyTests(SynchronousTestCase):
    """L{ChunkedDecoder} reads a body the same however it is cut, and fails only typed."""

    @_SETTINGS
    @given(_chunked_bodies(), st.lists(st.integers(0, 400), max_size=8), st.booleans())
    def test_any_split_same_data_and_trailers(
        self, body: tuple[bytes, bytes, list[bytes]], cuts: list[int], is_request: bool
    ) -> None:
        """A valid body with extensions and trailers decodes the same whole and cut anywhere."""
        wire, data, trailers = body
        expected = ("", data, True, tuple(trailers), TRAILING)
        self.assertEqual(_decode([wire + TRAILING], is_request), expected)
        pieces = _cut(wire, cuts)
        pieces[-1] += TRAILING
        self.assertEqual(_decode(pieces, is_request), expected)
        bytewise = [wire[i : i + 1] for i in range(len(wire))] + [TRAILING]
        self.assertEqual(_decode(bytewise, is_request), expected)

    @_SETTINGS
    @given(
        _chunked_bodies(),
        st.integers(0, 10**6),
        st.sampled_from([*b'\r\n \t;="\\0159aAfFgGxX-+\x00\x80\xff', 0x0B]),
        st.lists(st.integers(0, 400), max_size=4),
        st.booleans(),
    )
    def test_one_byte_mutation(
        self,
        body: tuple[bytes, bytes, list[bytes]],
        where: int,
        byte: int,
        cuts: list[int],
        is_request: bool,
    ) -> None:
        """A body with one byte changed decodes or raises the decoder's own error, the same
        way whole, cut and byte by byte; whatever it decodes to re-frames to the same."""
        wire = bytearray(body[0])
        wire[where % len(wire)] = byte
        mutated = bytes(wire) + TRAILING
        whole = _decode([mutated], is_request)
        self.assertEqual(_decode(_cut(mutated, cuts), is_request), whole)
        self.assertEqual(
            _decode([mutated[i : i + 1] for i in range(len(mutated))], is_request), whole
        )
        error, data, done, trailers, after = whole
        if done:
            # What the proxy forwards for it decodes to the same data and trailers.
            reframed = b"".join(chunk(data)) + b"0\r\n" + b"".join(trailers) + b"\r\n"
            self.assertEqual(_decode([reframed], is_request), ("", data, True, trailers, b""))
            self.assertTrue(mutated.endswith(after))
