"""
Tests for L{aproxy.socks.wire}: the sans-IO SOCKS5 handshake, UDP header and reply codes.

Each accepted message is read whole, one byte at a time (no event until its last byte)
and with bytes after it (left for the next step untouched); each refusal has its own
test with its exact reply code.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from aproxy.errors import (
    BadGateway,
    Forbidden,
    GatewayTimeout,
    InternalError,
    NotImplementedByProxy,
    ServiceUnavailable,
)
from aproxy.socks.wire import (
    ADDRESS_NOT_SUPPORTED,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    METHOD_NO_ACCEPTABLE,
    METHOD_NONE,
    METHOD_USERPASS,
    NOT_ALLOWED,
    TTL_EXPIRED,
    Credentials,
    Datagram,
    Greeting,
    Request,
    ServerHandshake,
    SocksError,
    datagram_header,
    encode_address,
    parse_datagram,
    reply,
    reply_for,
    select_method,
)

GREETING = b"\x05\x02\x00\x02"
LOGIN = b"\x01\x04user\x06secret"
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
CONNECT_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
CONNECT_V6 = b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x1f\x90"


def one_by_one(hs: ServerHandshake, data: bytes) -> object:
    """Feed C{data} a byte at a time: no event before the last byte; return the event."""
    for i in range(len(data) - 1):
        hs.feed(data[i : i + 1])
        if hs.next_event() is not None:
            raise AssertionError(f"an event after {i + 1} of {len(data)} bytes")
    hs.feed(data[-1:])
    return hs.next_event()


def at_request(login: bool = False) -> ServerHandshake:
    """A handshake that has answered its greeting (and login) and waits for the request."""
    hs = ServerHandshake()
    hs.feed(GREETING)
    hs.next_event()
    if login:
        hs.choose(METHOD_USERPASS)
        hs.feed(LOGIN)
        hs.next_event()
        hs.login_result(True)
    else:
        hs.choose(METHOD_NONE)
    return hs


class GreetingTests(SynchronousTestCase):
    """The version identifier/method selection message."""

    def test_whole(self) -> None:
        """A greeting fed whole gives the methods offered."""
        hs = ServerHandshake()
        hs.feed(GREETING)
        self.assertEqual(hs.next_event(), Greeting(b"\x00\x02"))

    def test_byte_by_byte(self) -> None:
        """A greeting fed a byte at a time gives its event at the last byte only."""
        self.assertEqual(one_by_one(ServerHandshake(), GREETING), Greeting(b"\x00\x02"))

    def test_no_event_until_answered(self) -> None:
        """Bytes after the greeting wait until the greeting is answered."""
        hs = ServerHandshake()
        hs.feed(GREETING + CONNECT_NAME)
        hs.next_event()
        self.assertIsNone(hs.next_event())
        self.assertEqual(hs.choose(METHOD_NONE), b"\x05\x00")
        self.assertEqual(hs.next_event(), Request(CMD_CONNECT, "example.com", 443, ATYP_DOMAIN))

    def test_not_socks5_closes_without_reply(self) -> None:
        """A first byte other than 5 (SOCKS4, HTTP) is refused with no reply at all."""
        for first in (b"\x04\x01", b"GET / HTTP/1.1\r\n"):
            hs = ServerHandshake()
            hs.feed(first)
            with self.assertRaises(SocksError) as caught:
                hs.next_event()
            self.assertIsNone(caught.exception.reply)

    def test_zero_methods(self) -> None:
        """A greeting offering no method is complete, and no method is acceptable."""
        hs = ServerHandshake()
        hs.feed(b"\x05\x00")
        event = hs.next_event()
        self.assertEqual(event, Greeting(b""))
        self.assertEqual(select_method(b"", False), METHOD_NO_ACCEPTABLE)

    def test_no_acceptable_method_reply(self) -> None:
        """Answering 0xFF sends it, and nothing more is read from the client."""
        hs = ServerHandshake()
        hs.feed(b"\x05\x01\x02" + CONNECT_NAME)
        hs.next_event()
        self.assertEqual(hs.choose(METHOD_NO_ACCEPTABLE), b"\x05\xff")
        self.assertIsNone(hs.next_event())

    def test_too_many_bytes(self) -> None:
        """A client that sends kilobytes before its request is refused without a reply."""
        hs = ServerHandshake()
        with self.assertRaises(SocksError) as caught:
            hs.feed(b"\x05\x01\x00" + b"x" * 4096)
        self.assertIsNone(caught.exception.reply)


class SelectMethodTests(SynchronousTestCase):
    """Which method answers which offer."""

    def test_no_login(self) -> None:
        """Without --auth, no authentication, if offered."""
        self.assertEqual(select_method(b"\x00\x02", False), METHOD_NONE)
        self.assertEqual(select_method(b"\x02", False), METHOD_NO_ACCEPTABLE)

    def test_login(self) -> None:
        """With --auth, username/password only: no authentication is not acceptable."""
        self.assertEqual(select_method(b"\x00\x02", True), METHOD_USERPASS)
        self.assertEqual(select_method(b"\x00", True), METHOD_NO_ACCEPTABLE)
        self.assertEqual(select_method(b"\x01", True), METHOD_NO_ACCEPTABLE)


class LoginTests(SynchronousTestCase):
    """RFC 1929 username/password."""

    def chosen(self) -> ServerHandshake:
        hs = ServerHandshake()
        hs.feed(GREETING)
        hs.next_event()
        self.assertEqual(hs.choose(METHOD_USERPASS), b"\x05\x02")
        return hs

    def test_whole(self) -> None:
        """The credentials fed whole."""
        hs = self.chosen()
        hs.feed(LOGIN)
        self.assertEqual(hs.next_event(), Credentials(b"user", b"secret"))

    def test_byte_by_byte(self) -> None:
        """The credentials fed a byte at a time: the event at the last byte."""
        self.assertEqual(one_by_one(self.chosen(), LOGIN), Credentials(b"user", b"secret"))

    def test_empty_password(self) -> None:
        """A zero-length password is read (and left to the authenticator to refuse)."""
        hs = self.chosen()
        hs.feed(b"\x01\x01u\x00")
        self.assertEqual(hs.next_event(), Credentials(b"u", b""))

    def test_success_then_request(self) -> None:
        """Success is status 0, and the request follows."""
        hs = self.chosen()
        hs.feed(LOGIN + CONNECT_V4)
        hs.next_event()
        self.assertIsNone(hs.next_event())
        self.assertEqual(hs.login_result(True), b"\x01\x00")
        self.assertEqual(hs.next_event(), Request(CMD_CONNECT, "127.0.0.1", 80, ATYP_IPV4))

    def test_failure(self) -> None:
        """Failure is a non-zero status, and nothing more is read."""
        hs = self.chosen()
        hs.feed(LOGIN + CONNECT_V4)
        hs.next_event()
        self.assertEqual(hs.login_result(False), b"\x01\x01")
        self.assertIsNone(hs.next_event())

    def test_wrong_version(self) -> None:
        """A subnegotiation version other than 1 is refused without a reply."""
        hs = self.chosen()
        hs.feed(b"\x05\x04user\x06secret")
        with self.assertRaises(SocksError) as caught:
            hs.next_event()
        self.assertIsNone(caught.exception.reply)

    def test_answers_out_of_turn(self) -> None:
        """Answering a message that was not received is a bug in the caller."""
        hs = ServerHandshake()
        self.assertRaises(ValueError, hs.login_result, True)
        self.assertRaises(ValueError, hs.choose, METHOD_NONE)


class RequestTests(SynchronousTestCase):
    """The request and its address types."""

    def check(self, data: bytes, expected: Request, login: bool = False) -> None:
        """C{data} gives C{expected} fed whole, byte by byte and with bytes after it."""
        hs = at_request(login)
        hs.feed(data)
        self.assertEqual(hs.next_event(), expected)
        self.assertEqual(hs.rest, b"")
        self.assertEqual(one_by_one(at_request(login), data), expected)
        hs = at_request(login)
        hs.feed(data + b"\x16\x03\x01early")
        self.assertEqual(hs.next_event(), expected)
        self.assertEqual(hs.rest, b"\x16\x03\x01early")
        self.assertIsNone(hs.next_event())

    def test_domain(self) -> None:
        """A CONNECT to a name (lowercased)."""
        self.check(
            CONNECT_NAME.replace(b"example", b"EXAMPLE"),
            Request(CMD_CONNECT, "example.com", 443, ATYP_DOMAIN),
        )

    def test_ipv4(self) -> None:
        """A CONNECT to an IPv4 address."""
        self.check(CONNECT_V4, Request(CMD_CONNECT, "127.0.0.1", 80, ATYP_IPV4))

    def test_ipv6(self) -> None:
        """A CONNECT to an IPv6 address, in its compressed text form."""
        self.check(CONNECT_V6, Request(CMD_CONNECT, "::1", 8080, ATYP_IPV6))

    def test_after_login(self) -> None:
        """The request after a successful login."""
        self.check(CONNECT_V4, Request(CMD_CONNECT, "127.0.0.1", 80, ATYP_IPV4), login=True)

    def test_udp_associate(self) -> None:
        """UDP ASSOCIATE with 0.0.0.0:0 (the client's address is not known yet)."""
        self.check(
            b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
            Request(CMD_UDP_ASSOCIATE, "0.0.0.0", 0, ATYP_IPV4),
        )

    def test_bind(self) -> None:
        """BIND is parsed (the protocol answers it with 0x07)."""
        self.check(
            CONNECT_V4.replace(b"\x05\x01", b"\x05\x02", 1), Request(CMD_BIND, "127.0.0.1", 80, 1)
        )

    def test_name_that_is_an_address(self) -> None:
        """An IP literal sent as a name is that address (the rules judge it as one)."""
        self.check(
            b"\x05\x01\x00\x03\x0810.0.0.1\x00\x50",
            Request(CMD_CONNECT, "10.0.0.1", 80, ATYP_DOMAIN),
        )

    def refused(self, data: bytes) -> SocksError:
        hs = at_request()
        hs.feed(data)
        try:
            hs.next_event()
        except SocksError as e:
            return e
        raise AssertionError("not refused")

    def test_unknown_command(self) -> None:
        """An unknown command is 0x07, after the whole request was read."""
        self.assertEqual(self.refused(b"\x05\x09" + CONNECT_V4[2:]).reply, COMMAND_NOT_SUPPORTED)

    def test_unknown_address_type(self) -> None:
        """An unknown address type is 0x08 (its length can't be known: closed after)."""
        self.assertEqual(self.refused(b"\x05\x01\x00\x05abcdef").reply, ADDRESS_NOT_SUPPORTED)

    def test_wrong_version(self) -> None:
        """A request whose version is not 5 is a general failure (0x01)."""
        self.assertEqual(self.refused(b"\x04" + CONNECT_V4[1:]).reply, GENERAL_FAILURE)

    def test_bad_names(self) -> None:
        """Names no resolver could look up are 0x04: spaces, NUL, IDN bytes, long labels."""
        for name in (b"a b", b"a\x00b", "b\u00fccher".encode(), b"a" * 64 + b".com", b"", b"[::1]"):
            data = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
            self.assertEqual(self.refused(data).reply, HOST_UNREACHABLE, name)


class ReplyTests(SynchronousTestCase):
    """Encoding replies and addresses."""

    def test_success_ipv4(self) -> None:
        """A success reply carries the bound IPv4 address and port."""
        self.assertEqual(reply(0, "127.0.0.1", 1080), b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38")

    def test_success_ipv6(self) -> None:
        """An IPv6 bound address."""
        self.assertEqual(reply(0, "::1", 1), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01")

    def test_refusal_codes(self) -> None:
        """A refusal carries its code and a zero address, for every code."""
        for code in range(1, 9):
            self.assertEqual(reply(code), bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0)))

    def test_name(self) -> None:
        """A name is encoded with its length."""
        self.assertEqual(encode_address("a.example", 53), b"\x03\x09a.example\x00\x35")

    def test_name_too_long(self) -> None:
        """A name over 255 bytes can't be encoded."""
        self.assertRaises(ValueError, encode_address, "a" * 256, 1)


class DatagramTests(SynchronousTestCase):
    """The UDP request header (RFC 1928 section 7)."""

    def test_roundtrip(self) -> None:
        """A header built for an address parses back, with the data after it."""
        for host in ("192.0.2.1", "2001:db8::1", "dns.example"):
            data = datagram_header(host, 53) + b"payload"
            self.assertEqual(parse_datagram(data), Datagram(0, host, 53, b"payload"))

    def test_fragment_number(self) -> None:
        """FRAG is reported (the relay drops FRAG != 0)."""
        data = b"\x00\x00\x01" + encode_address("192.0.2.1", 53) + b"x"
        self.assertEqual(parse_datagram(data).frag, 1)

    def test_malformed(self) -> None:
        """Truncated headers, non-zero RSV and unknown address types are refused."""
        good = datagram_header("192.0.2.1", 53)
        for data in (b"", b"\x00\x00\x00", good[:-1], b"\x01" + good[1:], b"\x00\x00\x00\x09abcd"):
            self.assertRaises(SocksError, parse_datagram, data)

    def test_empty_payload(self) -> None:
        """A datagram may carry no data."""
        self.assertEqual(parse_datagram(datagram_header("::1", 1)).payload, b"")

    def test_port_bytes(self) -> None:
        """The port is big-endian."""
        self.assertEqual(datagram_header("192.0.2.1", 258)[-2:], struct.pack("!H", 258))


class ReplyForTests(SynchronousTestCase):
    """Which reply code answers which refusal."""

    def test_codes(self) -> None:
        """Rules 0x02, unreachable 0x04, refused 0x05, timeouts 0x06, the rest 0x01."""
        cases = [
            (Forbidden("no"), NOT_ALLOWED),
            (BadGateway("x", "dns_error"), HOST_UNREACHABLE),
            (BadGateway("x", "destination_unavailable"), HOST_UNREACHABLE),
            (BadGateway("x", "connection_refused"), CONNECTION_REFUSED),
            (BadGateway("x", "connection_timeout"), TTL_EXPIRED),
            (GatewayTimeout("x"), TTL_EXPIRED),
            (BadGateway("x", "connection_terminated"), GENERAL_FAILURE),
            (ServiceUnavailable("x"), GENERAL_FAILURE),
            (InternalError("x"), GENERAL_FAILURE),
            (NotImplementedByProxy("x"), COMMAND_NOT_SUPPORTED),
        ]
        for err, code in cases:
            self.assertEqual(reply_for(err), code, err)
