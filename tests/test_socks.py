"""
Tests for the SOCKS5 front end (L{aproxy.socks.protocol}, L{aproxy.socks.udp},
L{aproxy.socks.factory}) on fake transports and a fake clock: every reply code, the login
and the rules as the HTTP side applies them, the tunnel, the UDP relay and the records.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aproxy.access.auth import IAuthenticator, parse_basic_credentials
from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.observe.accesslog import format_combined, format_json
from aproxy.observe.records import Exchange
from aproxy.socks.factory import SocksCollector, SocksFactory
from aproxy.socks.protocol import REFUSED_WAIT, SocksProtocol
from aproxy.socks.udp import MAX_LOOKUPS
from aproxy.socks.wire import datagram_header, parse_datagram
from aproxy.testing import HalfCloseTransport, RecordingConnector

NO_AUTH = b"\x05\x01\x00"
USERPASS = b"\x05\x01\x02"
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
CONNECT_V4 = b"\x05\x01\x00\x01\xc0\x00\x02\x01\x01\xbb"
CONNECT_V6 = b"\x05\x01\x00\x04" + bytes.fromhex("20010db8" + "0" * 23 + "1") + b"\x01\xbb"
OK_METHOD = b"\x05\x00"


def refused(code: int) -> bytes:
    """The reply refusing a request with C{code}."""
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def login(user: bytes, password: bytes) -> bytes:
    """An RFC 1929 login message."""
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


@implementer(IAuthenticator)
class Authenticator:
    """Knows one user, alice/secret; checks wait when C{hold} is set."""

    realm = "aproxy"

    def __init__(self) -> None:
        self.hold = False
        self.checked: list[bytes | None] = []
        self.pending: list[Deferred[str | None]] = []

    def authenticate(self, credentials: bytes | None) -> Deferred[str | None]:
        """alice/secret is alice; anything else is nobody."""
        self.checked.append(credentials)
        parsed = parse_basic_credentials(credentials)
        user = parsed[0] if parsed == ("alice", b"secret") else None
        if self.hold:
            d: Deferred[str | None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(user)


class SocksTestCase(SynchronousTestCase):
    """A proxy factory on a fake clock and connector, its SOCKS5 factory, and a client."""

    config = ProxyConfig()

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(self.config, self.clock, self.connector)
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)
        self.socks = SocksFactory(self.factory, self.clock)
        self.client, self.proto = self.connect_client()

    def connect_client(
        self, host: str = "127.0.0.1", local: str = "127.0.0.1"
    ) -> tuple[HalfCloseTransport, SocksProtocol]:
        """A new SOCKS5 client connection from C{host} to C{local}."""
        kind = IPv6Address if ":" in host else IPv4Address
        peer = kind("TCP", host, 5000)
        proto = self.socks.buildProtocol(peer)
        here = (IPv6Address if ":" in local else IPv4Address)("TCP", local, 1080)
        client = HalfCloseTransport(hostAddress=here, peerAddress=peer)
        proto.makeConnection(client)
        return client, proto

    def take(self) -> bytes:
        """What the proxy wrote to the client since the last call."""
        value: bytes = self.client.value()
        self.client.clear()
        return value

    def request(self, data: bytes, greeting: bytes = NO_AUTH) -> bytes:
        """Greet without login and send C{data}; return the replies."""
        self.proto.dataReceived(greeting + data)
        return self.take()


class ConnectTests(SocksTestCase):
    """CONNECT to names and addresses, through the dialer, into a tunnel."""

    def test_connect_name(self) -> None:
        """A CONNECT to a name dials it and pauses the client until connected."""
        self.assertEqual(self.request(CONNECT_NAME), OK_METHOD)
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("example.com", 443))
        self.assertEqual(self.client.producerState, "paused")
        attempt.succeed()
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.take()[:2], b"\x05\x00")

    def test_connect_addresses(self) -> None:
        """IPv4 and IPv6 destinations are dialed as addresses."""
        self.request(CONNECT_V4)
        _, proto = self.connect_client()
        proto.dataReceived(NO_AUTH + CONNECT_V6)
        hosts = [(a.host, a.port) for a in self.connector.attempts]
        self.assertEqual(hosts, [("192.0.2.1", 443), ("2001:db8::1", 443)])

    def test_relay_both_ways_and_early_bytes(self) -> None:
        """Bytes sent with the request reach the origin first; then both ways."""
        self.request(CONNECT_NAME + b"\x16\x03\x01early")
        self.proto.dataReceived(b" more")
        upstream = self.connector.attempts[0].succeed()
        self.assertEqual(upstream.value(), b"\x16\x03\x01early more")
        self.take()
        self.connector.attempts[0].respond(b"from origin")
        self.assertEqual(self.take(), b"from origin")
        self.assertEqual(self.factory.tunnels, 1)

    def test_record_at_close(self) -> None:
        """A tunnel's end is one record: CONNECT, SOCKS5, 200, its bytes."""
        self.request(CONNECT_NAME)
        self.connector.attempts[0].succeed()
        self.proto.dataReceived(b"abc")
        self.connector.attempts[0].close()
        [record] = self.records
        self.assertEqual(
            (record.method, record.target, record.version, record.status, record.error),
            ("CONNECT", "example.com:443", "SOCKS5", 200, None),
        )
        self.assertEqual(record.bytes_to_origin, 3)
        self.assertEqual(self.factory.tunnels, 0)
        self.assertIn('"CONNECT example.com:443 SOCKS5" 200', format_combined(record))

    def test_half_close_passed_on(self) -> None:
        """The client's half-close shuts down the origin's write side."""
        self.request(CONNECT_NAME)
        upstream = self.connector.attempts[0].succeed()
        self.proto.readConnectionLost()
        self.assertTrue(upstream.write_closed)

    def test_sessions_gauge(self) -> None:
        """The session gauge counts open SOCKS5 connections."""
        self.assertEqual(self.socks.sessions, 1)
        families = {f.name: f for f in SocksCollector(self.socks).collect()}
        self.assertEqual(families["aproxy_socks_sessions"].samples[0].value, 1)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.socks.sessions, 0)
        self.assertNotIn(self.proto, self.factory.connections)


