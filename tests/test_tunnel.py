"""
Tests for CONNECT tunnels and Upgrade pass-through (L{aproxy.client.tunnel},
L{aproxy.client.protocol}).
"""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure

from aproxy.config import ProxyConfig
from tests.support import ProxyTestCase

CONNECT_HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ConnectTests(ProxyTestCase):
    """CONNECT opens a raw tunnel to an allowed port."""

    def test_connect_pauses_client_until_origin_answers(self) -> None:
        """A CONNECT dials the origin and stops reading from the client meanwhile."""
        self.proto.dataReceived(CONNECT_HEAD)
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("example.com", 443))
        self.assertEqual(self.client.producerState, "paused")
        attempt.succeed()
        self.assertEqual(self.client.producerState, "producing")

    def test_established_head_has_no_framing(self) -> None:
        """The 200 answer carries neither Content-Length nor Transfer-Encoding."""
        self.forward(CONNECT_HEAD)
        self.assertEqual(self.client.value(), ESTABLISHED)

    def test_early_bytes_forwarded(self) -> None:
        """Bytes sent right after the CONNECT head reach the origin first, in order."""
        self.proto.dataReceived(CONNECT_HEAD + b"\x16\x03\x01hello")
        self.proto.dataReceived(b" more")
        upstream = self.connector.attempts[0].succeed()
        self.assertEqual(upstream.value(), b"\x16\x03\x01hello more")

    def test_bytes_relayed_both_ways(self) -> None:
        """After the 200, bytes flow unchanged in both directions; the server may speak first."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        attempt.respond(b"SSH-2.0-banner\r\n")
        self.assertEqual(self.client.value(), ESTABLISHED + b"SSH-2.0-banner\r\n")
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(upstream.value(), b"GET / HTTP/1.1\r\n\r\n")

    def test_producers_registered_both_ways(self) -> None:
        """Each transport is the other's streaming producer while the tunnel is open."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        self.assertIs(self.client.producer, upstream)
        self.assertIs(upstream.producer, self.client)
        self.assertTrue(self.client.streaming and upstream.streaming)
        self.assertEqual((self.client.bufferSize, upstream.bufferSize), (1 << 18, 1 << 18))

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal in brackets is dialed without brackets."""
        self.proto.dataReceived(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("::1", 443))

    def test_host_need_not_match(self) -> None:
        """The Host field of a CONNECT need not match its target."""
        self.proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: other\r\n\r\n")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_port_not_allowed_gets_403(self) -> None:
        """
        A CONNECT to a port outside --connect-ports gets 403 http_request_denied (a port
        rule, not an address problem) with a body naming the option and the setting that
        clients tunnelling plain http:// (undici, websockets) need.
        """
        self.proto.dataReceived(b"CONNECT example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertIn(b'Proxy-Status: aproxy; error=http_request_denied; details="port 80"', value)
        self.assertIn(b"--connect-ports", value)
        self.assertIn(b"--connect-ports 80,443", value)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.connector.attempts, [])

    def test_port_ranges_and_any(self) -> None:
        """connect_ports ranges and None (any port) are honoured."""
        config = ProxyConfig(connect_ports=((8000, 8010),))
        self.assertTrue(config.connect_allowed(8005))
        self.assertFalse(config.connect_allowed(443))
        self.assertTrue(ProxyConfig(connect_ports=None).connect_allowed(22))

    def test_missing_port_is_400(self) -> None:
        """A CONNECT target without a port is malformed."""
        self.proto.dataReceived(b"CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))

    def test_connect_with_body_is_400(self) -> None:
        """A CONNECT request with content is rejected."""
        self.proto.dataReceived(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))

    def test_refused_gets_502_and_close(self) -> None:
        """An origin that refuses gets 502 naming it, and the connection closes."""
        self.proto.dataReceived(CONNECT_HEAD)
        self.connector.attempts[0].deferred.errback(Failure(error.ConnectionRefusedError()))
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"example.com:443", value)
        self.assertTrue(self.client.disconnecting)

    def test_connect_timeout_gets_504(self) -> None:
        """An origin that never answers the dial gets 504 after the connect timeout."""
        self.proto.dataReceived(CONNECT_HEAD)
        self.clock.advance(self.config.connect_timeout)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 504 "))

    def test_client_half_close_passed_on(self) -> None:
        """A client half-close shuts the origin's write side; origin bytes still flow."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        self.proto.readConnectionLost()
        self.assertTrue(upstream.write_closed)
        self.assertFalse(upstream.disconnecting)
        attempt.respond(b"late")
        self.assertTrue(self.client.value().endswith(b"late"))
        attempt.close()
        self.assertTrue(self.client.disconnecting)

    def test_origin_half_close_passed_on(self) -> None:
        """An origin half-close shuts the client's write side; client bytes still flow."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        assert attempt.protocol is not None
        attempt.protocol.readConnectionLost()
        self.assertTrue(self.client.write_closed)
        self.assertFalse(self.client.disconnecting)
        self.proto.dataReceived(b"late")
        self.assertEqual(upstream.value(), b"late")
        self.proto.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(upstream.disconnecting)

    def test_half_close_before_tunnel_opens(self) -> None:
        """A client that half-closes right after CONNECT still gets its bytes through."""
        self.proto.dataReceived(CONNECT_HEAD + b"hello")
        self.proto.readConnectionLost()
        upstream = self.connector.attempts[0].succeed()
        self.assertEqual(upstream.value(), b"hello")
        self.assertTrue(upstream.write_closed)

    def test_origin_close_closes_client_after_flush(self) -> None:
        """When the origin closes, the client is closed (loseConnection, so data flushes)."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        attempt.respond(b"bye")
        attempt.close()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.client.value().endswith(b"bye"))

    def test_client_reset_closes_origin(self) -> None:
        """When the client connection is lost, the origin connection is closed."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(upstream.disconnecting)

    def test_idle_tunnel_closed(self) -> None:
        """A tunnel silent for the tunnel idle timeout is closed; activity keeps it open."""
        attempt, upstream = self.forward(CONNECT_HEAD)
        timeout = self.config.tunnel_idle_timeout
        self.clock.advance(timeout / 2)
        self.proto.dataReceived(b"x")
        self.clock.advance(timeout / 2 + 1)
        self.assertFalse(upstream.disconnecting)
        self.clock.pump([timeout / 10] * 12)
        self.assertTrue(upstream.disconnecting)
        self.assertTrue(self.client.disconnecting)

    def test_byte_counts(self) -> None:
        """The tunnel counts bytes in each direction."""
        attempt, upstream = self.forward(CONNECT_HEAD + b"abc")
        attempt.respond(b"12345")
        tunnel = self.proto._tunnel
        assert tunnel is not None
        self.assertEqual((tunnel.to_origin, tunnel.to_client), (3, 5))


UPGRADE = (
    b"GET http://ws.example/chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n"
)


class UpgradeTests(ProxyTestCase):
    """Upgrade requests keep Connection/Upgrade and switch to a tunnel on 101."""

    def test_upgrade_fields_forwarded(self) -> None:
        """Connection: Upgrade and Upgrade are forwarded for an upgrade request."""
        attempt, upstream = self.forward(UPGRADE)
        value = upstream.value()
        self.assertIn(b"Connection: Upgrade\r\nUpgrade: websocket\r\n", value)
        self.assertIn(b"Sec-WebSocket-Key: k\r\n", value)

    def test_101_switches_to_tunnel(self) -> None:
        """On 101 the response is relayed and bytes then flow raw both ways."""
        attempt, upstream = self.forward(UPGRADE)
        upstream.clear()
        attempt.respond(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: a\r\n\r\n\x81\x02hi"
        )
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertIn(b"Upgrade: websocket\r\n", value)
        self.assertIn(b"Connection: Upgrade\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\n\x81\x02hi"))
        self.proto.dataReceived(b"\x81\x82frame")
        self.assertEqual(upstream.value(), b"\x81\x82frame")
        self.assertIs(self.client.producer, upstream)

    def test_bytes_sent_before_101_forwarded_after(self) -> None:
        """Client bytes sent before the 101 are held and forwarded after the switch."""
        attempt, upstream = self.forward(UPGRADE + b"early")
        self.assertNotIn(b"early", upstream.value())
        upstream.clear()
        attempt.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual(upstream.value(), b"early")

    def test_refused_upgrade_continues_as_http(self) -> None:
        """A non-101 answer to an upgrade request is an ordinary response."""
        attempt, upstream = self.forward(UPGRADE)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        self.assertTrue(self.client.value().endswith(b"no"))
        self.assertFalse(self.client.disconnecting)
        self.assertIsNone(self.proto._tunnel)

    def test_101_without_upgrade_request_is_502(self) -> None:
        """A 101 to a request that did not ask to upgrade gets 502."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))

    def test_upgrade_stripped_without_connection_token(self) -> None:
        """An Upgrade field not named by Connection is hop-by-hop and removed."""
        attempt, upstream = self.forward(
            b"GET http://ws.example/ HTTP/1.1\r\nHost: ws.example\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertNotIn(b"Upgrade", upstream.value())
