"""
PROXY protocol listeners (C{--port haproxy:tcp:...} with C{--proxy-protocol-from}): the
sans-IO header reader, admission by the header's client address on a fake transport,
the wiring over real loopback sockets, and the start-up check in a real C{twistd}.

Only load balancers in C{--proxy-protocol-from} may send a header; anyone else who could
reach the port would otherwise claim any address and pass C{--allow}.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Generator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig, check_proxy_protocol, proxy_protocol_inner
from aproxy.http.proxyheader import ProxyHeader, ProxyHeaderError, ProxyHeaderReader
from aproxy.run.service import ProxyHeaderFactory, adopted_service, makeService
from aproxy.run.tap import Options
from aproxy.run.workers import WorkerPool
from aproxy.testing import HalfCloseTransport, RecordingConnector
from tests.processes import ROOT, TWISTD, free_port, stop, twistd, wait_for_line
from tests.support import SpawningReactor
from tests.tracking import ConnectionTracking

GET = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_TCP4 = b"PROXY TCP4 10.1.2.3 192.0.2.1 5555 3128\r\n"


def v2(command: int, family: int, block: bytes) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, block."""
    return SIGNATURE + bytes([command, family]) + len(block).to_bytes(2, "big") + block


def v2_tcp4(source: str, destination: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header for an IPv4 stream connection (with optional TLV bytes)."""
    block = (
        socket.inet_aton(source)
        + socket.inet_aton(destination)
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )
    return v2(0x21, 0x11, block + tlvs)


def v2_tcp6(source: str, destination: str, sport: int, dport: int) -> bytes:
    """A v2 PROXY header for an IPv6 stream connection."""
    block = (
        socket.inet_pton(socket.AF_INET6, source)
        + socket.inet_pton(socket.AF_INET6, destination)
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )
    return v2(0x21, 0x21, block)


V2_LOCAL = v2(0x20, 0x00, b"")
V2_UNIX = v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"))
V2_UNSPEC = v2(0x21, 0x00, b"")


class ReaderTests(SynchronousTestCase):
    """The sans-IO reader: each accepted header whole, byte by byte and with bytes after."""

    def check(self, data: bytes, expected: ProxyHeader) -> None:
        """C{data} gives C{expected} fed whole, byte by byte, and with trailing bytes."""
        reader = ProxyHeaderReader()
        self.assertEqual(reader.feed(data), expected)
        self.assertEqual(reader.rest, b"")
        reader = ProxyHeaderReader()
        for byte in data[:-1]:
            self.assertIsNone(reader.feed(bytes([byte])))
        self.assertEqual(reader.feed(data[-1:]), expected)
        reader = ProxyHeaderReader()
        self.assertEqual(reader.feed(data + GET), expected)
        self.assertEqual(reader.rest, GET)

    def test_v1_tcp4(self) -> None:
        """A v1 TCP4 line gives the client's and the listener's address and port."""
        self.check(V1_TCP4, ProxyHeader(1, ("10.1.2.3", 5555), ("192.0.2.1", 3128)))

    def test_v1_tcp6(self) -> None:
        """A v1 TCP6 line gives IPv6 addresses in canonical form."""
        self.check(
            b"PROXY TCP6 2001:db8:0::1 2001:db8::2 1 65535\r\n",
            ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 65535)),
        )

    def test_v1_longest_line(self) -> None:
        """The longest TCP6 line (104 bytes, within the format's 107) is accepted."""
        line = (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
        )
        self.assertEqual(len(line), 104)
        full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        self.check(line, ProxyHeader(1, (full, 65535), (full, 65535)))

    def test_v2_tcp4(self) -> None:
        """A v2 PROXY command for IPv4 gives the addresses and ports."""
        self.check(
            v2_tcp4("10.9.8.7", "192.0.2.1", 4444, 3128),
            ProxyHeader(2, ("10.9.8.7", 4444), ("192.0.2.1", 3128)),
        )

    def test_v2_tcp6(self) -> None:
        """A v2 PROXY command for IPv6 gives the addresses and ports."""
        self.check(
            v2_tcp6("2001:db8::7", "2001:db8::1", 4444, 3128),
            ProxyHeader(2, ("2001:db8::7", 4444), ("2001:db8::1", 3128)),
        )

    def test_v2_tlvs_skipped(self) -> None:
        """TLVs after the addresses (e.g. HAProxy's unique id) are part of the header."""
        tlv = b"\x05\x00\x04abcd"
        self.check(
            v2_tcp4("10.9.8.7", "192.0.2.1", 4444, 3128, tlv),
            ProxyHeader(2, ("10.9.8.7", 4444), ("192.0.2.1", 3128)),
        )

    def test_v2_local(self) -> None:
        """A v2 LOCAL command (a health check) names no client: the peer's own applies."""
        self.check(V2_LOCAL, ProxyHeader(2, None, None))
        self.check(v2(0x20, 0x11, b"\0" * 12), ProxyHeader(2, None, None))

    def refused(self, data: bytes, why: str) -> None:
        """C{data} is refused, fed whole and fed byte by byte, with C{why} in the reason."""
        with self.assertRaises(ProxyHeaderError) as caught:
            ProxyHeaderReader().feed(data)
        self.assertIn(why, str(caught.exception))
        reader = ProxyHeaderReader()
        with self.assertRaises(ProxyHeaderError):
            for byte in data:
                reader.feed(bytes([byte]))

    def test_no_header(self) -> None:
        """Bytes that start neither version's header are refused at the first byte."""
        self.refused(GET, "no PROXY header")
        self.refused(b"PROXX TCP4", "no PROXY header")
        self.refused(b"\r\n\r\n\x00\r\nQUIX", "no PROXY header")

    def test_v1_unknown_refused(self) -> None:
        """v1 UNKNOWN carries no client address to check, so it is refused."""
        self.refused(b"PROXY UNKNOWN\r\n", "UNKNOWN")
        self.refused(b"PROXY UNKNOWN 10.1.2.3 10.1.2.4 1 2\r\n", "UNKNOWN")

    def test_v1_malformed_refused(self) -> None:
        """Anything but the exact v1 form is refused, not repaired."""
        for line in (
            b"PROXY TCP4 10.1.2 192.0.2.1 5555 3128\r\n",
            b"PROXY TCP4 10.1.2.3 192.0.2.1 5555\r\n",
            b"PROXY TCP4 10.1.2.3 192.0.2.1 5555 3128 x\r\n",
            b"PROXY TCP4  10.1.2.3 192.0.2.1 5555 3128\r\n",
            b"PROXY TCP4 010.1.2.3 192.0.2.1 5555 3128\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 5555 3128\r\n",
            b"PROXY TCP6 10.1.2.3 2001:db8::1 5555 3128\r\n",
            b"PROXY TCP6 fe80::1%eth0 fe80::2 5555 3128\r\n",
            b"PROXY TCP4 10.1.2.3 192.0.2.1 05555 3128\r\n",
            b"PROXY TCP4 10.1.2.3 192.0.2.1 +555 3128\r\n",
            b"PROXY TCP4 10.1.2.3 192.0.2.1 65536 3128\r\n",
            b"PROXY tcp4 10.1.2.3 192.0.2.1 5555 3128\r\n",
            b"PROXY UDP4 10.1.2.3 192.0.2.1 5555 3128\r\n",
        ):
            with self.subTest(line=line):
                self.refused(line, "PROXY v1")

    def test_v1_bare_newline_refused(self) -> None:
        """A v1 line must end in CRLF: a bare LF is refused."""
        self.refused(b"PROXY TCP4 10.1.2.3 192.0.2.1 5555 3128\n", "PROXY v1")

    def test_v1_line_too_long_refused(self) -> None:
        """107 bytes without CRLF end the reading: the reader holds no more than that."""
        reader = ProxyHeaderReader()
        self.assertIsNone(reader.feed(b"PROXY TCP6 " + b"f" * 95))
        with self.assertRaises(ProxyHeaderError):
            reader.feed(b"f")

    def test_v2_unix_refused(self) -> None:
        """v2 AF_UNIX addresses carry no client address to check, so they are refused."""
        self.refused(V2_UNIX, "AF_UNIX")

    def test_v2_unspec_refused(self) -> None:
        """A v2 PROXY command with UNSPEC addresses is refused."""
        self.refused(V2_UNSPEC, "UNSPEC")

    def test_v2_datagram_refused(self) -> None:
        """A v2 header for a UDP flow does not describe this TCP connection."""
        self.refused(v2(0x21, 0x12, b"\0" * 12), "datagram")

    def test_v2_bad_version_or_command_refused(self) -> None:
        """Version 2 with commands LOCAL and PROXY only; anything else is refused."""
        self.refused(v2(0x11, 0x11, b"\0" * 12), "version/command")
        self.refused(v2(0x22, 0x11, b"\0" * 12), "version/command")

    def test_v2_short_address_block_refused(self) -> None:
        """A v2 length shorter than the family's addresses is refused before waiting."""
        self.refused(v2(0x21, 0x11, b"\0" * 11), "too short")
        self.refused(v2(0x21, 0x21, b"\0" * 35), "too short")

    def test_v2_waits_for_announced_length(self) -> None:
        """A v2 header is complete only once the announced length has arrived."""
        data = v2_tcp4("10.9.8.7", "192.0.2.1", 4444, 3128, b"\x05\x00\x04abcd")
        reader = ProxyHeaderReader()
        self.assertIsNone(reader.feed(data[:-1]))
        self.assertIsNotNone(reader.feed(data[-1:]))


_HEADER_LIKE = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=120)),
    st.builds(
        lambda head, tail: SIGNATURE + head + tail,
        st.binary(min_size=4, max_size=4),
        st.binary(max_size=300),
    ),
    st.sampled_from([V1_TCP4, V2_LOCAL, V2_UNIX, V2_UNSPEC]).flatmap(
        lambda header: st.builds(
            lambda cut, junk: header[:cut] + junk,
            st.integers(0, len(header)),
            st.binary(max_size=40),
        )
    ),
)


