"""
Tests for L{aproxy.http.head}: reading, validating and re-serialising HTTP/1.1 message heads.

Every accepted message is read three ways, as h11's tests do: fed whole, fed one byte at a
time (L{None} until the last byte) and fed with trailing bytes (handed back untouched).
Every rejection has its own test and checks the exact status code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aproxy.errors import (
    BadGateway,
    BadRequest,
    HeaderTooLarge,
    NotImplementedByProxy,
    ProxyError,
    URITooLong,
    VersionNotSupported,
)
from aproxy.http.head import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    HeadReader,
    RequestHead,
    ResponseHead,
    Target,
    framing_fields,
    parse_absolute_target,
    parse_authority,
    parse_request_head,
    parse_response_head,
    response_body_kind,
    serialize_request_head,
    serialize_response_head,
)

MAX_SIZE = 65536
MAX_LINE = 16384
# What may follow a head on the wire: the body or the next message. It holds bare LFs, CRs
# and NULs on purpose: the reader must not look at it, only hand it back.
TRAILING = b"POST http://x.example/ HTTP/1.1\r\n\r\n\n\r\x00body\r\n\r\n"

SIMPLE_GET = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"
SIMPLE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"

_SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)


def byte_pieces(data: bytes) -> list[bytes]:
    """Split C{data} into one-byte pieces."""
    return [data[i : i + 1] for i in range(len(data))]


def read_three_ways(
    test: SynchronousTestCase,
    data: bytes,
    is_request: bool = True,
    max_size: int = MAX_SIZE,
    max_line: int = MAX_LINE,
) -> bytes:
    """
    Read one complete message head from C{data} whole, byte by byte, split in two at every
    position, and followed by trailing bytes; assert all ways agree.

    @return: The head as returned by L{HeadReader.feed}.
    """

    def reader() -> HeadReader:
        return HeadReader(max_size, max_line, is_request)

    whole = reader()
    head = whole.feed(data)
    assert head is not None, "the whole message did not give a head"
    test.assertEqual(whole.rest, b"")
    test.assertFalse(whole.pending)

    bytewise = reader()
    pieces = byte_pieces(data)
    for i, piece in enumerate(pieces[:-1]):
        test.assertIsNone(bytewise.feed(piece), f"a head after {i + 1} of {len(data)} bytes")
    test.assertEqual(bytewise.feed(pieces[-1]), head)
    test.assertEqual(bytewise.rest, b"")

    trailing = reader()
    test.assertEqual(trailing.feed(data + TRAILING), head)
    test.assertEqual(trailing.rest, TRAILING)

    # The slow path: most of the head buffered, the end of it arriving with what follows.
    late = reader()
    for piece in pieces[:-1]:
        late.feed(piece)
    test.assertEqual(late.feed(pieces[-1] + TRAILING), head)
    test.assertEqual(late.rest, TRAILING)

    if len(data) < 1024:
        for i in range(1, len(data)):
            split = reader()
            test.assertIsNone(split.feed(data[:i]))
            test.assertEqual(split.feed(data[i:] + TRAILING), head, f"split at {i}")
            test.assertEqual(split.rest, TRAILING)
    return head


def parse_request(test: SynchronousTestCase, data: bytes) -> RequestHead:
    """Read C{data} three ways with L{read_three_ways} and parse the request head."""
    return parse_request_head(read_three_ways(test, data))


def parse_response(test: SynchronousTestCase, data: bytes) -> ResponseHead:
    """Read C{data} three ways with L{read_three_ways} and parse the response head."""
    return parse_response_head(read_three_ways(test, data, is_request=False))


def _run(
    pieces: Iterable[bytes],
    parse: Callable[[bytes], object],
    is_request: bool,
    max_size: int,
    max_line: int,
) -> None:
    reader = HeadReader(max_size, max_line, is_request)
    for piece in pieces:
        raw = reader.feed(piece)
        if raw is not None:
            parse(raw)
            return
    raise AssertionError("the message never completed")


def rejected(
    test: SynchronousTestCase,
    data: bytes,
    is_request: bool = True,
    max_size: int = MAX_SIZE,
    max_line: int = MAX_LINE,
) -> ProxyError:
    """
    Feed C{data} whole and byte by byte to a reader and the matching parser; both must
    raise the same L{ProxyError}.

    @return: The error raised for the whole message.
    """
    parse: Callable[[bytes], object] = parse_request_head if is_request else parse_response_head
    whole: ProxyError = test.assertRaises(
        ProxyError, _run, [data], parse, is_request, max_size, max_line
    )
    bytewise = test.assertRaises(
        ProxyError, _run, byte_pieces(data), parse, is_request, max_size, max_line
    )
    test.assertIs(type(whole), type(bytewise))
    test.assertEqual(whole.status, bytewise.status)
    return whole


def request(*lines: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A GET request for C{http://example.com/} with a Host field and C{lines}."""
    head = [b"GET http://example.com/ " + version, b"Host: example.com", *lines]
    return b"\r\n".join(head) + b"\r\n\r\n"