class RefusalTests(SocksTestCase):
    """Each refusal: its reply code, a close and one record."""

    config = ProxyConfig(deny_host=["blocked.example"], connect_ports="443,8443")

    def assert_refused(self, reply: bytes, code: int, status: int) -> None:
        self.assertEqual(reply, OK_METHOD + refused(code))
        self.assertTrue(self.client.disconnecting)
        [record] = self.records
        self.assertEqual(record.status, status)

    def test_denied_host(self) -> None:
        """--deny-host: 0x02 before any dial."""
        name = b"blocked.example"
        reply = self.request(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb")
        self.assert_refused(reply, 2, 403)
        self.assertEqual(self.connector.attempts, [])

    def test_port_not_allowed(self) -> None:
        """--connect-ports is the port rule: 0x02."""
        self.assert_refused(self.request(CONNECT_NAME[:-2] + b"\x00\x50"), 2, 403)

    def test_loop(self) -> None:
        """A CONNECT to the proxy's own listening address is a loop: 0x02."""
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8443))
        self.assert_refused(self.request(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x20\xfb"), 2, 403)

    def test_bind(self) -> None:
        """BIND: 0x07."""
        self.assert_refused(self.request(b"\x05\x02" + CONNECT_V4[2:]), 7, 501)

    def test_unknown_command(self) -> None:
        """An unknown command: 0x07."""
        self.assert_refused(self.request(b"\x05\x07" + CONNECT_V4[2:]), 7, 501)

    def test_unknown_address_type(self) -> None:
        """An unknown address type: 0x08."""
        self.assert_refused(self.request(b"\x05\x01\x00\x09abcdef"), 8, 501)

    def test_bad_version(self) -> None:
        """A request that is not SOCKS5: 0x01."""
        self.assert_refused(self.request(b"\x04" + CONNECT_V4[1:]), 1, 400)

    def test_not_socks5_at_all(self) -> None:
        """A client that does not speak SOCKS5 is closed without a reply."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.take(), b"")
        self.assertTrue(self.client.disconnecting)

    def dial_fails(self, failure: Exception) -> bytes:
        self.request(CONNECT_NAME)
        self.connector.attempts[0].deferred.errback(failure)
        return self.take()

    def test_refused(self) -> None:
        """A refused connection: 0x05."""
        self.assertEqual(self.dial_fails(error.ConnectionRefusedError()), refused(5))

    def test_dns_failure(self) -> None:
        """A name that does not resolve: 0x04."""
        self.assertEqual(self.dial_fails(error.DNSLookupError("x")), refused(4))

    def test_no_route(self) -> None:
        """No route to the host: 0x04."""
        self.assertEqual(self.dial_fails(error.NoRouteError()), refused(4))

    def test_connect_error_timeout(self) -> None:
        """The connector's timeout: 0x06."""
        self.assertEqual(self.dial_fails(error.TimeoutError()), refused(6))

    def test_connect_timeout(self) -> None:
        """No answer within --connect-timeout: 0x06, and the dial is cancelled."""
        self.request(CONNECT_NAME)
        d = self.connector.attempts[0].deferred
        self.clock.advance(self.config.connect_timeout)
        self.assertEqual(self.take(), refused(6))
        self.assertTrue(d.called)
        self.assertEqual(self.records[0].status, 504)

    def test_handshake_timeout(self) -> None:
        """A client that stops mid-handshake is closed after --header-timeout."""
        self.proto.dataReceived(b"\x05")
        self.clock.advance(self.config.header_timeout)
        self.assertTrue(self.client.disconnecting)

    def test_silent_connection_not_recorded(self) -> None:
        """A connection that closes without a byte (a port check) leaves no record."""
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.records, [])

    def test_no_acceptable_method(self) -> None:
        """Without --auth, a client offering only a login gets 0xFF and is closed."""
        self.proto.dataReceived(USERPASS)
        self.assertEqual(self.take(), b"\x05\xff")
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(len(self.records), 1)


class AdmissionTests(SocksTestCase):
    """--allow and the connection limits, as for HTTP clients."""

    config = ProxyConfig(allow=["10.0.0.0/8"], max_clients_per_ip=1)

    def test_client_not_allowed(self) -> None:
        """A client outside --allow is told 0x02 after a handshake without login."""
        self.assertEqual(self.request(CONNECT_NAME), OK_METHOD + refused(2))
        self.assertEqual(self.connector.attempts, [])

    def test_refused_client_held_briefly(self) -> None:
        """A refused client that says nothing is closed after a short wait, not the
        header timeout: it holds a connection slot meanwhile."""
        client, proto = self.connect_client("192.0.2.7")
        self.clock.advance(REFUSED_WAIT + 0.1)
        self.assertTrue(client.disconnecting)
        allowed, _ = self.connect_client("10.1.1.2")
        self.clock.advance(REFUSED_WAIT + 0.1)
        self.assertFalse(allowed.disconnecting)

    def test_too_many_from_one_address(self) -> None:
        """Past --max-clients-per-ip: 0x01 (general failure)."""
        self.connect_client("10.1.1.1")
        client, proto = self.connect_client("10.1.1.1")
        proto.dataReceived(NO_AUTH + CONNECT_NAME)
        self.assertEqual(client.value(), OK_METHOD + refused(1))


class LoginTests(SocksTestCase):
    """RFC 1929 against the proxy's authenticator and login throttle."""

    config = ProxyConfig(auth_max_failures=2)

    def setUp(self) -> None:
        super().setUp()
        self.auth = Authenticator()
        self.factory.authenticator = self.auth
        self.client, self.proto = self.connect_client()

    def test_login_required(self) -> None:
        """With --auth, a client offering no login gets 0xFF."""
        self.proto.dataReceived(NO_AUTH)
        self.assertEqual(self.take(), b"\x05\xff")
        self.assertEqual(self.records[0].status, 407)

    def test_good_login(self) -> None:
        """Good credentials: status 0, then the request is served, as that user."""
        self.proto.dataReceived(USERPASS + login(b"alice", b"secret") + CONNECT_NAME)
        self.assertEqual(self.take(), b"\x05\x02\x01\x00")
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(self.auth.checked, [b"Basic " + base64.b64encode(b"alice:secret")])
        self.assertEqual(self.proto.user, "alice")

    def test_bad_login(self) -> None:
        """Bad credentials: a failure status and a close; one 407 record."""
        self.proto.dataReceived(USERPASS + login(b"alice", b"wrong") + CONNECT_NAME)
        self.assertEqual(self.take(), b"\x05\x02\x01\x01")
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.connector.attempts, [])
        self.assertEqual([r.status for r in self.records], [407])

    def test_throttle(self) -> None:
        """After --auth-max-failures failures, no password is checked (429)."""
        for _ in range(2):
            _, proto = self.connect_client()
            proto.dataReceived(USERPASS + login(b"alice", b"wrong"))
        checks = len(self.auth.checked)
        self.proto.dataReceived(USERPASS + login(b"alice", b"secret"))
        self.assertEqual(self.take(), b"\x05\x02\x01\x01")
        self.assertEqual(len(self.auth.checked), checks)
        self.assertEqual(self.records[-1].status, 429)

    def test_client_leaves_during_check(self) -> None:
        """A client that leaves while its login is checked: the check is cancelled."""
        self.auth.hold = True
        self.proto.dataReceived(USERPASS + login(b"alice", b"secret"))
        [d] = self.auth.pending
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(d.called)
        self.assertEqual(self.factory.login_throttle.refused_for("127.0.0.1", 2, 60.0), None)