class ReaderPropertyTests(SynchronousTestCase):
    """Arbitrary bytes never make the reader fail other than with L{ProxyHeaderError}."""

    @settings(max_examples=300, deadline=None)
    @given(_HEADER_LIKE, st.lists(st.integers(0, 300), max_size=5))
    def test_junk_gives_header_need_more_or_refusal(self, data: bytes, cuts: list[int]) -> None:
        """
        Fed whole or cut anywhere, bytes give a header (the same either way), "need
        more" or L{ProxyHeaderError}, never another exception; a header's client is an
        IP address, never empty.
        """
        try:
            whole: ProxyHeader | str | None = ProxyHeaderReader().feed(data)
        except ProxyHeaderError:
            whole = "refused"
        reader = ProxyHeaderReader()
        bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
        split: ProxyHeader | str | None = None
        try:
            for start, end in itertools.pairwise(bounds):
                split = reader.feed(data[start:end])
                if split is not None:
                    break
        except ProxyHeaderError:
            split = "refused"
        if isinstance(whole, ProxyHeader):
            self.assertEqual(split, whole)
            if whole.source is not None:
                self.assertTrue(whole.source[0])
        elif whole is None:
            self.assertIsNone(split)


def _factory(**settings: Any) -> tuple[ProxyFactory, RecordingConnector]:
    settings.setdefault("allow", ("10.0.0.0/8",))
    config = ProxyConfig(
        port=("haproxy:tcp:3128",),
        proxy_protocol_from=("192.0.2.0/24", "2001:db8:1::/48"),
        **settings,
    )
    connector = RecordingConnector()
    return ProxyFactory(config, MemoryReactorClock(), connector), connector


