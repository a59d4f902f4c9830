"""
Upstream connections through parent proxies, on fake transports: the CONNECT and SOCKS5
handshakes, absolute-form requests to an HTTP parent, and the errors naming the parent.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import replace

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aproxy.config import ProxyConfig
from aproxy.observe.accesslog import format_squid
from aproxy.observe.records import Exchange
from aproxy.testing import Attempt, HalfCloseTransport
from aproxy.upstream.handshakes import HttpConnectHandshake, Socks5Handshake
from aproxy.upstream.protocol import UpstreamProtocol
from aproxy.upstream.tls import VerifyNote, tls_failure
from tests.support import ProxyTestCase

PARENT_AUTH = b"Proxy-Authorization: Basic " + base64.b64encode(b"pu:pp") + b"\r\n"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ParentTestCase(ProxyTestCase):
    """A proxy whose routes send destinations to parents, on fake transports."""

    config = ProxyConfig(upstream="http://pu:pp@parent.example:3128", connect_ports=None, via=None)

    def connect(self, attempt: Attempt) -> tuple[Protocol, HalfCloseTransport]:
        """Complete a dial on a fake transport; return the outermost layer and transport."""
        layer = attempt.factory.buildProtocol(None)
        assert isinstance(layer, Protocol)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 3128))
        layer.makeConnection(transport)
        attempt.deferred.callback(layer)
        return layer, transport


class HttpParentConnectTests(ParentTestCase):
    """Tunnels through an HTTP parent: CONNECT to it, then the same relay as direct."""

    def test_connect_through_parent(self) -> None:
        """
        The parent gets a CONNECT for the host as the client wrote it, with the parent's
        credentials; the client's 200 waits for the parent's, and early bytes follow.
        """
        self.proto.dataReceived(
            b"CONNECT Svc.Example:443 HTTP/1.1\r\nHost: x\r\n"
            b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n\r\nHELLO"
        )
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))
        layer, parent = self.connect(attempt)
        self.assertIsInstance(layer, HttpConnectHandshake)
        self.assertEqual(
            self.take(parent),
            b"CONNECT svc.example:443 HTTP/1.1\r\nHost: svc.example:443\r\n"
            + PARENT_AUTH
            + b"\r\n",
        )
        self.assertEqual(self.client.value(), b"")
        layer.dataReceived(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\nSERVER-FIRST")
        self.assertEqual(self.take(self.client), ESTABLISHED + b"SERVER-FIRST")
        self.assertEqual(self.take(parent), b"HELLO")
        self.proto.dataReceived(b"more")
        self.assertEqual(self.take(parent), b"more")
        layer.dataReceived(b"reply")
        self.assertEqual(self.take(self.client), b"reply")

    def test_ipv6_destination_in_brackets(self) -> None:
        """An IPv6 destination is written in brackets in the CONNECT to the parent."""
        self.proto.dataReceived(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: x\r\n\r\n")
        _, parent = self.connect(self.connector.attempts[0])
        self.assertTrue(parent.value().startswith(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n"))

    def test_interim_response_then_200(self) -> None:
        """A 1xx from the parent is skipped; the 2xx after it opens the tunnel."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.client.value(), ESTABLISHED)

    def test_answer_byte_by_byte(self) -> None:
        """The parent's answer may arrive in any pieces."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        for i, byte in enumerate(b"HTTP/1.1 200 OK\r\n\r\n"):
            self.assertEqual(self.client.value(), b"", f"after {i} bytes")
            layer.dataReceived(bytes([byte]))
        layer.dataReceived(b"Z")
        self.assertEqual(self.client.value(), ESTABLISHED + b"Z")

    def test_parent_407_is_502(self) -> None:
        """A 407 from the parent is a 502 naming the parent, and its connection closes."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), value)
        self.assertIn(
            b"Proxy-Status: aproxy; error=destination_unavailable; "
            b'details="parent http://parent.example:3128 answered 407"',
            value,
        )
        self.assertIn(b"http://parent.example:3128 refused the tunnel", value)
        self.assertIn(b"credentials", value)
        self.assertTrue(parent.disconnecting)
        self.assertTrue(self.client.disconnecting)

    def test_parent_refusal_is_502(self) -> None:
        """Any other non-2xx answer is a 502 with the parent's status."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"answered 403 Forbidden", self.client.value())
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))

    def test_parent_closes_before_answering(self) -> None:
        """A parent that hangs up before answering is a 502 naming it."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        layer.connectionLost(Failure(error.ConnectionDone()))
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"parent proxy http://parent.example:3128 closed the connection", value)

    def test_parent_garbage(self) -> None:
        """An answer that is not HTTP is a 502 protocol error."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertIn(b"error=http_protocol_error", self.client.value())

    def test_tunnel_half_close_through_handshake_layer(self) -> None:
        """The parent's half-close reaches the client as one (the layer passes it on)."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        assert isinstance(layer, HttpConnectHandshake)
        layer.readConnectionLost()
        self.assertTrue(self.client.write_closed)
        self.assertFalse(parent.disconnecting)