class RouteTests(SocksTestCase):
    """A SOCKS5 CONNECT leaves through the parent a route names."""

    config = ProxyConfig(upstream="http://parent.example:3128")

    def test_through_http_parent(self) -> None:
        """Through an HTTP parent: a CONNECT to it, then the SOCKS5 success."""
        self.request(CONNECT_NAME)
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))
        handshake = attempt.factory.buildProtocol(None)
        assert handshake is not None
        upstream = HalfCloseTransport()
        handshake.makeConnection(upstream)
        attempt.deferred.callback(handshake)  # type: ignore[arg-type]
        self.assertTrue(upstream.value().startswith(b"CONNECT example.com:443 HTTP/1.1\r\n"))
        self.assertEqual(self.take(), b"")
        handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.take()[:2], b"\x05\x00")
        self.assertEqual(self.factory.tunnels, 1)


class DrainTests(SocksTestCase):
    """Graceful stop."""

    def test_idle_session_closed(self) -> None:
        """A session still in its handshake is closed at once."""
        self.factory.drain(30)
        self.assertTrue(self.client.disconnecting)

    def test_tunnel_kept(self) -> None:
        """A tunnel is left to finish."""
        self.request(CONNECT_NAME)
        self.connector.attempts[0].succeed()
        self.factory.drain(30)
        self.assertFalse(self.client.disconnecting)