class AdmissionTests(SynchronousTestCase):
    """A PROXY listener's connections on a fake transport: who may send a header, and how
    the client it names is admitted."""

    def setUp(self) -> None:
        self.factory, self.connector = _factory(x_forwarded_for="add")
        self.listener = ProxyHeaderFactory(self.factory)
        # (EventLoggingObserver.createWithCleanup is annotated for TestCase only.)
        self.log = EventLoggingObserver()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def connect(
        self, peer: IPv4Address | IPv6Address
    ) -> tuple[HalfCloseTransport, ProxyProtocol | None]:
        """A connection from C{peer} to the PROXY listener (no protocol: refused)."""
        proto = self.listener.buildProtocol(peer)
        transport = HalfCloseTransport(peerAddress=peer)
        if proto is not None:
            proto.makeConnection(transport)
        return transport, proto

    def messages(self) -> list[str]:
        """The text of every log event so far."""
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.log]

    def test_untrusted_peer_refused_before_reading(self) -> None:
        """A peer outside --proxy-protocol-from gets no protocol (closed), logged."""
        _, proto = self.connect(IPv4Address("TCP", "10.1.2.3", 5000))
        self.assertIsNone(proto)
        self.assertEqual(self.factory.open_connections, 0)
        [message] = self.messages()
        self.assertIn("10.1.2.3", message)
        self.assertIn("--proxy-protocol-from", message)

    def test_untrusted_ipv6_peer_refused(self) -> None:
        """The same for an IPv6 peer outside the trusted IPv6 network."""
        _, proto = self.connect(IPv6Address("TCP", "2001:db8:2::1", 5000))
        self.assertIsNone(proto)

    def test_ipv4_mapped_peer_matches_ipv4_network(self) -> None:
        """On a tcp6 listener an IPv4 peer appears IPv4-mapped; it matches as IPv4."""
        _, proto = self.connect(IPv6Address("TCP", "::ffff:192.0.2.10", 5000))
        self.assertIsNotNone(proto)

    def test_trusted_peer_v1_header_admits_named_client(self) -> None:
        """The header's client is checked against --allow and named in X-Forwarded-For."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V1_TCP4 + GET)
        self.assertEqual(transport.value(), b"")
        [attempt] = self.connector.attempts
        upstream = attempt.succeed()
        self.assertIn(b"X-Forwarded-For: 10.1.2.3\r\n", upstream.value())
        self.assertEqual(self.factory.clients_per_ip, {"10.1.2.3": 1})

    def test_trusted_peer_v2_header_split_across_reads(self) -> None:
        """A v2 header arriving a few bytes at a time is read whole before admission."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        data = v2_tcp4("10.9.8.7", "192.0.2.1", 4444, 3128) + GET
        for start in range(0, len(data), 5):
            proto.dataReceived(data[start : start + 5])
        [attempt] = self.connector.attempts
        self.assertIn(b"X-Forwarded-For: 10.9.8.7\r\n", attempt.succeed().value())

    def test_named_client_outside_allow_refused(self) -> None:
        """A client named by a trusted header but outside --allow gets 403."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(b"PROXY TCP4 198.51.100.7 192.0.2.1 5555 3128\r\n" + GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "))
        self.assertTrue(transport.disconnecting)

    def test_per_address_limit_uses_named_client(self) -> None:
        """--max-clients-per-ip counts the header's client, not the load balancer."""
        self.factory, self.connector = _factory(max_clients_per_ip=1)
        self.listener = ProxyHeaderFactory(self.factory)
        first, proto1 = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        second, proto2 = self.connect(IPv4Address("TCP", "192.0.2.10", 5001))
        other, proto3 = self.connect(IPv4Address("TCP", "192.0.2.10", 5002))
        assert proto1 is not None and proto2 is not None and proto3 is not None
        proto1.dataReceived(V1_TCP4)
        proto2.dataReceived(V1_TCP4 + GET)
        proto3.dataReceived(b"PROXY TCP4 10.7.7.7 192.0.2.1 5555 3128\r\n" + GET)
        self.assertTrue(second.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(other.value(), b"")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_trusted_peer_without_header_closed(self) -> None:
        """A trusted peer whose connection starts with HTTP instead is closed, logged."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(GET)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector.attempts, [])
        self.assertEqual(self.factory.open_connections, 0)
        [message] = self.messages()
        self.assertIn("192.0.2.10", message)
        self.assertIn("no PROXY header", message)
        # Later bytes on the closing connection are ignored.
        proto.dataReceived(V1_TCP4 + GET)
        self.assertEqual(self.connector.attempts, [])

    def test_local_header_served_as_peer(self) -> None:
        """A v2 LOCAL header is the load balancer's own connection: its address applies."""
        self.factory, self.connector = _factory(allow=("192.0.2.0/24",), x_forwarded_for="add")
        self.listener = ProxyHeaderFactory(self.factory)
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V2_LOCAL + GET)
        [attempt] = self.connector.attempts
        self.assertIn(b"X-Forwarded-For: 192.0.2.10\r\n", attempt.succeed().value())

    def test_local_header_checked_against_allow(self) -> None:
        """A LOCAL connection is admitted by the load balancer's address, so --allow applies."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V2_LOCAL + GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "))

    def test_unix_addresses_refused(self) -> None:
        """v2 AF_UNIX addresses from a trusted peer: closed and logged, nothing skipped."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V2_UNIX + GET)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector.attempts, [])
        self.assertIn("AF_UNIX", self.messages()[-1])

    def test_unspec_addresses_refused(self) -> None:
        """v2 UNSPEC addresses in a PROXY command: closed and logged."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V2_UNSPEC + GET)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connector.attempts, [])
        self.assertIn("UNSPEC", self.messages()[-1])

    def test_silent_peer_closed_at_header_timeout(self) -> None:
        """A trusted peer that sends nothing is closed after the header timeout."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V1_TCP4[:10])
        clock = self.factory.clock
        assert isinstance(clock, MemoryReactorClock)
        clock.advance(self.factory.config.header_timeout)
        self.assertTrue(transport.disconnecting)

    def test_partial_header_logged_at_header_timeout(self) -> None:
        """Part of a header and no more: closed at the header timeout, with a log line."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        proto.dataReceived(V1_TCP4[:10])
        clock = self.factory.clock
        assert isinstance(clock, MemoryReactorClock)
        clock.advance(self.factory.config.header_timeout)
        self.assertTrue(transport.disconnecting)
        self.assertIn("incomplete PROXY header", self.messages()[-1])
        self.assertIn("192.0.2.10", self.messages()[-1])

    def test_empty_health_check_closed_quietly(self) -> None:
        """A trusted peer that sent nothing (a TCP health check) is closed, not logged."""
        transport, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        assert proto is not None
        before = len(self.messages())
        clock = self.factory.clock
        assert isinstance(clock, MemoryReactorClock)
        clock.advance(self.factory.config.header_timeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.messages()), before)

    def test_trusted_networks_follow_reload(self) -> None:
        """A reloaded --proxy-protocol-from applies to the next connection."""
        from dataclasses import replace

        self.factory.config = replace(self.factory.config, proxy_protocol_from=("10.0.0.0/8",))
        _, proto = self.connect(IPv4Address("TCP", "192.0.2.10", 5000))
        self.assertIsNone(proto)
        _, proto = self.connect(IPv4Address("TCP", "10.0.0.1", 5000))
        self.assertIsNotNone(proto)


class ConfigTests(SynchronousTestCase):
    """A PROXY listener needs --proxy-protocol-from; embedders get the same check."""

    def test_haproxy_port_needs_trusted_networks(self) -> None:
        """ProxyConfig refuses a haproxy: port without proxy_protocol_from."""
        with self.assertRaises(ValueError) as caught:
            ProxyConfig(port=("haproxy:tcp:3128",))
        self.assertIn("--proxy-protocol-from", str(caught.exception))

    def test_bad_network_refused(self) -> None:
        """A --proxy-protocol-from value that is not a network is refused."""
        with self.assertRaises(ValueError) as caught:
            ProxyConfig(port=("haproxy:tcp:3128",), proxy_protocol_from=("10.0.0.0/33",))
        self.assertIn("--proxy-protocol-from", str(caught.exception))

    def test_only_tcp_listeners(self) -> None:
        """haproxy: over ssl: or unix: is refused (the header precedes TLS; no peer address)."""
        for port in ("haproxy:ssl:443", "haproxy:unix:/run/a.sock"):
            with self.subTest(port=port), self.assertRaises(ValueError):
                check_proxy_protocol([port], ["10.0.0.0/8"])
        check_proxy_protocol(["haproxy:tcp6:3128", "tcp:8080"], ["10.0.0.0/8"])

    def test_inner_description(self) -> None:
        """proxy_protocol_inner strips the haproxy: prefix, and only that one."""
        self.assertEqual(proxy_protocol_inner("haproxy:tcp:3128"), "tcp:3128")
        self.assertEqual(proxy_protocol_inner("HAProxy:tcp:3128"), "tcp:3128")
        self.assertIsNone(proxy_protocol_inner("tcp:3128"))

    def test_option_and_config_file_key(self) -> None:
        """--proxy-protocol-from is repeatable and the config file's key is a list."""
        options = Options()
        options.parseOptions(
            [
                "--port",
                "haproxy:tcp:0:interface=127.0.0.1",
                "--proxy-protocol-from",
                "192.0.2.0/24",
                "--proxy-protocol-from",
                "2001:db8::/32",
            ]
        )
        config = options["proxy-config"]
        self.assertEqual(config.proxy_protocol_from, ("192.0.2.0/24", "2001:db8::/32"))
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as file:
            file.write(
                'port = ["haproxy:tcp:0:interface=127.0.0.1"]\n'
                'proxy-protocol-from = ["192.0.2.0/24"]\n'
            )
            file.flush()
            options = Options()
            options.parseOptions(["--config", file.name])
        self.assertEqual(options["proxy-config"].proxy_protocol_from, ("192.0.2.0/24",))