class ParentHeadSizeTests(ParentTestCase):
    """The parent's answer to a CONNECT is held to C{max-head-size}, like any response head."""

    config = replace(ParentTestCase.config, max_head_size=2048)

    def test_answer_head_over_the_limit_is_502(self) -> None:
        """An answer head larger than C{max-head-size} is a 502; the tunnel never opens."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 3000 + b"\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "), value)
        self.assertIn(b"error=http_protocol_error", value)
        self.assertTrue(parent.disconnecting)


class ParentLargeHeadTests(ParentTestCase):
    """A raised C{max-head-size} lets a parent send a larger CONNECT answer."""

    config = replace(ParentTestCase.config, max_head_size=262144)

    def test_answer_head_within_a_raised_limit_opens_the_tunnel(self) -> None:
        """An answer head over 64 KiB but within the configured limit opens the tunnel."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        padding = b"X-Padding: " + b"p" * 100000 + b"\r\n"
        layer.dataReceived(b"HTTP/1.1 200 OK\r\n" + padding + b"\r\nFIRST")
        self.assertEqual(self.client.value(), ESTABLISHED + b"FIRST")
        self.assertFalse(parent.disconnecting)


class HttpParentRequestTests(ParentTestCase):
    """Plain requests go to an HTTP parent as proxy requests, sharing its connections."""

    def test_absolute_form_with_parent_credentials(self) -> None:
        """
        The parent gets the absolute-form target, the parent's credentials and not the
        client's; the response is relayed.
        """
        self.proto.dataReceived(
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n"
            b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n\r\n"
        )
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))
        layer, parent = self.connect(attempt)
        self.assertIsInstance(layer, UpstreamProtocol)
        self.assertEqual(
            self.take(parent),
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n" + PARENT_AUTH + b"\r\n",
        )
        layer.dataReceived(OK_2)
        self.assertEqual(self.take(self.client), OK_2)

    def test_parent_connection_reused_for_other_origins(self) -> None:
        """A second request to another origin reuses the idle connection to the parent."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        layer.dataReceived(OK_2)
        self.take(parent)
        self.proto.dataReceived(b"GET http://b.example:8081/ HTTP/1.1\r\nHost: b.example\r\n\r\n")
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertTrue(parent.value().startswith(b"GET http://b.example:8081/ HTTP/1.1\r\n"))

    def test_parent_407_is_502(self) -> None:
        """The parent's 407 becomes a 502: the client can't answer the parent's challenge."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        layer.dataReceived(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="parent"\r\nContent-Length: 0\r\n\r\n'
        )
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), value)
        self.assertNotIn(b"Proxy-Authenticate", value)
        self.assertIn(b"requires authentication (407)", value)
        self.assertTrue(parent.disconnecting)

    def test_parent_errors_relayed(self) -> None:
        """The parent's other error responses reach the client as they are."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        layer, _ = self.connect(self.connector.attempts[0])
        layer.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown")
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown",
        )

    def test_parent_refused(self) -> None:
        """A parent that refuses the connection is a 502 naming it."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.connector.attempts[0].deferred.errback(error.ConnectionRefusedError())
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"connection to parent proxy http://parent.example:3128 refused", value)
        self.assertIn(
            b'error=connection_refused; details="parent http://parent.example:3128"', value
        )

    def test_parent_unresolvable(self) -> None:
        """A parent name that doesn't resolve is a 502 dns_error naming it."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.connector.attempts[0].deferred.errback(error.DNSLookupError("parent.example"))
        self.assertIn(
            b"cannot resolve parent proxy http://parent.example:3128", self.client.value()
        )

    def test_parent_timeout(self) -> None:
        """A parent that can't be reached in time is a 504 naming it."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.connector.attempts[0].deferred.errback(error.TimeoutError())
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 504 "))
        self.assertIn(b"parent proxy http://parent.example:3128 timed out", value)

    def test_connect_timeout_names_parent(self) -> None:
        """A dial through a parent that outlasts the connect timeout is a 504 naming it."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        self.clock.advance(self.factory.config.connect_timeout + 1)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 504 "), value)
        self.assertIn(
            b"connecting to a.example:443 through parent proxy http://parent.example:3128",
            value,
        )
        self.assertTrue(parent.disconnecting)

    def test_https_target_tunnels_through_parent(self) -> None:
        """An https:// target goes through a CONNECT to the parent, then TLS."""
        self.proto.dataReceived(b"GET https://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        self.assertIsInstance(layer, HttpConnectHandshake)
        self.assertTrue(parent.value().startswith(b"CONNECT a.example:443 HTTP/1.1\r\n"))
        parent.clear()
        layer.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        # The TLS layer above the tunnel starts its handshake: a ClientHello record.
        self.assertEqual(parent.value()[:1], b"\x16")
        self.assertEqual(self.client.value(), b"")


class RouteSelectionTests(ParentTestCase):
    """Routes send some destinations to a parent and the rest directly."""

    config = ProxyConfig(
        route=("*.corp.example=http://10.1.2.3:3128", "*=direct"), connect_ports=None
    )

    def test_matching_host_goes_to_parent(self) -> None:
        """A host the first route matches is dialled through that parent."""
        self.proto.dataReceived(b"GET http://a.corp.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        attempt = self.connector.attempts[0]
        self.assertEqual((attempt.host, attempt.port), ("10.1.2.3", 3128))

    def test_other_host_goes_direct(self) -> None:
        """A host only the '*=direct' route matches is dialled directly."""
        self.proto.dataReceived(b"GET http://other.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        attempt = self.connector.attempts[0]
        self.assertEqual((attempt.host, attempt.port), ("other.example", 80))
        self.assertIs(attempt.factory, self.factory.upstream_factory)


class Socks5ParentTests(ParentTestCase):
    """Connections through a SOCKS5 parent (RFC 1928, RFC 1929 login)."""

    config = ProxyConfig(upstream="socks5://pu:pp@socks.example:1080", connect_ports=None, via=None)

    def start(self, request: bytes) -> tuple[Protocol, HalfCloseTransport]:
        """Send C{request} and connect to the parent."""
        self.proto.dataReceived(request)
        attempt = self.connector.attempts[0]
        self.assertEqual((attempt.host, attempt.port), ("socks.example", 1080))
        layer, parent = self.connect(attempt)
        self.assertIsInstance(layer, Socks5Handshake)
        return layer, parent

    def login(self, layer: Protocol, parent: HalfCloseTransport) -> None:
        """Go through the method choice and the login."""
        self.assertEqual(self.take(parent), b"\x05\x02\x00\x02")
        layer.dataReceived(b"\x05\x02")
        self.assertEqual(self.take(parent), b"\x01\x02pu\x02pp")
        layer.dataReceived(b"\x01\x00")

    def test_connect_by_name(self) -> None:
        """
        After the login the destination is sent as a name (remote DNS); a success reply
        opens the tunnel and bytes after it reach the client.
        """
        layer, parent = self.start(b"CONNECT Svc.Example:443 HTTP/1.1\r\nHost: x\r\n\r\nEARLY")
        self.login(layer, parent)
        self.assertEqual(
            self.take(parent), b"\x05\x01\x00\x03\x0bsvc.example" + struct.pack("!H", 443)
        )
        self.assertEqual(self.client.value(), b"")
        layer.dataReceived(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38FIRST")
        self.assertEqual(self.take(self.client), ESTABLISHED + b"FIRST")
        self.assertEqual(self.take(parent), b"EARLY")

    def test_reply_byte_by_byte(self) -> None:
        """Every SOCKS message may arrive split anywhere (here: a domain-name reply)."""
        layer, parent = self.start(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        for byte in b"\x05\x02":
            layer.dataReceived(bytes([byte]))
        for byte in b"\x01\x00":
            layer.dataReceived(bytes([byte]))
        reply = b"\x05\x00\x00\x03\x04host\x00\x50"
        for byte in reply:
            self.assertEqual(self.client.value(), b"")
            layer.dataReceived(bytes([byte]))
        self.assertEqual(self.client.value(), ESTABLISHED)

    def test_address_types(self) -> None:
        """IPv4 and IPv6 literals are sent as addresses, not names."""
        layer, parent = self.start(b"CONNECT [2001:db8::5]:22 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.login(layer, parent)
        self.assertEqual(
            self.take(parent),
            b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000005") + b"\x00\x16",
        )

    def test_ipv4_literal(self) -> None:
        """An IPv4 literal uses address type 1."""
        layer, parent = self.start(b"CONNECT 192.0.2.7:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.login(layer, parent)
        self.assertEqual(self.take(parent), b"\x05\x01\x00\x01\xc0\x00\x02\x07\x1f\x90")

    def test_login_refused(self) -> None:
        """A refused login is a 502 naming the parent."""
        layer, parent = self.start(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer.dataReceived(b"\x05\x02\x01\x01")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"socks5://socks.example:1080 refused the user name and password", value)
        self.assertTrue(parent.disconnecting)

    def test_connect_failure_reply(self) -> None:
        """A failure reply is a 502 saying what the parent reported."""
        layer, parent = self.start(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.login(layer, parent)
        layer.dataReceived(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
        value = self.client.value()
        self.assertIn(b"could not connect: connection refused", value)
        self.assertIn(b'details="parent socks5://socks.example:1080"', value)

    def test_not_socks(self) -> None:
        """A reply that is not SOCKS5 is a 502 protocol error."""
        layer, _ = self.start(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertIn(b"error=http_protocol_error", self.client.value())

    def test_plain_request_in_origin_form(self) -> None:
        """A plain http:// request through SOCKS5 reaches the origin in origin form."""
        layer, parent = self.start(b"GET http://a.example/p HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.login(layer, parent)
        self.take(parent)
        layer.dataReceived(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertEqual(self.take(parent), b"GET /p HTTP/1.1\r\nHost: a.example\r\n\r\n")
        layer.dataReceived(OK_2)
        self.assertEqual(self.client.value(), OK_2)

    def test_https_target_stack(self) -> None:
        """An https:// target through SOCKS5 has a TLS layer above the handshake."""
        layer, _ = self.start(b"GET https://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert isinstance(layer, Socks5Handshake)
        self.assertIsInstance(layer._inner, TLSMemoryBIOProtocol)


class Socks5NoCredentialsTests(ParentTestCase):
    """A SOCKS5 parent without credentials in its URL."""

    config = ProxyConfig(upstream="socks5://socks.example:1080", connect_ports=None)

    def test_offers_no_authentication_only(self) -> None:
        """Only 'no authentication' is offered; a parent that wants a login gets a 502."""
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        layer, parent = self.connect(self.connector.attempts[0])
        self.assertEqual(parent.value(), b"\x05\x01\x00")
        layer.dataReceived(b"\x05\xff")
        self.assertIn(b"requires a user name and password", self.client.value())


class TlsFailureTests(SynchronousTestCase):
    """How a TLS connection that ended before its handshake completed is explained."""

    def test_noted_certificate_problem(self) -> None:
        """What the verify callback noted is the reason, as tls_certificate_error."""
        note = VerifyNote()
        note.why = "the certificate has expired"
        err = tls_failure(Failure(SSL.Error([])), note, "a.example:443")
        self.assertEqual(err.status, 502)
        self.assertEqual(err.error_type, "tls_certificate_error")
        self.assertEqual(
            err.reason, "TLS certificate of a.example:443 refused: the certificate has expired"
        )

    def test_handshake_error(self) -> None:
        """An OpenSSL error without a note is a tls_protocol_error with its reason."""
        failure = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        err = tls_failure(failure, VerifyNote(), "a.example:443")
        self.assertEqual(err.error_type, "tls_protocol_error")
        self.assertEqual(err.details, "wrong version number")

    def test_closed_during_handshake(self) -> None:
        """A peer that hangs up mid-handshake is a tls_protocol_error saying so."""
        err = tls_failure(Failure(error.ConnectionDone()), VerifyNote(), "a.example:443")
        self.assertEqual(err.error_type, "tls_protocol_error")
        self.assertIn("closed the connection during the TLS handshake", err.reason)


class SquidHierarchyTests(SynchronousTestCase):
    """The Squid access-log format names the parent an exchange went through."""

    def test_default_parent(self) -> None:
        """A request through a parent is logged as DEFAULT_PARENT/<parent host>."""
        record = Exchange(
            0.0, "127.0.0.1", None, "GET", "http://a.example/", 200, 10, 50, 0.01,
            "http://10.1.2.3:3128", None,
        )  # fmt: skip
        self.assertIn(" DEFAULT_PARENT/10.1.2.3 ", format_squid(record))