def response(*lines: bytes, status_line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A response head with C{status_line} and C{lines}."""
    return b"\r\n".join([status_line, *lines]) + b"\r\n\r\n"


class HeadReaderTests(SynchronousTestCase):
    """L{HeadReader} finds the end of a head however the bytes arrive, and no further."""

    def test_simple_request(self) -> None:
        """A complete request head is returned without its final empty line."""
        head = read_three_ways(self, SIMPLE_GET)
        self.assertEqual(head, SIMPLE_GET[:-4])

    def test_simple_response(self) -> None:
        """A complete response head is returned by a response reader."""
        head = read_three_ways(self, SIMPLE_RESPONSE, is_request=False)
        self.assertEqual(head, SIMPLE_RESPONSE[:-4])

    def test_request_line_only(self) -> None:
        """A head with no field lines at all is complete at its empty line."""
        data = b"GET http://example.com/ HTTP/1.0\r\n\r\n"
        self.assertEqual(read_three_ways(self, data), data[:-4])

    def test_leading_empty_lines_skipped(self) -> None:
        """Empty lines before a request line are ignored (RFC 9112 section 2.2)."""
        head = read_three_ways(self, b"\r\n\r\n\r\n" + SIMPLE_GET)
        self.assertEqual(head, SIMPLE_GET[:-4])

    def test_leading_empty_lines_in_separate_feeds(self) -> None:
        """Empty lines arriving alone leave nothing pending and are not counted."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        for piece in (b"\r\n", b"\r\n\r\n", b"\r", b"\n"):
            self.assertIsNone(reader.feed(piece))
        self.assertFalse(reader.pending)
        self.assertEqual(reader.feed(SIMPLE_GET), SIMPLE_GET[:-4])

    def test_leading_empty_lines_not_counted_against_size(self) -> None:
        """Empty lines before a request line don't count towards the head size limit."""
        reader = HeadReader(len(SIMPLE_GET), MAX_LINE)
        self.assertEqual(reader.feed(b"\r\n" * 100 + SIMPLE_GET), SIMPLE_GET[:-4])

    def test_leading_empty_lines_not_skipped_in_responses(self) -> None:
        """A response reader does not skip empty lines: an empty head is a bad status line."""
        err = rejected(self, b"\r\n" + SIMPLE_RESPONSE, is_request=False)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.status, 502)

    def test_pending(self) -> None:
        """C{pending} is true only while part of a head has been received."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        self.assertFalse(reader.pending)
        reader.feed(SIMPLE_GET[:10])
        self.assertTrue(reader.pending)
        reader.feed(SIMPLE_GET[10:])
        self.assertFalse(reader.pending)

    def test_reader_reused_for_pipelined_requests(self) -> None:
        """The same reader reads the next head from the bytes it handed back."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        self.assertEqual(reader.feed(SIMPLE_GET + SIMPLE_GET[:7]), SIMPLE_GET[:-4])
        self.assertEqual(reader.rest, SIMPLE_GET[:7])
        reader.rest = b""
        self.assertIsNone(reader.feed(SIMPLE_GET[:7]))
        self.assertEqual(reader.feed(SIMPLE_GET[7:]), SIMPLE_GET[:-4])
        self.assertEqual(reader.rest, b"")

    def test_body_bytes_not_inspected(self) -> None:
        """A bare LF after the head belongs to the body and is handed back, not rejected."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        self.assertEqual(reader.feed(SIMPLE_GET + b"\n\n"), SIMPLE_GET[:-4])
        self.assertEqual(reader.rest, b"\n\n")

    def test_body_bytes_arriving_with_end_of_head_not_inspected(self) -> None:
        """Body bytes that arrive with the last bytes of a head may hold bare LFs."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        self.assertIsNone(reader.feed(SIMPLE_GET[:-1]))
        self.assertEqual(reader.feed(b"\nline one\nline two\n"), SIMPLE_GET[:-4])
        self.assertEqual(reader.rest, b"line one\nline two\n")

    def test_bare_lf_terminator_rejected(self) -> None:
        """A head whose lines end in bare LF is rejected with 400."""
        err = rejected(self, b"GET http://example.com/ HTTP/1.1\nHost: example.com\n\n")
        self.assertIsInstance(err, BadRequest)
        self.assertEqual(err.status, 400)

    def test_bare_lf_in_complete_head_rejected(self) -> None:
        """One bare LF among CRLF lines is rejected with 400."""
        err = rejected(self, b"GET http://example.com/ HTTP/1.1\r\nHost: a\nX: y\r\n\r\n")
        self.assertEqual(err.status, 400)

    def test_bare_lf_before_empty_line_rejected(self) -> None:
        """A bare LF just before the final CRLF CRLF is rejected with 400."""
        err = rejected(self, b"GET http://example.com/ HTTP/1.1\r\nHost: a\n\r\n\r\n")
        self.assertEqual(err.status, 400)

    def test_bare_lf_rejected_before_head_complete(self) -> None:
        """A bare LF is rejected as soon as it arrives, whole or byte by byte."""
        data = b"GET http://example.com/ HTTP/1.1\n"
        err = self.assertRaises(BadRequest, HeadReader(MAX_SIZE, MAX_LINE).feed, data)
        self.assertEqual(err.status, 400)
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        for piece in byte_pieces(data[:-1]):
            self.assertIsNone(reader.feed(piece))
        err = self.assertRaises(BadRequest, reader.feed, b"\n")
        self.assertEqual(err.status, 400)
        self.assertFalse(reader.pending)

    def test_leading_bare_lf_rejected(self) -> None:
        """A bare LF before the request line is not an empty line and is rejected."""
        err = self.assertRaises(BadRequest, HeadReader(MAX_SIZE, MAX_LINE).feed, b"\nGET")
        self.assertEqual(err.status, 400)

    def test_bare_lf_in_response_is_bad_gateway(self) -> None:
        """A bare LF in a response head is a 502, as soon as it arrives."""
        reader = HeadReader(MAX_SIZE, MAX_SIZE, is_request=False)
        err = self.assertRaises(BadGateway, reader.feed, b"HTTP/1.1 200 OK\n")
        self.assertEqual(err.status, 502)
        err = rejected(self, b"HTTP/1.1 200 OK\nX: y\n\n", is_request=False)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.error_type, "http_protocol_error")

    def test_request_line_of_8000_octets_accepted(self) -> None:
        """Request lines of 8000 octets and more fit the default limit (RFC 9112 section 3)."""
        path = b"/" + b"a" * 8100
        data = b"GET http://example.com" + path + b" HTTP/1.1\r\nHost: example.com\r\n\r\n"
        head = parse_request(self, data)
        self.assertEqual(head.target, b"http://example.com" + path)

    def test_request_line_at_limit_accepted(self) -> None:
        """A request line exactly C{max_line} long is accepted however it arrives."""
        line = b"GET http://example.com/" + b"a" * 50 + b" HTTP/1.1"
        data = line + b"\r\nHost: example.com\r\n\r\n"
        head = read_three_ways(self, data, max_line=len(line))
        self.assertEqual(head, data[:-4])

    def test_request_line_over_limit_uri_too_long(self) -> None:
        """A request line one octet over C{max_line} gets 414, whole and byte by byte."""
        line = b"GET http://example.com/" + b"a" * 50 + b" HTTP/1.1"
        data = line + b"\r\nHost: example.com\r\n\r\n"
        err = rejected(self, data, max_line=len(line) - 1)
        self.assertIsInstance(err, URITooLong)
        self.assertEqual(err.status, 414)

    def test_request_line_over_limit_rejected_before_line_ends(self) -> None:
        """A request line gets 414 as soon as it exceeds the limit, before its CRLF."""
        reader = HeadReader(MAX_SIZE, MAX_LINE)
        data = b"GET http://example.com/" + b"a" * MAX_LINE
        err = self.assertRaises(URITooLong, reader.feed, data)
        self.assertEqual(err.status, 414)
        self.assertFalse(reader.pending)

    def test_request_line_over_limit_rejected_before_head_ends(self) -> None:
        """A too-long request line gets 414 without waiting for the rest of the head."""
        line = b"GET http://example.com/" + b"a" * 50 + b" HTTP/1.1\r\nHost: a\r\n"
        reader = HeadReader(MAX_SIZE, 40)
        err = self.assertRaises(URITooLong, reader.feed, line)
        self.assertEqual(err.status, 414)

    def test_request_line_limit_beats_head_limit(self) -> None:
        """A head over both limits gets 414, whole and byte by byte."""
        data = b"GET http://example.com/" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n"
        err = rejected(self, data, max_size=1024, max_line=1000)
        self.assertIsInstance(err, URITooLong)
        self.assertEqual(err.status, 414)

    def test_head_at_size_limit_accepted(self) -> None:
        """A head whose bytes, final empty line included, fill C{max_size} is accepted."""
        data = request(b"X-Pad: " + b"p" * 200)
        read_three_ways(self, data, max_size=len(data))

    def test_head_over_size_limit(self) -> None:
        """A head one octet over C{max_size} gets 431, whole and byte by byte."""
        data = request(b"X-Pad: " + b"p" * 200)
        err = rejected(self, data, max_size=len(data) - 1)
        self.assertIsInstance(err, HeaderTooLarge)
        self.assertEqual(err.status, 431)

    def test_unfinished_head_over_size_limit(self) -> None:
        """A head that never ends gets 431 once it passes C{max_size}, memory freed."""
        reader = HeadReader(1024, 512)
        self.assertIsNone(reader.feed(b"GET http://example.com/ HTTP/1.1\r\n"))
        err = self.assertRaises(HeaderTooLarge, reader.feed, b"X: " + b"y" * 1024)
        self.assertEqual(err.status, 431)
        self.assertFalse(reader.pending)

    def test_response_line_too_long_is_bad_gateway(self) -> None:
        """An origin's over-long status line is a 502, not a 414 meant for clients."""
        data = response(status_line=b"HTTP/1.1 200 " + b"x" * 2000)
        err = rejected(self, data, is_request=False, max_size=4096, max_line=1024)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.status, 502)

    def test_response_head_too_large_is_bad_gateway(self) -> None:
        """An origin's over-large head is a 502, not a 431 meant for clients."""
        data = response(b"X-Pad: " + b"p" * 2000)
        err = rejected(self, data, is_request=False, max_size=1024, max_line=1024)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.status, 502)