class ProcessTests(SynchronousTestCase):
    """The start-up check in a real twistd."""

    def test_haproxy_port_without_trusted_networks_exits_2(self) -> None:
        """A haproxy: port without --proxy-protocol-from: one line, exit 2, no traceback."""
        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "aproxy",
                    "--port",
                    "haproxy:tcp:0:interface=127.0.0.1",
                ],
                cwd=cwd,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                capture_output=True,
                text=True,
                timeout=60,
            )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 2, output)
        self.assertEqual(output.count("\n"), 1, output)
        self.assertIn("--proxy-protocol-from", output)


class LoopbackTests(ConnectionTracking, TestCase):
    """A PROXY listener from makeService over real loopback sockets."""

    timeout = 30

    @inlineCallbacks
    def start(self, trusted: str) -> Generator[Any, Any, int]:
        """Start makeService on a haproxy: port trusting C{trusted}; return the port."""
        config = ProxyConfig(
            port=("haproxy:tcp:0:interface=127.0.0.1",),
            proxy_protocol_from=(trusted,),
            allow=("10.0.0.0/8",),
        )
        service = makeService(config, reactor)
        self.track(service.factory)  # type: ignore[attr-defined]
        self.track(service.factory.upstream_factory)  # type: ignore[attr-defined]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        [child] = list(service)  # type: ignore[call-overload]
        yield None
        port: int = child.port.getHost().port
        return port

    @staticmethod
    def exchange(port: int, data: bytes) -> bytes:
        """Send C{data}, read until the proxy closes (bounded by a socket timeout)."""
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(data)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            return received

    @inlineCallbacks
    def test_untrusted_sender_closed(self) -> Generator[Any, Any, None]:
        """From outside --proxy-protocol-from, a header claiming an allowed client is closed."""
        port = yield self.start("192.0.2.0/24")
        data = yield deferToThread(
            self.exchange, port, b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 3128\r\n" + GET
        )
        self.assertEqual(data, b"")

    @inlineCallbacks
    def test_trusted_sender_unix_addresses_closed(self) -> Generator[Any, Any, None]:
        """From a trusted peer, AF_UNIX addresses are closed without an answer."""
        port = yield self.start("127.0.0.1/32")
        data = yield deferToThread(self.exchange, port, V2_UNIX + GET)
        self.assertEqual(data, b"")

    @inlineCallbacks
    def test_trusted_sender_named_client_served(self) -> Generator[Any, Any, None]:
        """From a trusted peer, the named client is admitted (a denied target shows it)."""
        port = yield self.start("127.0.0.1/32")
        request = (
            b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n"
        )
        data = yield deferToThread(self.exchange, port, V1_TCP4 + request)
        # Admitted (not 403 for --allow); the loopback target is the proxy's own network
        # and is refused or unreachable: either way an HTTP answer, not a silent close.
        self.assertTrue(data.startswith(b"HTTP/1.1 "), data)
        self.assertNotIn(b"--allow", data)


