"""
Tests for L{aproxy.http.body}: body framing decoders and the chunk writer.

Every decoded body is fed whole, one byte at a time (not done until the last byte) and
followed by trailing bytes (handed back untouched). Every rejection has its own test and
checks the status for both a request (400) and a response (502) decoder.
"""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aproxy.errors import BadGateway, BadRequest, ProxyError
from aproxy.http.body import ChunkedDecoder, LengthDecoder, UntilCloseDecoder, chunk

# What may follow a body: the next message. The decoders must not look at it.
TRAILING = b"GET http://x.example/ HTTP/1.1\r\n\n\r\x00\r\n\r\n"

_SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)


def byte_pieces(data: bytes) -> list[bytes]:
    """Split C{data} into one-byte pieces."""
    return [data[i : i + 1] for i in range(len(data))]


def feed_all(decoder: ChunkedDecoder | LengthDecoder, pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Feed C{pieces} in order; return the joined body data and the joined leftover bytes."""
    body = []
    rest = []
    for piece in pieces:
        got, left = decoder.feed(piece)
        for p in got:
            assert p, "a decoder returned an empty body piece"
        body += got
        rest.append(left)
    return b"".join(body), b"".join(rest)


def decode_three_ways(
    test: SynchronousTestCase, data: bytes, is_request: bool = True
) -> tuple[bytes, list[bytes]]:
    """
    Decode the complete chunked body C{data} whole, byte by byte and followed by trailing
    bytes, and split in two at every position; assert all ways agree.

    @return: The body data and the trailer field lines.
    """
    whole = ChunkedDecoder(is_request)
    body, rest = feed_all(whole, [data])
    test.assertTrue(whole.done)
    test.assertEqual(rest, b"")

    bytewise = ChunkedDecoder(is_request)
    pieces = byte_pieces(data)
    for i, piece in enumerate(pieces):
        test.assertFalse(bytewise.done, f"done after {i} of {len(data)} bytes")
        bytewise.feed(piece)
    test.assertTrue(bytewise.done)
    test.assertEqual(feed_all(ChunkedDecoder(is_request), pieces), (body, b""))

    trailing = ChunkedDecoder(is_request)
    test.assertEqual(feed_all(trailing, [data + TRAILING]), (body, TRAILING))

    late = ChunkedDecoder(is_request)
    test.assertEqual(feed_all(late, [*pieces[:-1], pieces[-1] + TRAILING]), (body, TRAILING))

    for i in range(1, len(data)):
        split = ChunkedDecoder(is_request)
        test.assertEqual(feed_all(split, [data[:i], data[i:] + TRAILING]), (body, TRAILING))
    test.assertEqual(whole.trailers, bytewise.trailers)
    test.assertEqual(whole.trailers, trailing.trailers)
    return body, whole.trailers


def _feed_pieces(decoder: ChunkedDecoder, pieces: list[bytes]) -> None:
    for piece in pieces:
        decoder.feed(piece)


def chunked_error(test: SynchronousTestCase, data: bytes, is_request: bool) -> ProxyError:
    """
    Feed C{data} whole and byte by byte; both must raise the same error.

    @return: The error raised for the whole body.
    """
    whole: ProxyError = test.assertRaises(ProxyError, ChunkedDecoder(is_request).feed, data)
    bytewise = test.assertRaises(
        ProxyError, _feed_pieces, ChunkedDecoder(is_request), byte_pieces(data)
    )
    test.assertIs(type(whole), type(bytewise))
    return whole


class LengthDecoderTests(SynchronousTestCase):
    """L{LengthDecoder} counts exactly C{Content-Length} bytes."""

    def test_exact(self) -> None:
        """Exactly the length in one piece is the whole body."""
        decoder = LengthDecoder(5)
        self.assertEqual(decoder.feed(b"hello"), ([b"hello"], b""))
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.remaining, 0)

    def test_byte_by_byte(self) -> None:
        """Fed one byte at a time, it is done exactly at the last byte."""
        decoder = LengthDecoder(5)
        for i, piece in enumerate(byte_pieces(b"hello")):
            self.assertFalse(decoder.done)
            self.assertEqual(decoder.remaining, 5 - i)
            self.assertEqual(decoder.feed(piece), ([piece], b""))
        self.assertTrue(decoder.done)

    def test_leftover_returned(self) -> None:
        """Bytes after the body are handed back untouched."""
        decoder = LengthDecoder(5)
        self.assertEqual(decoder.feed(b"hel"), ([b"hel"], b""))
        self.assertEqual(decoder.feed(b"lo" + TRAILING), ([b"lo"], TRAILING))
        self.assertTrue(decoder.done)

    def test_zero_length(self) -> None:
        """A zero length is done at once and every byte fed is leftover."""
        decoder = LengthDecoder(0)
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.feed(TRAILING), ([], TRAILING))

    def test_fed_after_done(self) -> None:
        """Once done, everything fed is leftover."""
        decoder = LengthDecoder(2)
        decoder.feed(b"ab")
        self.assertEqual(decoder.feed(b"cd"), ([], b"cd"))

    def test_empty_feed(self) -> None:
        """Feeding nothing returns nothing and changes nothing."""
        decoder = LengthDecoder(3)
        self.assertEqual(decoder.feed(b""), ([], b""))
        self.assertEqual(decoder.remaining, 3)
        self.assertFalse(decoder.done)

    def test_large_length(self) -> None:
        """A length larger than anything fed keeps counting down."""
        decoder = LengthDecoder(10**12)
        decoder.feed(b"x" * 1000)
        self.assertEqual(decoder.remaining, 10**12 - 1000)
        self.assertFalse(decoder.done)


class UntilCloseDecoderTests(SynchronousTestCase):
    """L{UntilCloseDecoder} passes everything on; only the connection's end ends it."""

    def test_everything_is_body(self) -> None:
        """Every byte, CRLFs and heads included, is body data."""
        decoder = UntilCloseDecoder()
        self.assertEqual(decoder.feed(TRAILING), ([TRAILING], b""))
        self.assertEqual(decoder.feed(b"0\r\n\r\n"), ([b"0\r\n\r\n"], b""))
        self.assertFalse(decoder.done)

    def test_empty_feed(self) -> None:
        """Feeding nothing returns no empty piece."""
        self.assertEqual(UntilCloseDecoder().feed(b""), ([], b""))


class ChunkTests(SynchronousTestCase):
    """L{chunk} frames body data as one chunk."""

    def test_chunk(self) -> None:
        """A piece becomes hex size, CRLF, data, CRLF."""
        self.assertEqual(chunk(b"hello"), [b"5\r\n", b"hello", b"\r\n"])
        self.assertEqual(chunk(b"x" * 26)[0], b"1a\r\n")

    def test_empty_chunk(self) -> None:
        """An empty piece frames as nothing: a zero-size chunk would end the body."""
        self.assertEqual(chunk(b""), [])

    def test_round_trip(self) -> None:
        """What L{chunk} writes, L{ChunkedDecoder} reads back."""
        pieces = [b"a", b"", b"b" * 300, b"\r\n"]
        data = b"".join(b"".join(chunk(p)) for p in pieces) + b"0\r\n\r\n"
        body, trailers = decode_three_ways(self, data)
        self.assertEqual(body, b"".join(pieces))
        self.assertEqual(trailers, [])


class ChunkedDecoderTests(SynchronousTestCase):
    """L{ChunkedDecoder} decodes valid chunked bodies however the bytes arrive."""

    def test_simple(self) -> None:
        """One chunk and the last chunk give the chunk's data."""
        body, trailers = decode_three_ways(self, b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual((body, trailers), (b"hello", []))

    def test_several_chunks(self) -> None:
        """Chunks are concatenated; sizes may be upper or lower case with leading zeros."""
        data = b"3\r\nabc\r\nA\r\n0123456789\r\n000b\r\nhello world\r\nf\r\n" + b"x" * 15
        body, _ = decode_three_ways(self, data + b"\r\n0\r\n\r\n")
        self.assertEqual(body, b"abc0123456789hello world" + b"x" * 15)

    def test_data_holds_crlf(self) -> None:
        """Chunk data may hold CRLFs and what looks like chunk sizes."""
        body, _ = decode_three_ways(self, b"7\r\n0\r\n\r\n\n\r\r\n0\r\n\r\n")
        self.assertEqual(body, b"0\r\n\r\n\n\r")

    def test_empty_body(self) -> None:
        """The last chunk alone is an empty body."""
        self.assertEqual(decode_three_ways(self, b"0\r\n\r\n"), (b"", []))

    def test_pieces_are_slices(self) -> None:
        """Body data comes back in order, without the framing, spread over feeds."""
        decoder = ChunkedDecoder()
        self.assertEqual(decoder.feed(b"5\r\nhe"), ([b"he"], b""))
        self.assertEqual(decoder.feed(b"llo\r\n3\r\nabc"), ([b"llo", b"abc"], b""))
        self.assertEqual(decoder.feed(b"\r\n0\r\n\r\nnext"), ([], b"next"))
        self.assertTrue(decoder.done)

    def test_fed_after_done(self) -> None:
        """Once done, everything fed is leftover."""
        decoder = ChunkedDecoder()
        decoder.feed(b"0\r\n\r\n")
        self.assertEqual(decoder.feed(b"5\r\nhello"), ([], b"5\r\nhello"))

    def test_trailers_kept(self) -> None:
        """Trailer field lines are validated and kept, each with its CRLF."""
        body, trailers = decode_three_ways(
            self, b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nx-other:\t1 2 \r\nEmpty:\r\n\r\n"
        )
        self.assertEqual(body, b"hello")
        self.assertEqual(trailers, [b"X-Sum: abc\r\n", b"x-other:\t1 2 \r\n", b"Empty:\r\n"])

    def test_extensions_accepted(self) -> None:
        """Chunk extensions, with or without values, are accepted and dropped."""
        for ext in (
            b";a",
            b";a=b",
            b";a=b;c;d=e",
            b" ;a",
            b"\t; a = b",
            b';a="quoted value"',
            b';a="with \\" escaped quote and \\\\ backslash"',
            b';a=""',
            b';a="tab\there"',
            b';a="obs-text \xe9"',
        ):
            body, _ = decode_three_ways(self, b"5" + ext + b"\r\nhello\r\n0" + ext + b"\r\n\r\n")
            self.assertEqual(body, b"hello", ext)

    def test_sixteen_hex_digits_accepted(self) -> None:
        """A size of 16 hex digits is a valid size line."""
        decoder = ChunkedDecoder()
        self.assertEqual(decoder.feed(b"ffffffffffffffff\r\nabc"), ([b"abc"], b""))
        self.assertFalse(decoder.done)

    def test_leading_zeros_in_last_chunk(self) -> None:
        """C{000} is a last chunk too."""
        self.assertEqual(decode_three_ways(self, b"000\r\n\r\n"), (b"", []))


class ChunkedDecoderRejectionTests(SynchronousTestCase):
    """Malformed chunked bodies are rejected: 400 from a client, 502 from an origin."""

    def assert_rejected(self, data: bytes) -> None:
        """Assert that C{data} is rejected as a request body and as a response body."""
        err = chunked_error(self, data, True)
        self.assertIsInstance(err, BadRequest)
        self.assertEqual(err.status, 400)
        err = chunked_error(self, data, False)
        self.assertIsInstance(err, BadGateway)
        self.assertEqual(err.status, 502)
        self.assertEqual(err.error_type, "http_protocol_error")

    def test_hex_prefix(self) -> None:
        """A size written C{0x5} is rejected."""
        self.assert_rejected(b"0x5\r\nhello\r\n0\r\n\r\n")

    def test_negative_size(self) -> None:
        """A size written C{-1} is rejected."""
        self.assert_rejected(b"-1\r\nx\r\n0\r\n\r\n")

    def test_plus_sign(self) -> None:
        """A size written C{+5} is rejected."""
        self.assert_rejected(b"+5\r\nhello\r\n0\r\n\r\n")

    def test_leading_space(self) -> None:
        """A size with leading whitespace is rejected."""
        self.assert_rejected(b" 5\r\nhello\r\n0\r\n\r\n")

    def test_trailing_space(self) -> None:
        """A size with trailing whitespace and no extension is rejected."""
        self.assert_rejected(b"5 \r\nhello\r\n0\r\n\r\n")

    def test_seventeen_hex_digits(self) -> None:
        """A size of 17 hex digits is rejected, even with leading zeros."""
        self.assert_rejected(b"00000000000000005\r\nhello\r\n0\r\n\r\n")

    def test_non_hex_size(self) -> None:
        """A size with a non-hex digit is rejected."""
        self.assert_rejected(b"5g\r\nhello\r\n0\r\n\r\n")

    def test_empty_size(self) -> None:
        """An empty size line is rejected."""
        self.assert_rejected(b"\r\nhello\r\n0\r\n\r\n")

    def test_extension_without_name(self) -> None:
        """C{;} alone is rejected."""
        self.assert_rejected(b"5;\r\nhello\r\n0\r\n\r\n")

    def test_extension_without_value(self) -> None:
        """C{;a=} is rejected."""
        self.assert_rejected(b"5;a=\r\nhello\r\n0\r\n\r\n")

    def test_extension_value_without_name(self) -> None:
        """C{;=b} is rejected."""
        self.assert_rejected(b"5;=b\r\nhello\r\n0\r\n\r\n")

    def test_extension_with_space_in_value(self) -> None:
        """An unquoted value with a space is rejected."""
        self.assert_rejected(b"5;a=b c\r\nhello\r\n0\r\n\r\n")

    def test_extension_unterminated_quote(self) -> None:
        """An unterminated quoted string is rejected."""
        self.assert_rejected(b'5;a="b\r\nhello\r\n0\r\n\r\n')

    def test_extension_escaped_closing_quote(self) -> None:
        """A quoted string whose closing quote is escaped is rejected."""
        self.assert_rejected(b'5;a="b\\"\r\nhello\r\n0\r\n\r\n')

    def test_extension_nul_in_quoted_string(self) -> None:
        """A NUL inside a quoted extension value is rejected."""
        self.assert_rejected(b'5;a="\x00"\r\nhello\r\n0\r\n\r\n')

    def test_extension_without_semicolon(self) -> None:
        """An extension not introduced by C{;} is rejected."""
        self.assert_rejected(b"5 a=b\r\nhello\r\n0\r\n\r\n")

    def test_extension_line_too_long(self) -> None:
        """A size line longer than 4096 bytes is rejected, even before its end."""
        self.assert_rejected(b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n")
        for is_request in (True, False):
            err = self.assertRaises(
                ProxyError, _feed_pieces, ChunkedDecoder(is_request), [b"5;a=", b"b" * 5000]
            )
            self.assertEqual(err.status, 400 if is_request else 502)

    def test_data_longer_than_size(self) -> None:
        """Chunk data longer than its size (no CRLF where expected) is rejected."""
        self.assert_rejected(b"3\r\nhello\r\n0\r\n\r\n")

    def test_missing_crlf_after_data(self) -> None:
        """Chunk data not followed by CRLF is rejected."""
        self.assert_rejected(b"5\r\nhello0\r\n\r\n")

    def test_cr_without_lf_after_data(self) -> None:
        """Chunk data followed by CR and something else is rejected."""
        self.assert_rejected(b"5\r\nhello\rX0\r\n\r\n")

    def test_bare_lf_after_data(self) -> None:
        """Chunk data followed by a bare LF is rejected."""
        self.assert_rejected(b"5\r\nhello\n0\r\n\r\n")

    def test_bare_lf_after_size(self) -> None:
        """A size line ending in bare LF is rejected."""
        self.assert_rejected(b"5\nhello\r\n0\r\n\r\n")

    def test_bare_lf_after_last_chunk(self) -> None:
        """A last-chunk line ending in bare LF is rejected."""
        self.assert_rejected(b"0\n\r\n")

    def test_bare_lf_ending_trailers(self) -> None:
        """A trailer section ending in bare LF is rejected."""
        self.assert_rejected(b"0\r\n\n")

    def test_bare_lf_after_trailer_field(self) -> None:
        """A trailer field line ending in bare LF is rejected."""
        self.assert_rejected(b"0\r\nX: y\n\r\n")

    def test_cr_inside_size_line(self) -> None:
        """A CR inside a size line is rejected."""
        self.assert_rejected(b"5\r\r\nhello\r\n0\r\n\r\n")

    def test_trailer_space_before_colon(self) -> None:
        """A trailer field with whitespace before the colon is rejected."""
        self.assert_rejected(b"0\r\nX : y\r\n\r\n")

    def test_trailer_bad_name(self) -> None:
        """A trailer field name that is not a token is rejected."""
        self.assert_rejected(b"0\r\nX y: z\r\n\r\n")

    def test_trailer_without_colon(self) -> None:
        """A trailer line without a colon is rejected."""
        self.assert_rejected(b"0\r\nnot a field\r\n\r\n")

    def test_trailer_obs_fold(self) -> None:
        """A folded trailer line is rejected."""
        self.assert_rejected(b"0\r\nX: y\r\n z\r\n\r\n")

    def test_trailer_nul(self) -> None:
        """A NUL in a trailer value is rejected."""
        self.assert_rejected(b"0\r\nX: a\x00b\r\n\r\n")

    def test_trailer_section_too_large(self) -> None:
        """A trailer section over 64 KiB is rejected."""
        field = b"X-Pad: " + b"p" * 4000 + b"\r\n"
        err = self.assertRaises(BadRequest, ChunkedDecoder().feed, b"0\r\n" + field * 17)
        self.assertEqual(err.status, 400)

    def test_request_and_response_errors_differ(self) -> None:
        """A request body error is the client's (no error type); a response's is the origin's."""
        request_err = self.assertRaises(BadRequest, ChunkedDecoder(True).feed, b"x\r\n")
        response_err = self.assertRaises(BadGateway, ChunkedDecoder(False).feed, b"x\r\n")
        self.assertIsNone(request_err.error_type)
        self.assertIn("origin", response_err.reason)


_bodies = st.lists(st.binary(min_size=0, max_size=64), max_size=8)
_trailers = st.lists(st.sampled_from([b"X-Sum: 1", b"x-t:", b"A: b c", b'Etag: "x"']), max_size=3)
_junk = st.lists(
    st.sampled_from(
        [
            b"0",
            b"5",
            b"f",
            b"ffffffffffffffffff",
            b";",
            b"=",
            b'"',
            b"\\",
            b"a",
            b" ",
            b"\t",
            b"\r\n",
            b"\r",
            b"\n",
            b"\x00",
            b":",
            b"hello",
            b"X",
        ]
    ),
    max_size=40,
).map(b"".join)


class ChunkedPropertyTests(SynchronousTestCase):
    """Properties of L{ChunkedDecoder} over generated input."""

    @_SETTINGS
    @given(_bodies, _trailers, st.lists(st.integers(0, 600), max_size=8), st.booleans())
    def test_round_trip_any_split(
        self, pieces: list[bytes], trailers: list[bytes], cuts: list[int], is_request: bool
    ) -> None:
        """A chunked body decodes to its data and trailers however it is cut."""
        data = b"".join(b"".join(chunk(p)) for p in pieces)
        data += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
        bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
        split = [data[a:b] for a, b in pairwise(bounds)]
        split[-1] += TRAILING
        decoder = ChunkedDecoder(is_request)
        self.assertEqual(feed_all(decoder, split), (b"".join(pieces), TRAILING))
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.trailers, [t + b"\r\n" for t in trailers])

    @_SETTINGS
    @given(st.one_of(st.binary(max_size=200), _junk), st.booleans())
    def test_junk_raises_only_proxy_errors(self, data: bytes, is_request: bool) -> None:
        """Arbitrary bytes give data, "need more" or the decoder's own error, nothing else."""
        decoder = ChunkedDecoder(is_request)
        try:
            feed_all(decoder, [data])
        except ProxyError as e:
            self.assertIsInstance(e, BadRequest if is_request else BadGateway)


class TrailerFilterTests(SynchronousTestCase):
    """Fields that must not be trailers are dropped from what is passed on."""

    def test_framing_and_routing_trailers_dropped(self) -> None:
        """Content-Length, Transfer-Encoding, Host and Connection trailers are not kept."""
        decoder = ChunkedDecoder(True)
        pieces, rest = decoder.feed(
            b"5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n"
            b"Host: evil.example\r\nConnection: close\r\nX-Checksum: abc\r\n\r\n"
        )
        self.assertTrue(decoder.done)
        self.assertEqual((b"".join(pieces), rest), (b"hello", b""))
        self.assertEqual(decoder.trailers, [b"X-Checksum: abc\r\n"])