class _Port:
    """A fake UDP port: its address, and whether it was closed."""

    def __init__(self, host: str) -> None:
        self.host = IPv4Address("UDP", host, 40000)
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return self.host

    def stopListening(self) -> None:  # noqa: N802
        self.stopped = True


class _UdpTransport:
    """Records datagrams written."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class _UdpReactor(MemoryReactorClock):
    """A clock whose listenUDP hands out fake ports."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[tuple[Any, _Port]] = []

    def listenUDP(  # noqa: N802
        self,
        port: int,
        protocol: Any,
        interface: str = "",
        maxPacketSize: int = 8192,  # noqa: N803
    ) -> _Port:
        fake = _Port(interface)
        protocol.makeConnection(_UdpTransport())
        self.ports.append((protocol, fake))
        return fake


class _Lookups(RecordingConnector):
    """A connector that also resolves names (each lookup left for the test to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[tuple[str, Deferred[list[str]]]] = []

    def lookup(self, host: str, port: int) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.lookups.append((host, d))
        return d


class UdpTests(SocksTestCase):
    """UDP ASSOCIATE and its relay."""

    config = ProxyConfig(deny_host=["blocked.example"], block_private=False)

    def setUp(self) -> None:
        self.udp_reactor = _UdpReactor()
        self.clock = self.udp_reactor
        self.lookups = _Lookups()
        self.connector = self.lookups
        self.factory = ProxyFactory(self.config, self.clock, self.lookups)
        self.records = []
        self.factory.observers.append(self.records.append)
        self.socks = SocksFactory(self.factory, self.clock)
        self.client, self.proto = self.connect_client()
        self.proto.dataReceived(NO_AUTH + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        [(self.relay, self.port)] = self.clock.ports
        self.sent = self.relay.transport.sent

    def test_reply_names_the_relay(self) -> None:
        """The reply carries the relay's address, on the TCP listener's interface."""
        self.assertEqual(self.take(), OK_METHOD + b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40")
        self.assertEqual(self.port.host.host, "127.0.0.1")

    def test_dual_stack_listener(self) -> None:
        """An IPv4 client of a dual-stack listener gets a relay on the IPv4 address."""
        client, proto = self.connect_client("::ffff:127.0.0.1", "::ffff:127.0.0.1")
        proto.dataReceived(NO_AUTH + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        relay, port = self.udp_reactor.ports[-1]
        self.assertEqual(port.host.host, "127.0.0.1")
        self.assertEqual(client.value()[2:6], b"\x05\x00\x00\x01")
        relay.datagramReceived(datagram_header("192.0.2.7", 53) + b"q", ("127.0.0.1", 6000))
        self.assertEqual(relay.transport.sent, [(b"q", ("192.0.2.7", 53))])

    def from_client(self, host: str, port: int, payload: bytes, frm: int = 6000) -> None:
        self.relay.datagramReceived(datagram_header(host, port) + payload, ("127.0.0.1", frm))

    def test_round_trip(self) -> None:
        """Out to the destination without header; back with one, to the learned port."""
        self.from_client("192.0.2.7", 53, b"query")
        self.assertEqual(self.sent, [(b"query", ("192.0.2.7", 53))])
        self.relay.datagramReceived(b"answer", ("192.0.2.7", 53))
        data, addr = self.sent[1]
        self.assertEqual(addr, ("127.0.0.1", 6000))
        self.assertEqual(parse_datagram(data).payload, b"answer")
        self.assertEqual(self.socks.udp_datagrams, {"to_origin": 1, "to_client": 1})

    def test_other_sources_dropped(self) -> None:
        """Other ports of the client, and strangers, are dropped."""
        self.from_client("192.0.2.7", 53, b"q")
        self.from_client("192.0.2.7", 53, b"q", frm=6001)
        self.relay.datagramReceived(datagram_header("192.0.2.7", 53) + b"x", ("192.0.2.99", 6000))
        self.relay.datagramReceived(b"spoof", ("192.0.2.8", 53))
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(self.relay.dropped, 3)

    def test_rules(self) -> None:
        """Fragments, denied names, ports outside --udp-ports: dropped."""
        self.relay.datagramReceived(
            b"\x00\x00\x01" + datagram_header("192.0.2.7", 53)[3:], ("127.0.0.1", 6000)
        )
        self.from_client("blocked.example", 53, b"q")
        self.from_client("192.0.2.7", 80, b"q")
        self.assertEqual(self.sent, [])
        self.assertEqual(self.socks.udp_dropped, {"fragment": 1, "denied": 1, "port": 1})

    def test_names_looked_up_bounded(self) -> None:
        """A name is looked up (once at a time, a few at once) and remembered."""
        self.from_client("dns.example", 53, b"q1")
        self.from_client("dns.example", 53, b"q2")
        [(host, d)] = self.lookups.lookups
        d.callback(["192.0.2.9"])
        self.from_client("dns.example", 53, b"q3")
        self.assertEqual([s[0] for s in self.sent], [b"q1", b"q3"])
        for i in range(MAX_LOOKUPS + 2):
            self.from_client(f"n{i}.example", 53, b"q")
        self.assertEqual(len(self.lookups.lookups), 1 + MAX_LOOKUPS)

    def test_record_at_close(self) -> None:
        """The association's end is one record with its datagram count."""
        self.from_client("192.0.2.7", 53, b"query")
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        [record] = self.records
        self.assertEqual(
            (record.method, record.datagrams, record.bytes_to_origin), ("UDP_ASSOCIATE", 1, 5)
        )
        self.assertTrue(self.port.stopped)
        self.assertIn("datagrams=1", format_combined(record))
        self.assertIn('"datagrams":1', format_json(record))

    def test_idle(self) -> None:
        """An association silent for --tunnel-idle-timeout is closed."""
        self.clock.advance(self.config.tunnel_idle_timeout * 1.2)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.port.stopped)