class RequestHeadTests(SynchronousTestCase):
    """L{parse_request_head} accepts well-formed heads and reports what they say."""

    def test_request_line(self) -> None:
        """Method, target and minor version come from the request line."""
        head = parse_request(self, b"POST http://a.example/x?y HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(
            (head.method, head.target, head.minor), (b"POST", b"http://a.example/x?y", 1)
        )

    def test_fields_kept_in_order_case_and_repetition(self) -> None:
        """Field lines keep their order, case and repetitions; OWS around values is cut."""
        head = parse_request(
            self,
            request(
                b"X-B: 1",
                b"x-a:2",
                b"X-B:  3  ",
                b"Accept: text/html,\t*/*",
                b"X-Empty:",
                b"X-Obs: caf\xc3\xa9",
            ),
        )
        self.assertEqual(
            head.fields,
            [
                (b"Host", b"example.com"),
                (b"X-B", b"1"),
                (b"x-a", b"2"),
                (b"X-B", b"3"),
                (b"Accept", b"text/html,\t*/*"),
                (b"X-Empty", b""),
                (b"X-Obs", b"caf\xc3\xa9"),
            ],
        )

    def test_values_of_noted_field(self) -> None:
        """C{values} lists every value of a noted field, whatever the name's case."""
        head = parse_request(self, request(b"max-forwards: 3", b"Upgrade: a", b"UPGRADE: b"))
        self.assertEqual(head.values(b"max-forwards"), [b"3"])
        self.assertEqual(head.values(b"upgrade"), [b"a", b"b"])
        self.assertEqual(head.values(b"content-length"), [])

    def test_connection_tokens(self) -> None:
        """C{connection} holds the lowercased tokens of every Connection field."""
        head = parse_request(self, request(b"Connection: X-Foo, ,Upgrade", b"connection: TE"))
        self.assertEqual(head.connection, frozenset({b"x-foo", b"upgrade", b"te"}))

    def test_keep_alive_http11(self) -> None:
        """An HTTP/1.1 request keeps the connection by default."""
        self.assertTrue(parse_request(self, request()).keep_alive)

    def test_keep_alive_http11_close(self) -> None:
        """An HTTP/1.1 request with Connection: close (any case) does not keep it."""
        self.assertFalse(parse_request(self, request(b"Connection: close")).keep_alive)
        self.assertFalse(parse_request(self, request(b"Connection: x, CLOSE")).keep_alive)

    def test_keep_alive_http10(self) -> None:
        """An HTTP/1.0 request closes the connection by default."""
        head = parse_request(self, b"GET http://example.com/ HTTP/1.0\r\n\r\n")
        self.assertEqual(head.minor, 0)
        self.assertFalse(head.keep_alive)

    def test_keep_alive_http10_keep_alive(self) -> None:
        """An HTTP/1.0 request with Connection: keep-alive asks to keep the connection."""
        head = parse_request(self, request(b"Connection: Keep-Alive", version=b"HTTP/1.0"))
        self.assertTrue(head.keep_alive)

    def test_host_optional_in_http10(self) -> None:
        """An HTTP/1.0 request needs no Host field."""
        head = parse_request(self, b"GET http://example.com/ HTTP/1.0\r\nAccept: */*\r\n\r\n")
        self.assertEqual(head.fields, [(b"Accept", b"*/*")])

    def test_host_forms_accepted(self) -> None:
        """Host may carry a port or an IPv6 literal."""
        for host in (b"example.com:8080", b"[::1]:8000", b"127.0.0.1"):
            data = b"GET http://x/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
            self.assertEqual(parse_request(self, data).values(b"host"), [host])

    def test_no_body(self) -> None:
        """Without framing fields there is no body."""
        head = parse_request(self, request())
        self.assertIsNone(head.content_length)
        self.assertIsNone(head.codings)
        self.assertFalse(head.chunked)

    def test_content_length(self) -> None:
        """Content-Length gives the body length; OWS and leading zeros are fine."""
        self.assertEqual(parse_request(self, request(b"Content-Length: 5")).content_length, 5)
        self.assertEqual(parse_request(self, request(b"content-length:  007 ")).content_length, 7)
        self.assertEqual(parse_request(self, request(b"Content-Length: 0")).content_length, 0)

    def test_chunked(self) -> None:
        """Transfer-Encoding: chunked (any case) makes the body chunked."""
        head = parse_request(self, request(b"Transfer-Encoding: Chunked"))
        self.assertEqual(head.codings, [b"chunked"])
        self.assertTrue(head.chunked)
        self.assertIsNone(head.content_length)

    def test_codings_in_order(self) -> None:
        """Codings from one or several Transfer-Encoding fields are listed in order."""
        one = parse_request(self, request(b"Transfer-Encoding: gzip, chunked"))
        two = parse_request(
            self, request(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked")
        )
        self.assertEqual(one.codings, [b"gzip", b"chunked"])
        self.assertEqual(two.codings, [b"gzip", b"chunked"])
        self.assertTrue(two.chunked)

    def test_minor_version_above_one(self) -> None:
        """A higher HTTP/1.x minor version is accepted as HTTP/1.1 (RFC 9110 section 2.5)."""
        self.assertEqual(parse_request(self, request(version=b"HTTP/1.2")).minor, 2)


class RequestHeadRejectionTests(SynchronousTestCase):
    """Malformed or ambiguous request heads are rejected with the right status."""

    def assert_status(self, data: bytes, status: int, kind: type[ProxyError]) -> ProxyError:
        """Assert that C{data} is rejected with C{status} by a C{kind} error."""
        err = rejected(self, data)
        self.assertIsInstance(err, kind)
        self.assertEqual(err.status, status)
        return err

    def test_content_length_and_transfer_encoding(self) -> None:
        """Content-Length together with Transfer-Encoding is 400 (RFC 9112 section 6.1)."""
        self.assert_status(
            request(b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400, BadRequest
        )

    def test_content_length_plus_sign(self) -> None:
        """Content-Length: +5 is 400."""
        self.assert_status(request(b"Content-Length: +5"), 400, BadRequest)

    def test_content_length_hex(self) -> None:
        """Content-Length: 0x5 is 400."""
        self.assert_status(request(b"Content-Length: 0x5"), 400, BadRequest)

    def test_content_length_inner_space(self) -> None:
        """Content-Length: 1 0 is 400."""
        self.assert_status(request(b"Content-Length: 1 0"), 400, BadRequest)

    def test_content_length_negative(self) -> None:
        """Content-Length: -1 is 400."""
        self.assert_status(request(b"Content-Length: -1"), 400, BadRequest)

    def test_content_length_empty(self) -> None:
        """An empty Content-Length is 400."""
        self.assert_status(request(b"Content-Length:"), 400, BadRequest)

    def test_content_length_too_many_digits(self) -> None:
        """A Content-Length of 19 digits is 400."""
        self.assert_status(request(b"Content-Length: " + b"1" * 19), 400, BadRequest)

    def test_content_length_list_differing(self) -> None:
        """Content-Length: 5, 6 is 400."""
        self.assert_status(request(b"Content-Length: 5, 6"), 400, BadRequest)

    def test_content_length_list_identical(self) -> None:
        """Even an identical list, Content-Length: 5, 5, is 400 in a request."""
        self.assert_status(request(b"Content-Length: 5, 5"), 400, BadRequest)

    def test_content_length_trailing_comma(self) -> None:
        """Content-Length: 5, is 400."""
        self.assert_status(request(b"Content-Length: 5,"), 400, BadRequest)

    def test_content_length_twice(self) -> None:
        """Two Content-Length fields are 400, even with equal values."""
        self.assert_status(request(b"Content-Length: 5", b"Content-Length: 5"), 400, BadRequest)

    def test_transfer_encoding_not_ending_in_chunked(self) -> None:
        """A request whose last transfer coding is not chunked is 400."""
        self.assert_status(request(b"Transfer-Encoding: gzip"), 400, BadRequest)

    def test_transfer_encoding_chunked_then_gzip(self) -> None:
        """Transfer-Encoding: chunked, gzip is 400."""
        self.assert_status(request(b"Transfer-Encoding: chunked, gzip"), 400, BadRequest)

    def test_chunked_twice(self) -> None:
        """Transfer-Encoding: chunked, chunked is 400."""
        self.assert_status(request(b"Transfer-Encoding: chunked, chunked"), 400, BadRequest)

    def test_chunked_twice_in_two_fields(self) -> None:
        """Chunked in two Transfer-Encoding fields is 400."""
        self.assert_status(
            request(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400, BadRequest
        )

    def test_unknown_transfer_coding(self) -> None:
        """An unknown transfer coding is 501 (RFC 9112 section 6.1)."""
        self.assert_status(request(b"Transfer-Encoding: foo, chunked"), 501, NotImplementedByProxy)

    def test_empty_transfer_coding_element(self) -> None:
        """An empty element in Transfer-Encoding is 400."""
        self.assert_status(request(b"Transfer-Encoding: , chunked"), 400, BadRequest)

    def test_transfer_coding_with_parameters(self) -> None:
        """A transfer coding with parameters is 400."""
        self.assert_status(request(b"Transfer-Encoding: gzip;q=1, chunked"), 400, BadRequest)

    def test_empty_transfer_encoding(self) -> None:
        """An empty Transfer-Encoding field is 400."""
        self.assert_status(request(b"Transfer-Encoding:"), 400, BadRequest)

    def test_transfer_encoding_in_http10(self) -> None:
        """Transfer-Encoding in an HTTP/1.0 request is 400 (RFC 9112 section 6.1)."""
        self.assert_status(
            request(b"Transfer-Encoding: chunked", version=b"HTTP/1.0"), 400, BadRequest
        )

    def test_obs_fold(self) -> None:
        """A folded field line is 400 (RFC 9112 section 5.2)."""
        self.assert_status(request(b"X-A: one", b" two"), 400, BadRequest)

    def test_obs_fold_with_tab(self) -> None:
        """A field line folded with a tab is 400."""
        self.assert_status(request(b"X-A: one", b"\ttwo"), 400, BadRequest)

    def test_space_before_colon(self) -> None:
        """Whitespace between field name and colon is 400 (RFC 9112 section 5.1)."""
        self.assert_status(request(b"X-A : one"), 400, BadRequest)

    def test_tab_before_colon(self) -> None:
        """A tab between field name and colon is 400."""
        self.assert_status(request(b"X-A\t: one"), 400, BadRequest)

    def test_space_in_field_name(self) -> None:
        """A space inside a field name is 400."""
        self.assert_status(request(b"X A: one"), 400, BadRequest)

    def test_separator_in_field_name(self) -> None:
        """A delimiter such as C{(} in a field name is 400."""
        self.assert_status(request(b"X(A): one"), 400, BadRequest)

    def test_non_ascii_field_name(self) -> None:
        """A non-ASCII octet in a field name is 400."""
        self.assert_status(request(b"X-\xc3\xa9: one"), 400, BadRequest)

    def test_empty_field_name(self) -> None:
        """A field line with no name is 400."""
        self.assert_status(request(b": one"), 400, BadRequest)

    def test_field_line_without_colon(self) -> None:
        """A field line without a colon is 400."""
        self.assert_status(request(b"X-A one"), 400, BadRequest)

    def test_cr_in_field_value(self) -> None:
        """A CR inside a field value is 400."""
        self.assert_status(request(b"X-A: one\rtwo"), 400, BadRequest)

    def test_cr_at_end_of_field_value(self) -> None:
        """A CR before a line's CRLF is 400."""
        self.assert_status(request(b"X-A: one\r"), 400, BadRequest)

    def test_nul_in_field_value(self) -> None:
        """A NUL inside a field value is 400."""
        self.assert_status(request(b"X-A: one\x00two"), 400, BadRequest)

    def test_control_in_field_value(self) -> None:
        """Other control characters (here DEL and 0x01) in a field value are 400."""
        self.assert_status(request(b"X-A: one\x7f"), 400, BadRequest)
        self.assert_status(request(b"X-A: \x01"), 400, BadRequest)

    def test_nul_in_request_line(self) -> None:
        """A NUL in the request line is 400."""
        self.assert_status(b"GET http://a/\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_cr_in_request_line(self) -> None:
        """A CR in the request line is 400."""
        self.assert_status(b"GET http://a/\r HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_missing_host(self) -> None:
        """An HTTP/1.1 request without Host is 400 (RFC 9112 section 3.2)."""
        self.assert_status(b"GET http://example.com/ HTTP/1.1\r\n\r\n", 400, BadRequest)

    def test_duplicated_host(self) -> None:
        """Two Host fields are 400."""
        self.assert_status(request(b"Host: example.com"), 400, BadRequest)

    def test_host_list(self) -> None:
        """A Host field holding a list is 400."""
        data = b"GET http://a/ HTTP/1.1\r\nHost: a, b\r\n\r\n"
        self.assert_status(data, 400, BadRequest)

    def test_host_with_userinfo(self) -> None:
        """A Host field with userinfo is 400."""
        data = b"GET http://a/ HTTP/1.1\r\nHost: user@a\r\n\r\n"
        self.assert_status(data, 400, BadRequest)

    def test_malformed_connection_field(self) -> None:
        """A Connection field with a non-token element is 400."""
        self.assert_status(request(b"Connection: close, a b"), 400, BadRequest)

    def test_request_line_extra_token(self) -> None:
        """A request line with an extra token is 400."""
        self.assert_status(b"GET http://a/ HTTP/1.1 x\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_trailing_space(self) -> None:
        """A request line with a trailing space is 400."""
        self.assert_status(b"GET http://a/ HTTP/1.1 \r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_lowercase_version(self) -> None:
        """The protocol name is case-sensitive: http/1.1 is 400."""
        self.assert_status(b"GET http://a/ http/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_space_in_target(self) -> None:
        """A space inside the target is 400."""
        self.assert_status(b"GET http://a/b c HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_tab_separator(self) -> None:
        """A tab between request-line parts is 400."""
        self.assert_status(b"GET\thttp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_double_space(self) -> None:
        """Two spaces between request-line parts are 400."""
        self.assert_status(b"GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_leading_space(self) -> None:
        """Whitespace before the method is 400."""
        self.assert_status(b" GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_without_version(self) -> None:
        """A request line without a version (HTTP/0.9 style) is 400."""
        self.assert_status(b"GET http://a/\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_request_line_bad_version_format(self) -> None:
        """Versions like HTTP/1, HTTP/1.10 or HTTP/11 are 400."""
        for version in (b"HTTP/1", b"HTTP/1.10", b"HTTP/11", b"HTTP/1.x"):
            self.assert_status(request(version=version), 400, BadRequest)

    def test_request_line_non_token_method(self) -> None:
        """A method that is not a token is 400."""
        self.assert_status(b"GE(T http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, BadRequest)

    def test_http2_version(self) -> None:
        """HTTP/2.0 in a request line is 505."""
        self.assert_status(request(version=b"HTTP/2.0"), 505, VersionNotSupported)

    def test_http09_version(self) -> None:
        """HTTP/0.9 in a request line is 505."""
        self.assert_status(request(version=b"HTTP/0.9"), 505, VersionNotSupported)


class ResponseHeadTests(SynchronousTestCase):
    """L{parse_response_head} accepts valid origin heads and rejects the rest with 502."""

    def assert_bad_gateway(self, data: bytes) -> None:
        """Assert that the response head C{data} is rejected with 502."""
        err = rejected(self, data, is_request=False)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.status, 502)
        self.assertEqual(err.error_type, "http_protocol_error")

    def test_status_line(self) -> None:
        """Status, reason and version come from the status line; fields keep their order."""
        head = parse_response(
            self, response(b"Set-Cookie: a=1", b"set-cookie: b=2", status_line=b"HTTP/1.1 404 Gone")
        )
        self.assertEqual((head.status, head.reason, head.minor), (404, b"Gone", 1))
        self.assertEqual(head.fields, [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")])

    def test_reason_phrase_forms(self) -> None:
        """A reason may be empty or hold spaces, tabs and obs-text."""
        for reason in (b"", b"Not  Found", b"x\ty", b"\xe9t\xe9"):
            head = parse_response(self, response(status_line=b"HTTP/1.1 200 " + reason))
            self.assertEqual(head.reason, reason)

    def test_status_range_edges(self) -> None:
        """Status 100 and 599 are accepted."""
        for code in (100, 599):
            head = parse_response(self, response(status_line=b"HTTP/1.1 %d X" % code))
            self.assertEqual(head.status, code)

    def test_keep_alive(self) -> None:
        """HTTP/1.1 persists unless close; HTTP/1.0 only with keep-alive."""
        cases = [
            (b"HTTP/1.1 200 OK", (), True),
            (b"HTTP/1.1 200 OK", (b"Connection: close",), False),
            (b"HTTP/1.0 200 OK", (), False),
            (b"HTTP/1.0 200 OK", (b"Connection: keep-alive",), True),
        ]
        for status_line, lines, expected in cases:
            head = parse_response(self, response(*lines, status_line=status_line))
            self.assertEqual(head.keep_alive, expected, (status_line, lines))

    def test_connection_tokens_any_case(self) -> None:
        """Connection tokens are compared lowercased, whatever case or list they come in."""
        cases = [
            (b"Connection: Close", frozenset({b"close"}), False),
            (b"Connection: CLOSE", frozenset({b"close"}), False),
            (b"Connection: Keep-Alive", frozenset({b"keep-alive"}), True),
            (b"Connection: Upgrade", frozenset({b"upgrade"}), True),
            (b"Connection: close, X-Custom", frozenset({b"close", b"x-custom"}), False),
        ]
        for line, tokens, keep in cases:
            head = parse_response(self, response(line))
            self.assertEqual(head.connection, tokens, line)
            self.assertEqual(head.keep_alive, keep, line)

    def test_content_length_forms(self) -> None:
        """A plain number (leading zeros too) is the length; signs and spaces inside are not."""
        head = parse_response(self, response(b"Content-Length: 0100"))
        self.assertEqual(head.content_length, 100)
        head = parse_response(self, response(b"Content-Length: " + b"9" * 18))
        self.assertEqual(head.content_length, 10**18 - 1)
        for value in (b"+5", b"-5", b"5 5", b"0x10", b"\xd9\xa5", b"9" * 19):
            self.assert_bad_gateway(response(b"Content-Length: " + value))

    def test_identical_content_lengths_accepted(self) -> None:
        """Repeated identical Content-Length values in a response are one length."""
        head = parse_response(self, response(b"Content-Length: 5", b"Content-Length: 5"))
        self.assertEqual(head.content_length, 5)
        head = parse_response(self, response(b"Content-Length: 7, 7"))
        self.assertEqual(head.content_length, 7)

    def test_transfer_coding_not_chunked_accepted(self) -> None:
        """A response may end in a coding other than chunked; its body runs until close."""
        head = parse_response(self, response(b"Transfer-Encoding: gzip"))
        self.assertEqual(head.codings, [b"gzip"])
        self.assertFalse(head.chunked)

    def test_status_below_100(self) -> None:
        """Status 099 is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 099 X"))

    def test_status_above_599(self) -> None:
        """Status 600 is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 600 X"))

    def test_status_four_digits(self) -> None:
        """A four-digit status is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 2000 X"))

    def test_status_two_digits(self) -> None:
        """A two-digit status is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 20 X"))

    def test_status_line_without_reason_space(self) -> None:
        """A status line with no space and no reason is accepted: it is unambiguous."""
        head = parse_response(self, response(status_line=b"HTTP/1.1 200"))
        self.assertEqual((head.status, head.reason), (200, b""))

    def test_status_line_reason_without_space(self) -> None:
        """A reason glued to the status code is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 200OK"))

    def test_status_line_lowercase_version(self) -> None:
        """A lowercase protocol name is 502."""
        self.assert_bad_gateway(response(status_line=b"http/1.1 200 OK"))

    def test_status_line_http2(self) -> None:
        """An HTTP/2.0 status line is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/2.0 200 OK"))

    def test_status_line_garbage(self) -> None:
        """Something that is not a status line at all is 502."""
        self.assert_bad_gateway(response(status_line=b"<html>"))

    def test_nul_in_reason(self) -> None:
        """A NUL in the reason phrase is 502."""
        self.assert_bad_gateway(response(status_line=b"HTTP/1.1 200 O\x00K"))

    def test_nul_in_field_value(self) -> None:
        """A NUL in a field value is 502."""
        self.assert_bad_gateway(response(b"X-A: a\x00b"))

    def test_obs_fold(self) -> None:
        """A folded field line is 502."""
        self.assert_bad_gateway(response(b"X-A: a", b" b"))

    def test_space_before_colon(self) -> None:
        """Whitespace between field name and colon is 502."""
        self.assert_bad_gateway(response(b"X-A : a"))

    def test_content_length_and_transfer_encoding(self) -> None:
        """Both Content-Length and Transfer-Encoding is 502."""
        self.assert_bad_gateway(response(b"Content-Length: 5", b"Transfer-Encoding: chunked"))

    def test_differing_content_lengths(self) -> None:
        """Two different Content-Length values are 502."""
        self.assert_bad_gateway(response(b"Content-Length: 5", b"Content-Length: 6"))

    def test_differing_content_length_list(self) -> None:
        """Content-Length: 5, 6 is 502."""
        self.assert_bad_gateway(response(b"Content-Length: 5, 6"))

    def test_malformed_content_length(self) -> None:
        """Content-Length: 0x5 is 502."""
        self.assert_bad_gateway(response(b"Content-Length: 0x5"))

    def test_transfer_encoding_in_http10(self) -> None:
        """Transfer-Encoding in an HTTP/1.0 response is 502."""
        self.assert_bad_gateway(
            response(b"Transfer-Encoding: chunked", status_line=b"HTTP/1.0 200 OK")
        )

    def test_unknown_transfer_coding(self) -> None:
        """An unknown transfer coding from the origin is 502, not 501."""
        self.assert_bad_gateway(response(b"Transfer-Encoding: foo, chunked"))

    def test_chunked_twice(self) -> None:
        """Chunked applied twice is 502."""
        self.assert_bad_gateway(response(b"Transfer-Encoding: chunked, chunked"))

    def test_chunked_not_last(self) -> None:
        """Chunked followed by another coding is 502: it can't be re-framed as received."""
        self.assert_bad_gateway(response(b"Transfer-Encoding: chunked, gzip"))


def _response_head(status: int, *lines: bytes) -> ResponseHead:
    return parse_response_head(b"\r\n".join([b"HTTP/1.1 %d X" % status, *lines]))


class ResponseBodyKindTests(SynchronousTestCase):
    """L{response_body_kind} applies RFC 9112 section 6.3 in order."""

    def test_head_request(self) -> None:
        """A response to HEAD has no body, whatever its framing fields say."""
        for lines in ((b"Content-Length: 5",), (b"Transfer-Encoding: chunked",), ()):
            self.assertEqual(response_body_kind(_response_head(200, *lines), b"HEAD"), BODY_NONE)

    def test_informational(self) -> None:
        """1xx responses have no body."""
        for status in (100, 101, 103, 199):
            head = _response_head(status, b"Content-Length: 5")
            self.assertEqual(response_body_kind(head, b"GET"), BODY_NONE)

    def test_no_content(self) -> None:
        """204 has no body, even with Content-Length or chunked."""
        self.assertEqual(
            response_body_kind(_response_head(204, b"Content-Length: 5"), b"GET"), BODY_NONE
        )
        head = _response_head(204, b"Transfer-Encoding: chunked")
        self.assertEqual(response_body_kind(head, b"GET"), BODY_NONE)

    def test_not_modified(self) -> None:
        """304 has no body, even with Content-Length or chunked."""
        self.assertEqual(
            response_body_kind(_response_head(304, b"Content-Length: 5"), b"GET"), BODY_NONE
        )
        head = _response_head(304, b"Transfer-Encoding: chunked")
        self.assertEqual(response_body_kind(head, b"GET"), BODY_NONE)

    def test_chunked(self) -> None:
        """A response ending in chunked is chunked."""
        head = _response_head(200, b"Transfer-Encoding: gzip, chunked")
        self.assertEqual(response_body_kind(head, b"GET"), BODY_CHUNKED)

    def test_length(self) -> None:
        """A response with Content-Length, zero included, is length-delimited."""
        for value in (b"0", b"5"):
            head = _response_head(200, b"Content-Length: " + value)
            self.assertEqual(response_body_kind(head, b"POST"), BODY_LENGTH)

    def test_until_close(self) -> None:
        """A response without framing fields runs until the connection closes."""
        self.assertEqual(response_body_kind(_response_head(200), b"GET"), BODY_CLOSE)

    def test_coding_not_chunked(self) -> None:
        """A response whose last coding is not chunked runs until close."""
        head = _response_head(200, b"Transfer-Encoding: gzip")
        self.assertEqual(response_body_kind(head, b"GET"), BODY_CLOSE)


class TargetTests(SynchronousTestCase):
    """L{parse_absolute_target} and L{parse_authority} split targets strictly."""

    def assert_target(
        self, target: bytes, expected: tuple[bytes, str, int, bytes, bytes], method: bytes = b"GET"
    ) -> Target:
        """Assert that C{target} splits into scheme, host, port, authority and path."""
        t = parse_absolute_target(target, method)
        self.assertEqual((t.scheme, t.host, t.port, t.authority, t.path), expected)
        return t

    def assert_bad(self, target: bytes, method: bytes = b"GET") -> BadRequest:
        """Assert that C{target} is rejected with 400."""
        err: BadRequest = self.assertRaises(BadRequest, parse_absolute_target, target, method)
        self.assertEqual(err.status, 400)
        return err

    def test_http_default_port(self) -> None:
        """An http target without a port gets port 80."""
        self.assert_target(
            b"http://example.com/a", (b"http", "example.com", 80, b"example.com", b"/a")
        )

    def test_https_default_port(self) -> None:
        """An https target without a port gets port 443."""
        self.assert_target(
            b"https://example.com/", (b"https", "example.com", 443, b"example.com", b"/")
        )

    def test_explicit_port(self) -> None:
        """An explicit port is used; the authority keeps it as written."""
        self.assert_target(
            b"http://example.com:8080/x",
            (b"http", "example.com", 8080, b"example.com:8080", b"/x"),
        )
        self.assert_target(
            b"https://example.com:80/", (b"https", "example.com", 80, b"example.com:80", b"/")
        )

    def test_empty_port(self) -> None:
        """An empty port means the default one (RFC 3986 section 3.2.3)."""
        self.assert_target(
            b"http://example.com:/", (b"http", "example.com", 80, b"example.com:", b"/")
        )

    def test_ipv4(self) -> None:
        """An IPv4 address is a host."""
        self.assert_target(
            b"http://127.0.0.1:8000/", (b"http", "127.0.0.1", 8000, b"127.0.0.1:8000", b"/")
        )

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal loses its brackets in C{host} and keeps them in C{authority}."""
        self.assert_target(b"http://[::1]:8000/", (b"http", "::1", 8000, b"[::1]:8000", b"/"))
        self.assert_target(b"http://[::1]/", (b"http", "::1", 80, b"[::1]", b"/"))

    def test_ipv6_literal_normalised(self) -> None:
        """An IPv6 host is given in its compressed form."""
        t = parse_absolute_target(b"http://[0:0:0::1]/", b"GET")
        self.assertEqual(t.host, "::1")

    def test_host_lowercased(self) -> None:
        """The host is lowercased; the authority stays as written."""
        self.assert_target(
            b"http://Example.COM/", (b"http", "example.com", 80, b"Example.COM", b"/")
        )

    def test_uppercase_scheme(self) -> None:
        """The scheme is case-insensitive and lowercased."""
        self.assert_target(b"HTTP://a/", (b"http", "a", 80, b"a", b"/"))
        self.assert_target(b"HtTpS://a/", (b"https", "a", 443, b"a", b"/"))

    def test_websocket_schemes(self) -> None:
        """ws:// and wss:// targets are reached as http:// and https:// (RFC 6455 section 3)."""
        self.assert_target(b"ws://a/chat", (b"http", "a", 80, b"a", b"/chat"))
        self.assert_target(b"WSS://a/chat", (b"https", "a", 443, b"a", b"/chat"))
        self.assert_target(b"wss://a:8443", (b"https", "a", 8443, b"a:8443", b"/"))

    def test_empty_path(self) -> None:
        """An empty path becomes C{/}."""
        self.assert_target(
            b"http://example.com", (b"http", "example.com", 80, b"example.com", b"/")
        )

    def test_options_empty_path(self) -> None:
        """OPTIONS with an empty path asks about the server: C{*} (RFC 9112 section 3.2.4)."""
        self.assert_target(
            b"http://example.com", (b"http", "example.com", 80, b"example.com", b"*"), b"OPTIONS"
        )

    def test_options_with_path(self) -> None:
        """OPTIONS with a path keeps it."""
        self.assert_target(b"http://a/x", (b"http", "a", 80, b"a", b"/x"), b"OPTIONS")

    def test_query_without_path(self) -> None:
        """A query right after the authority gets a C{/} path before it."""
        self.assert_target(b"http://a?x=1", (b"http", "a", 80, b"a", b"/?x=1"))
        self.assert_target(b"http://a:81?x", (b"http", "a", 81, b"a:81", b"/?x"))

    def test_percent_encoding_untouched(self) -> None:
        """Percent-encoding and odd path characters pass through unchanged."""
        path = b"/a%2Fb/%2e%2E/c;p=1?q=%41&r=%zz/../"
        self.assert_target(b"http://a" + path, (b"http", "a", 80, b"a", path))

    def test_origin_form(self) -> None:
        """An origin-form target gets 400 explaining that this is a forward proxy."""
        err = self.assert_bad(b"/index.html")
        self.assertIn("forward proxy", err.reason)

    def test_asterisk_form(self) -> None:
        """An asterisk-form target gets the same forward-proxy explanation."""
        err = self.assert_bad(b"*", b"OPTIONS")
        self.assertIn("forward proxy", err.reason)

    def test_authority_form_for_get(self) -> None:
        """An authority-form target on a GET is 400."""
        self.assert_bad(b"example.com:80")

    def test_userinfo(self) -> None:
        """Userinfo in the target is 400."""
        self.assert_bad(b"http://user:pass@example.com/")
        self.assert_bad(b"http://user@example.com/")

    def test_port_zero(self) -> None:
        """Port 0 is 400."""
        self.assert_bad(b"http://a:0/")

    def test_port_too_large(self) -> None:
        """Port 65536 is 400."""
        self.assert_bad(b"http://a:65536/")

    def test_port_not_digits(self) -> None:
        """A port that is not digits is 400."""
        self.assert_bad(b"http://a:abc/")
        self.assert_bad(b"http://a:-1/")
        self.assert_bad(b"http://a:+80/")

    def test_port_too_long(self) -> None:
        """A six-digit port is 400."""
        self.assert_bad(b"http://a:123456/")

    def test_highest_port(self) -> None:
        """Port 65535 is accepted."""
        self.assert_target(b"http://a:65535/", (b"http", "a", 65535, b"a:65535", b"/"))

    def test_unknown_scheme(self) -> None:
        """A scheme other than http, https, ws or wss is 400."""
        self.assert_bad(b"ftp://example.com/")

    def test_missing_slashes(self) -> None:
        """C{http:example.com} is not absolute-form and is 400."""
        self.assert_bad(b"http:example.com/")

    def test_fragment(self) -> None:
        """A fragment has no place in a request target: 400."""
        self.assert_bad(b"http://a/x#frag")

    def test_empty_host(self) -> None:
        """An empty host is 400."""
        self.assert_bad(b"http:///x")
        self.assert_bad(b"http://:80/x")

    def test_bad_host_character(self) -> None:
        """A host with characters outside a plain reg-name is 400."""
        self.assert_bad(b"http://a!b/")
        self.assert_bad(b"http://a%62/")

    def test_malformed_ipv6(self) -> None:
        """Unclosed, invalid or trailing-garbage IPv6 literals are 400."""
        for authority in (b"[::1", b"[::g]", b"[::1]x", b"[::1]:80x", b"[127.0.0.1]", b"[]"):
            self.assert_bad(b"http://" + authority + b"/")

    def test_ipv6_zone_id(self) -> None:
        """An IPv6 zone ID is not URI syntax and is 400."""
        self.assert_bad(b"http://[fe80::1%eth0]/")
        self.assert_bad(b"http://[fe80::1%25eth0]/")

    def test_authority_with_port(self) -> None:
        """A CONNECT authority splits into host and port."""
        self.assertEqual(parse_authority(b"Example.com:443"), ("example.com", 443))
        self.assertEqual(parse_authority(b"[::1]:8443"), ("::1", 8443))

    def test_authority_default_port(self) -> None:
        """Without a port, the default port is used when one is given."""
        self.assertEqual(parse_authority(b"example.com", 80), ("example.com", 80))

    def test_authority_port_required(self) -> None:
        """Without a default, a missing or empty port is 400."""
        for authority in (b"example.com", b"example.com:", b"[::1]"):
            err = self.assertRaises(BadRequest, parse_authority, authority)
            self.assertEqual(err.status, 400)

    def test_authority_userinfo(self) -> None:
        """A CONNECT authority with userinfo is 400."""
        err = self.assertRaises(BadRequest, parse_authority, b"u@example.com:443")
        self.assertEqual(err.status, 400)

    def test_authority_extra_colon(self) -> None:
        """A second colon in a host:port authority is 400."""
        err = self.assertRaises(BadRequest, parse_authority, b"a:1:2")
        self.assertEqual(err.status, 400)


def _target(authority: bytes = b"example.com", path: bytes = b"/") -> Target:
    return parse_absolute_target(b"http://" + authority + path, b"GET")


def _field_lines(serialized: bytes) -> list[bytes]:
    """The field lines of a serialised head (without its first line and final empty line)."""
    assert serialized.endswith(b"\r\n\r\n")
    return serialized[:-4].split(b"\r\n")[1:]


def _names(serialized: bytes) -> list[bytes]:
    return [line.partition(b":")[0].lower() for line in _field_lines(serialized)]


class SerializeRequestTests(SynchronousTestCase):
    """L{serialize_request_head} writes what the origin gets."""

    def test_simple(self) -> None:
        """The origin gets an origin-form HTTP/1.1 request, Host first and Via last."""
        head = parse_request_head(
            b"GET http://example.com:8080/a?b HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*"
        )
        out = serialize_request_head(head, _target(b"example.com:8080", b"/a?b"), b"aproxy")
        self.assertEqual(
            out,
            b"GET /a?b HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n"
            b"Via: 1.1 aproxy\r\n\r\n",
        )

    def test_host_from_target(self) -> None:
        """Host comes from the target; the client's own Host is dropped."""
        head = parse_request_head(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example")
        out = serialize_request_head(head, _target(b"a.example"), None)
        self.assertEqual(out, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")

    def test_http10_request(self) -> None:
        """An HTTP/1.0 request goes out as HTTP/1.1 with Via: 1.0 aproxy."""
        head = parse_request_head(b"GET http://a/ HTTP/1.0")
        out = serialize_request_head(head, _target(b"a"), b"aproxy")
        self.assertTrue(out.startswith(b"GET / HTTP/1.1\r\n"))
        self.assertIn(b"\r\nVia: 1.0 aproxy\r\n", out)

    def test_no_via(self) -> None:
        """With no pseudonym no Via field is added; the client's Via is kept."""
        head = parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nVia: 1.1 other")
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Via: 1.1 other"])

    def test_via_appended_after_client_via(self) -> None:
        """The proxy's Via comes after the one it received."""
        head = parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nVia: 1.1 other")
        out = serialize_request_head(head, _target(b"a"), b"aproxy")
        self.assertEqual(_field_lines(out)[-2:], [b"Via: 1.1 other", b"Via: 1.1 aproxy"])

    def test_hop_by_hop_removed(self) -> None:
        """Hop-by-hop fields and every field Connection names are not forwarded."""
        head = parse_request_head(
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n"
            b"Connection: X-Secret, keep-alive\r\n"
            b"X-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Proxy-Authorization: Basic xyz\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Sum\r\n"
            b"upgrade: websocket\r\n"
            b"X-Kept: 2"
        )
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"X-Kept: 2"])

    def test_fields_kept_in_order(self) -> None:
        """End-to-end fields keep their order, case and repetitions."""
        head = parse_request_head(
            b"GET http://a/ HTTP/1.1\r\nCookie: a=1\r\nHost: a\r\nX-A: 1\r\ncookie: b=2"
        )
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Cookie: a=1", b"X-A: 1", b"cookie: b=2"])

    def test_content_length_reemitted(self) -> None:
        """Content-Length is written by the proxy, in canonical form."""
        head = parse_request_head(b"POST http://a/ HTTP/1.1\r\nContent-length:  005\r\nHost: a")
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Content-Length: 5"])

    def test_zero_content_length_reemitted(self) -> None:
        """Content-Length: 0 is kept, so the origin knows there is no body."""
        head = parse_request_head(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0")
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertIn(b"\r\nContent-Length: 0\r\n", out)

    def test_transfer_encoding_reemitted(self) -> None:
        """Transfer-Encoding fields are merged into one written by the proxy."""
        head = parse_request_head(
            b"POST http://a/ HTTP/1.1\r\nHost: a\r\ntransfer-encoding: GZIP\r\n"
            b"Transfer-Encoding: chunked"
        )
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Transfer-Encoding: gzip, chunked"])

    def test_connection_naming_content_length_keeps_framing(self) -> None:
        """A Connection field naming Content-Length can't remove the proxy's framing."""
        head = parse_request_head(
            b"POST http://a/ HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 5"
        )
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Content-Length: 5"])

    def test_connection_naming_transfer_encoding_keeps_framing(self) -> None:
        """A Connection field naming Transfer-Encoding can't remove the proxy's framing."""
        head = parse_request_head(
            b"POST http://a/ HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\n"
            b"Transfer-Encoding: chunked"
        )
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a", b"Transfer-Encoding: chunked"])

    def test_connection_naming_host_keeps_host(self) -> None:
        """A Connection field naming Host can't remove the Host the proxy writes."""
        head = parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: host")
        out = serialize_request_head(head, _target(b"a"), None)
        self.assertEqual(_field_lines(out), [b"Host: a"])

    def test_extra_fields_replace_dropped(self) -> None:
        """Extra fields are added before Via, replacing the fields named in C{drop}."""
        head = parse_request_head(
            b"OPTIONS http://a/ HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\nX-A: 1"
        )
        out = serialize_request_head(
            head, _target(b"a"), b"aproxy", b"Max-Forwards: 2\r\n", (b"max-forwards",)
        )
        self.assertEqual(
            _field_lines(out), [b"Host: a", b"X-A: 1", b"Max-Forwards: 2", b"Via: 1.1 aproxy"]
        )


class SerializeResponseTests(SynchronousTestCase):
    """L{serialize_response_head} writes what the client gets."""

    def test_simple(self) -> None:
        """The client gets an HTTP/1.1 status line, the fields, framing and Via."""
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain")
        out = serialize_response_head(head, b"Content-Length: 5\r\n", b"aproxy", None)
        self.assertEqual(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Via: 1.1 aproxy\r\n\r\n",
        )

    def test_http10_response(self) -> None:
        """An HTTP/1.0 response goes out with an HTTP/1.1 status line and Via: 1.0."""
        head = parse_response_head(b"HTTP/1.0 404 Not Found")
        out = serialize_response_head(head, b"", b"aproxy", b"close")
        self.assertEqual(
            out, b"HTTP/1.1 404 Not Found\r\nVia: 1.0 aproxy\r\nConnection: close\r\n\r\n"
        )

    def test_empty_reason(self) -> None:
        """An empty reason phrase stays empty."""
        head = parse_response_head(b"HTTP/1.1 204 ")
        self.assertEqual(serialize_response_head(head, b"", None, None), b"HTTP/1.1 204 \r\n\r\n")

    def test_set_cookie_kept_separate(self) -> None:
        """Two Set-Cookie fields stay two, in order (RFC 9110 section 5.3)."""
        head = parse_response_head(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX: y\r\nSet-Cookie: b=2"
        )
        out = serialize_response_head(head, b"", None, None)
        self.assertEqual(
            _field_lines(out), [b"Set-Cookie: a=1; Path=/", b"X: y", b"Set-Cookie: b=2"]
        )

    def test_hop_by_hop_removed(self) -> None:
        """Hop-by-hop fields and every field Connection names are not forwarded."""
        head = parse_response_head(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: x-hop\r\n"
            b"X-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: close\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Sum\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Kept: 2"
        )
        out = serialize_response_head(head, b"", None, None)
        self.assertEqual(_field_lines(out), [b"X-Kept: 2"])

    def test_framing_replaced(self) -> None:
        """The origin's framing fields are dropped and the proxy's written instead."""
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y")
        out = serialize_response_head(head, b"Content-Length: 3\r\n", None, None)
        self.assertEqual(_field_lines(out), [b"X: y", b"Content-Length: 3"])
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3")
        out = serialize_response_head(head, b"", None, None)
        self.assertEqual(_field_lines(out), [])

    def test_connection_naming_content_length_keeps_framing(self) -> None:
        """A Connection field naming Content-Length can't remove the proxy's framing."""
        head = parse_response_head(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3"
        )
        out = serialize_response_head(head, b"Content-Length: 3\r\n", None, None)
        self.assertEqual(_field_lines(out), [b"Content-Length: 3"])

    def test_proxy_connection_field(self) -> None:
        """The proxy's own Connection field comes last."""
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive")
        out = serialize_response_head(head, b"", b"aproxy", b"close")
        self.assertEqual(_field_lines(out), [b"Via: 1.1 aproxy", b"Connection: close"])


class FramingFieldsTests(SynchronousTestCase):
    """L{framing_fields} writes the one framing field the proxy emits."""

    def test_length(self) -> None:
        """A length-delimited body gets Content-Length."""
        self.assertEqual(framing_fields(BODY_LENGTH, 12, None), b"Content-Length: 12\r\n")
        self.assertEqual(framing_fields(BODY_LENGTH, 0, None), b"Content-Length: 0\r\n")

    def test_chunked(self) -> None:
        """A chunked body gets Transfer-Encoding with chunked last, once."""
        self.assertEqual(
            framing_fields(BODY_CHUNKED, None, None), b"Transfer-Encoding: chunked\r\n"
        )
        self.assertEqual(
            framing_fields(BODY_CHUNKED, None, [b"gzip", b"chunked"]),
            b"Transfer-Encoding: gzip, chunked\r\n",
        )
        self.assertEqual(
            framing_fields(BODY_CHUNKED, None, [b"gzip"]), b"Transfer-Encoding: gzip, chunked\r\n"
        )

    def test_none(self) -> None:
        """No body and a body delimited by close get no framing field."""
        self.assertEqual(framing_fields(BODY_NONE, None, None), b"")
        self.assertEqual(framing_fields(BODY_CLOSE, None, None), b"")


# Strategies for the property tests: valid request heads built from their parts.
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_tokens = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
_value_chars = st.binary(min_size=1, max_size=1).filter(
    lambda b: 0x21 <= b[0] <= 0x7E or b[0] >= 0x80
)
_values = st.lists(
    st.tuples(
        st.lists(_value_chars, min_size=1, max_size=6).map(b"".join),
        st.sampled_from([b" ", b"\t", b"  "]),
    ),
    max_size=4,
).map(lambda parts: b"".join(word + sep for word, sep in parts).rstrip(b" \t"))
_framing_free_names = _tokens.filter(
    lambda n: (
        n.lower()
        not in {
            b"host",
            b"content-length",
            b"transfer-encoding",
            b"connection",
            b"proxy-connection",
        }
    )
)
_fields = st.lists(st.tuples(_framing_free_names, _values), max_size=8)
_paths = st.lists(
    st.sampled_from([b"/", b"a", b"%2F", b"?", b"=", b"&", b"~", b"."]), max_size=10
).map(lambda parts: b"/" + b"".join(parts))


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    method = draw(_tokens)
    minor = draw(st.sampled_from([0, 1]))
    lines = [method + b" http://example.com" + draw(_paths) + b" HTTP/1.%d" % minor]
    fields = draw(_fields)
    if minor or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"example.com"))
    framing = draw(st.sampled_from([None, b"Content-Length", b"Transfer-Encoding"]))
    if framing == b"Content-Length":
        fields.append((framing, b"%d" % draw(st.integers(0, 10**12))))
    elif framing is not None and minor:
        fields.append((framing, draw(st.sampled_from([b"chunked", b"gzip, chunked"]))))
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"x, y"]))))
    lines += [name + b":" + draw(st.sampled_from([b"", b" ", b"\t"])) + v for name, v in fields]
    leading = b"\r\n" * draw(st.integers(0, 2))
    return leading + b"\r\n".join(lines) + b"\r\n\r\n"


def _summary(head: RequestHead) -> tuple[object, ...]:
    return (
        head.method,
        head.target,
        head.minor,
        head.fields,
        head.connection,
        head.keep_alive,
        head.content_length,
        head.codings,
    )


_junk = st.lists(
    st.sampled_from(
        [
            b"GET",
            b" ",
            b"\t",
            b"\r\n",
            b"\r",
            b"\n",
            b"\x00",
            b":",
            b",",
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"chunked",
            b"close",
            b"5",
            b"-",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"http://a/",
            b"[::1]",
            b"\xff",
        ]
    ),
    max_size=40,
).map(b"".join)


class PropertyTests(SynchronousTestCase):
    """Properties over generated input: feeding order never matters, errors stay typed."""

    @_SETTINGS
    @given(_requests(), st.lists(st.integers(0, 400), max_size=6))
    def test_whole_and_split_agree(self, data: bytes, cuts: list[int]) -> None:
        """A valid head parses the same whole, byte by byte and cut anywhere."""
        whole = HeadReader(MAX_SIZE, MAX_LINE)
        raw = whole.feed(data + TRAILING)
        assert raw is not None
        self.assertEqual(whole.rest, TRAILING)
        expected = _summary(parse_request_head(raw))

        bytewise = HeadReader(MAX_SIZE, MAX_LINE)
        results = [bytewise.feed(piece) for piece in byte_pieces(data)]
        self.assertEqual(results[:-1], [None] * (len(data) - 1))
        self.assertEqual(results[-1], raw)

        split = HeadReader(MAX_SIZE, MAX_LINE)
        bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
        # The last piece brings the first bytes after the head with it, as TCP may.
        pieces = [data[a:b] for a, b in pairwise(bounds)]
        pieces[-1] += TRAILING
        got = [split.feed(piece) for piece in pieces]
        self.assertEqual([g for g in got if g is not None], [raw])
        self.assertEqual(got[-1], raw)
        self.assertEqual(split.rest, TRAILING)
        self.assertEqual(_summary(parse_request_head(raw)), expected)

    @_SETTINGS
    @given(st.one_of(st.binary(max_size=200), _junk), st.lists(st.integers(0, 200), max_size=4))
    def test_junk_raises_only_proxy_errors(self, data: bytes, cuts: list[int]) -> None:
        """Arbitrary bytes give heads, "need more" or a L{ProxyError}, never another error."""
        bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
        reader = HeadReader(1024, 512)
        try:
            for a, b in pairwise(bounds):
                raw = reader.feed(data[a:b])
                while raw is not None:
                    head = parse_request_head(raw)
                    if head.method != b"CONNECT":
                        parse_absolute_target(head.target, head.method)
                    rest, reader.rest = reader.rest, b""
                    raw = reader.feed(rest) if rest else None
        except ProxyError as e:
            self.assertIn(e.status, (400, 414, 431, 501, 505))

    @_SETTINGS
    @given(st.one_of(st.binary(max_size=200), _junk))
    def test_junk_responses_raise_only_bad_gateway(self, data: bytes) -> None:
        """Arbitrary bytes from an origin give a head, "need more" or a 502."""
        reader = HeadReader(1024, 1024, is_request=False)
        try:
            raw = reader.feed(data)
            if raw is not None:
                head = parse_response_head(raw)
                response_body_kind(head, b"GET")
        except ProxyError as e:
            self.assertIsInstance(e, BadGateway)