class WorkerTests(SynchronousTestCase):
    """--workers: the parent shares a haproxy: port's TCP socket, a worker reads headers."""

    def test_parent_makes_plain_tcp_socket(self) -> None:
        """The parent binds the TCP listener under haproxy: and hands it to the workers."""
        reactor = SpawningReactor()
        config = ProxyConfig(
            port=("haproxy:tcp:0:interface=127.0.0.1",), proxy_protocol_from=("127.0.0.1",)
        )
        pool = WorkerPool(config, [], 1, reactor)
        pool.startService()
        [sock] = pool.sockets
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertEqual(sock.type, socket.SOCK_STREAM)

    def test_worker_adopts_with_proxy_header_factory(self) -> None:
        """A worker serves a haproxy: port's socket through L{ProxyHeaderFactory} only."""
        reactor = MemoryReactorClock()
        config = ProxyConfig(
            port=("haproxy:tcp:3128", "tcp:8080"), proxy_protocol_from=("127.0.0.1",)
        )
        service = adopted_service(
            config, [(10, socket.AF_INET), (11, socket.AF_INET)], reactor=reactor
        )
        service.startService()
        self.addCleanup(service.stopService)
        [(fd1, _, first), (fd2, _, second)] = reactor.adoptedPorts
        self.assertEqual((fd1, fd2), (10, 11))
        self.assertIsInstance(first, ProxyHeaderFactory)
        self.assertIsInstance(second, ProxyFactory)

    def test_two_workers_read_proxy_headers(self) -> None:
        """
        A real twistd with --workers 2 on a haproxy: port: a header from a trusted peer
        admits the client it names; a connection without one is closed unanswered.
        """
        port = free_port()
        args = [
            "--port",
            f"haproxy:tcp:{port}:interface=127.0.0.1",
            "--proxy-protocol-from",
            "127.0.0.1",
            "--allow",
            "10.0.0.0/8",
            "--deny-host",
            "blocked.invalid",
            "--workers",
            "2",
        ]
        request = b"GET http://blocked.invalid/ HTTP/1.1\r\nHost: blocked.invalid\r\n\r\n"
        with tempfile.TemporaryDirectory() as tmp, twistd(args, tmp) as proc:
            wait_for_line(proc, b"worker 1 started")
            deadline = time.monotonic() + 20
            while True:
                # The workers adopt the socket a moment after they start.
                answer = LoopbackTests.exchange(port, V1_TCP4 + request)
                if answer or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
            self.assertIn(b"blocked.invalid", answer)
            for _ in range(4):
                self.assertEqual(LoopbackTests.exchange(port, request), b"")
            self.assertEqual(stop(proc, 30), 0)