class RoutedUdpTests(SocksTestCase):
    """A destination routed to a parent can't take datagrams."""

    config = ProxyConfig(upstream="http://parent.example:3128")

    def test_routed_dropped(self) -> None:
        """Dropped: datagrams go directly or not at all."""
        self.clock = _UdpReactor()
        self.socks = SocksFactory(self.factory, self.clock)
        _, proto = self.connect_client()
        proto.dataReceived(NO_AUTH + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        [(relay, _)] = self.clock.ports
        relay.datagramReceived(datagram_header("192.0.2.7", 53) + b"q", ("127.0.0.1", 6000))
        self.assertEqual(relay.transport.sent, [])
        self.assertEqual(self.socks.udp_dropped, {"routed": 1})


class InterceptTests(SocksTestCase):
    """--intercept looks at a SOCKS5 CONNECT's first bytes, as at an HTTP CONNECT's."""

    def setUp(self) -> None:
        ca_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, ca_dir, True)
        self.config = ProxyConfig(intercept=["*"], ca_dir=ca_dir)
        super().setUp()

    def test_not_tls_relayed_blind(self) -> None:
        """Success at once; bytes that are not TLS are relayed after a dial, first."""
        self.assertEqual(self.request(CONNECT_NAME), OK_METHOD + b"\x05\x00\x00\x01" + b"\0" * 6)
        self.assertEqual(self.connector.attempts, [])
        self.proto.dataReceived(b"SSH-2.0-client\r\n")
        [attempt] = self.connector.attempts
        upstream = attempt.succeed()
        self.assertEqual(upstream.value(), b"SSH-2.0-client\r\n")
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.factory.tunnels, 1)

    def test_dial_fails_after_early_success(self) -> None:
        """The destination refuses after the early success: a close, not a second reply."""
        self.request(CONNECT_NAME)
        self.proto.dataReceived(b"SSH-2.0-client\r\n")
        self.connector.attempts[0].deferred.errback(error.ConnectionRefusedError())
        self.assertEqual(self.take(), b"")
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.records[-1].status, 502)

    def test_client_leaves_while_peeking(self) -> None:
        """A client that leaves during the look: nothing is dialed, one record."""
        self.request(CONNECT_NAME)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.clock.advance(10)
        self.assertEqual(self.connector.attempts, [])
        self.assertEqual(len(self.records), 1)


class PoolTests(SocksTestCase):
    """A parent pool's member that fails before the tunnel is open: the next one."""

    config = ProxyConfig(route=["*=rr:socks5://p1.example:1080,socks5://p2.example:1080"])

    def test_failover(self) -> None:
        """The first member refuses, so the second is dialed; when it refuses too: 0x05."""
        self.request(CONNECT_NAME)
        first = self.connector.attempts[0]
        first.deferred.errback(error.ConnectionRefusedError())
        self.assertEqual(len(self.connector.attempts), 2)
        hosts = {a.host for a in self.connector.attempts}
        self.assertEqual(hosts, {"p1.example", "p2.example"})
        self.assertEqual(self.take(), b"")
        self.connector.attempts[1].deferred.errback(error.ConnectionRefusedError())
        self.assertEqual(self.take()[:2], b"\x05\x05")
        self.assertTrue(self.client.disconnecting)


class OptionTests(SynchronousTestCase):
    """--socks-port and --udp-ports in the table of options."""

    def test_defaults(self) -> None:
        """Off by default; UDP to DNS, NTP and QUIC."""
        config = ProxyConfig()
        self.assertEqual(config.socks_port, ())
        self.assertEqual([p for p in range(1, 1000) if config.udp_port_allowed(p)], [53, 123, 443])

    def test_forms(self) -> None:
        """A bare number is loopback; endpoint descriptions pass; * is any UDP port."""
        config = ProxyConfig(socks_port=["1080", "tcp6:1081:interface=\\:\\:1"], udp_ports="*")
        self.assertEqual(
            config.socks_port, ("tcp:1080:interface=127.0.0.1", "tcp6:1081:interface=\\:\\:1")
        )
        self.assertTrue(config.udp_port_allowed(9))

    def test_no_proxy_protocol(self) -> None:
        """A haproxy: SOCKS5 listener is refused, naming the option."""
        with self.assertRaises(ValueError) as caught:
            ProxyConfig(socks_port=["haproxy:tcp:1080"])
        self.assertIn("socks-port", str(caught.exception))

    def test_restart_setting(self) -> None:
        """A changed --socks-port needs a restart (a reload says so)."""
        from aproxy.run.service import restart_settings

        names = restart_settings(ProxyConfig(), ProxyConfig(socks_port=["1080"]))
        self.assertEqual(names, ["socks-port"])

    def test_public_listener(self) -> None:
        """A SOCKS5 port open to other machines is named by the exposure warning."""
        from aproxy.run.endpoints import public_listeners

        config = ProxyConfig(socks_port=["tcp:1080:interface=0.0.0.0"])
        self.assertEqual(public_listeners(config), ["tcp:1080:interface=0.0.0.0"])

    def test_command_line(self) -> None:
        """The command line takes it; a bad description is one usage error."""
        from twisted.python import usage

        from aproxy.run.tap import Options

        options = Options()
        options.parseOptions(["--socks-port", "1080", "--udp-ports", "53"])
        config = options["proxy-config"]
        self.assertEqual(config.socks_port, ("tcp:1080:interface=127.0.0.1",))
        self.assertEqual(config.udp_ports, ((53, 53),))
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--socks-port", "nope:1"])


class _Recorder:
    """An addon that records its hooks, and refuses, picks an exit or waits on request."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.deny = False
        self.parent: str | None = None
        self.wait: Deferred[None] | None = None

    def request(self, exchange: Any) -> Any:
        self.calls.append(("request", exchange.request.method, exchange.request.target))
        if self.deny:
            exchange.deny()
        exchange.parent = self.parent
        return self.wait

    def tunnel_open(self, exchange: Any) -> None:
        self.calls.append(("tunnel_open",))

    def tunnel_close(self, exchange: Any, up: int, down: int) -> None:
        self.calls.append(("tunnel_close", up, down))

    def error(self, exchange: Any, error: str) -> None:
        self.calls.append(("error",))

    def done(self, exchange: Any) -> None:
        self.calls.append(("done",))


class AddonTests(SocksTestCase):
    """The addon hooks meet a SOCKS5 CONNECT as they meet an HTTP one."""

    def setUp(self) -> None:
        self.addon = _Recorder()
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(self.config, self.clock, self.connector, addons=[self.addon])
        self.records = []
        self.factory.observers.append(self.records.append)
        self.socks = SocksFactory(self.factory, self.clock)
        self.client, self.proto = self.connect_client()

    def test_tunnel_hooks(self) -> None:
        """request, tunnel_open, tunnel_close (bytes up, down) and done, in order."""
        self.request(CONNECT_NAME)
        self.connector.attempts[0].succeed()
        self.proto.dataReceived(b"abc")
        self.connector.attempts[0].respond(b"hello")
        self.connector.attempts[0].close()
        self.assertEqual(
            self.addon.calls,
            [
                ("request", "CONNECT", "example.com:443"),
                ("tunnel_open",),
                ("tunnel_close", 3, 12 + 5),
                ("done",),
            ],
        )

    def test_refused_by_addon(self) -> None:
        """An addon that refuses: 0x02, nothing dialed; error and done are told."""
        self.addon.deny = True
        self.assertEqual(self.request(CONNECT_NAME), OK_METHOD + refused(2))
        self.assertEqual(self.connector.attempts, [])
        self.assertEqual([c[0] for c in self.addon.calls], ["request", "error", "done"])
        self.assertEqual(self.records[0].status, 403)

    def test_exit_chosen_by_addon(self) -> None:
        """exchange.parent picks the exit: the tunnel goes through that parent."""
        self.addon.parent = "http://parent.example:3128"
        self.request(CONNECT_NAME)
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))

    def test_hook_waited_for(self) -> None:
        """A hook that answers later holds the dial; one too slow: 0x06, cancelled."""
        self.addon.wait = Deferred()
        self.request(CONNECT_NAME)
        self.assertEqual(self.connector.attempts, [])
        self.addon.wait.callback(None)
        self.assertEqual(len(self.connector.attempts), 1)
        client, proto = self.connect_client()
        waiting: Deferred[None] = Deferred()
        self.addon.wait = waiting
        proto.dataReceived(NO_AUTH + CONNECT_NAME)
        self.clock.advance(self.config.addon_timeout)
        self.assertEqual(client.value(), OK_METHOD + refused(6))
        self.assertTrue(waiting.called)
