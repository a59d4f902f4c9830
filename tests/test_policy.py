"""
Unit tests for access control: L{aproxy.access.policy} (host patterns, private addresses,
L{AccessPolicy}), the checked name resolution of
L{aproxy.upstream.connector.EndpointConnector}, and how
L{aproxy.client.protocol.ProxyProtocol} and L{aproxy.client.factory.ProxyFactory} apply
client admission, connection limits, destination rules, loop detection and C{X-Forwarded-For}.

Everything is synchronous: no DNS, no sockets, time on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aproxy.access.policy import AccessPolicy, embedded_ipv4, is_private, parse_host_pattern
from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig
from aproxy.errors import Forbidden
from aproxy.testing import Attempt, HalfCloseTransport, RecordingConnector
from aproxy.upstream.connector import EndpointConnector
from aproxy.upstream.protocol import UpstreamFactory, UpstreamProtocol

LOCAL_CLIENT = IPv4Address("TCP", "127.0.0.1", 5000)
OK_0 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def get(url: bytes, extra: bytes = b"") -> bytes:
    """An absolute-form GET request head for C{url}, with optional extra field lines."""
    authority = url.split(b"/")[2]
    return b"GET " + url + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra + b"\r\n"


def status_of(response: bytes) -> int:
    """The status code of the response at the start of C{response} (0 if there is none)."""
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def proxy_status(response: bytes) -> bytes | None:
    """The C{Proxy-Status} field value of the response head in C{response}, if any."""
    head = response.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"proxy-status":
            return value.strip()
    return None


def body_of(response: bytes) -> bytes:
    """The body of the (single, Content-Length framed) response in C{response}."""
    return response.split(b"\r\n\r\n", 1)[1]


# -- host patterns and private addresses -----------------------------------------------------


class HostPatternTests(SynchronousTestCase):
    """L{parse_host_pattern} classifies C{--deny-host}/C{--allow-host} patterns."""

    def test_exact_name(self) -> None:
        """A plain name is an exact rule, lowercased and without a trailing dot."""
        self.assertEqual(parse_host_pattern("Example.COM."), ("exact", "example.com"))

    def test_star_is_subdomains_only(self) -> None:
        """C{*.example.com} matches subdomains but not the apex."""
        self.assertEqual(parse_host_pattern("*.example.com"), ("subdomains", "example.com"))
        policy = AccessPolicy(deny_hosts=("*.example.com",))
        self.assertRaises(Forbidden, policy.check_name, "a.example.com")
        self.assertRaises(Forbidden, policy.check_name, "a.b.example.com")
        policy.check_name("example.com")
        policy.check_name("badexample.com")

    def test_leading_dot_is_domain_and_subdomains(self) -> None:
        """C{.example.com} matches the apex and its subdomains, not lookalike names."""
        self.assertEqual(parse_host_pattern(".example.com"), ("domain", "example.com"))
        policy = AccessPolicy(deny_hosts=(".example.com",))
        self.assertRaises(Forbidden, policy.check_name, "example.com")
        self.assertRaises(Forbidden, policy.check_name, "www.example.com")
        policy.check_name("notexample.com")
        policy.check_name("example.com.evil")

    def test_exact_does_not_match_subdomain(self) -> None:
        """An exact rule matches only that name."""
        policy = AccessPolicy(deny_hosts=("example.com",))
        self.assertRaises(Forbidden, policy.check_name, "EXAMPLE.com.")
        policy.check_name("www.example.com")

    def test_ipv4_address_and_cidr(self) -> None:
        """IPv4 addresses and CIDRs are address rules (host bits allowed in a CIDR)."""
        self.assertEqual(
            parse_host_pattern("10.1.2.3"), ("address", ipaddress.ip_network("10.1.2.3/32"))
        )
        self.assertEqual(
            parse_host_pattern("10.1.2.3/8"), ("address", ipaddress.ip_network("10.0.0.0/8"))
        )

    def test_ipv6_address_and_cidr(self) -> None:
        """IPv6 addresses (bracketed or not) and CIDRs are address rules."""
        self.assertEqual(parse_host_pattern("::1"), ("address", ipaddress.ip_network("::1/128")))
        self.assertEqual(parse_host_pattern("[::1]"), ("address", ipaddress.ip_network("::1/128")))
        self.assertEqual(
            parse_host_pattern("FC00::/7"), ("address", ipaddress.ip_network("fc00::/7"))
        )

    def test_bad_patterns(self) -> None:
        """Empty patterns, stray wildcards and empty labels raise ValueError."""
        for text in ("", " ", ".", "*", "*.", "a..b", "*.*.example.com", "a.*.com", "ex*.com"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_host_pattern, text)

    def test_malformed_cidr_is_not_a_name(self) -> None:
        """A malformed address or CIDR raises ValueError rather than becoming a name rule."""
        for text in ("10.0.0.0/33", "10.0.0.0/8x", "::1/129", "192.168.0.0/16/8"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_host_pattern, text)

    def test_pattern_that_cannot_be_a_host_name(self) -> None:
        """Patterns with a port, a path or a space, which no host name can match, are refused."""
        for text in ("example.com:443", "example.com/path", "exa mple.com"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_host_pattern, text)

    def test_config_rejects_bad_pattern(self) -> None:
        """ProxyConfig validates deny-host and allow-host patterns at construction."""
        self.assertRaises(ValueError, ProxyConfig, deny_host=("*",))
        self.assertRaises(ValueError, ProxyConfig, allow_host=("a..b",))


class IsPrivateTests(SynchronousTestCase):
    """L{is_private} says which addresses C{--block-private} refuses."""

    def test_private_addresses(self) -> None:
        """Loopback, RFC 1918, link-local, CGNAT, ULA, multicast, unspecified, mapped: private."""
        for text in (
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
        ):
            with self.subTest(address=text):
                self.assertTrue(is_private(ipaddress.ip_address(text)))

    def test_public_addresses(self) -> None:
        """Global unicast addresses are not private."""
        for text in ("8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2001:4860:4860::8888"):
            with self.subTest(address=text):
                self.assertFalse(is_private(ipaddress.ip_address(text)))


# Issue 12 item 9: IPv6 spellings of private IPv4 addresses and IPv6 ranges that
# --block-private let through. (address, private?, why)
EMBEDDED_AND_IPV6_CASES = (
    ("::127.0.0.1", True, "IPv4-compatible loopback"),
    ("::10.1.2.3", True, "IPv4-compatible RFC 1918"),
    ("::169.254.169.254", True, "IPv4-compatible metadata address"),
    ("::8.8.8.8", False, "IPv4-compatible public address"),
    ("::ffff:127.0.0.1", True, "IPv4-mapped loopback"),
    ("::ffff:8.8.8.8", False, "IPv4-mapped public address"),
    ("::ffff:0:127.0.0.1", True, "SIIT loopback"),
    ("::ffff:0:192.168.1.1", True, "SIIT RFC 1918"),
    ("::ffff:0:8.8.8.8", False, "SIIT public address"),
    ("64:ff9b::127.0.0.1", True, "well-known NAT64 loopback"),
    ("64:ff9b::10.0.0.1", True, "well-known NAT64 RFC 1918"),
    ("64:ff9b::100.64.0.1", True, "well-known NAT64 CGNAT"),
    ("64:ff9b::8.8.8.8", False, "well-known NAT64 public address"),
    ("64:ff9b:1::1", True, "RFC 8215 local-use NAT64"),
    ("64:ff9b:1:ffff::a00:1", True, "RFC 8215 local-use NAT64, end of range"),
    ("2002:7f00:1::1", True, "6to4 of loopback"),
    ("2002:808:808::1", False, "6to4 of a public address"),
    ("fec0::1", True, "site-local"),
    ("feff:ffff::1", True, "site-local, end of range"),
    ("::1:2:3:4", True, "reserved ::/8 outside the embedding prefixes"),
    ("4000::1", True, "reserved, outside global unicast 2000::/3"),
    ("2001:4860:4860::8888", False, "global unicast"),
)


class EmbeddedIPv4Tests(SynchronousTestCase):
    """C{--block-private} judges IPv6 forms of IPv4 addresses by the address inside."""

    def test_table(self) -> None:
        """Each address of the table is private or public as the table says."""
        for text, private, why in EMBEDDED_AND_IPV6_CASES:
            with self.subTest(address=text, why=why):
                self.assertEqual(is_private(ipaddress.ip_address(text)), private)

    def test_literal_targets_refused(self) -> None:
        """The bracketed literals a client writes in a URL are refused before dialing."""
        policy = AccessPolicy(block_private=True)
        for text, private, why in EMBEDDED_AND_IPV6_CASES:
            with self.subTest(address=text, why=why):
                if private:
                    err = self.assertRaises(Forbidden, policy.check_name, text)
                    self.assertEqual(err.details, "block-private")
                else:
                    policy.check_name(text)

    def test_resolved_addresses_refused(self) -> None:
        """A name resolving to such an address (AAAA record) is refused too."""
        policy = AccessPolicy(block_private=True)
        for text, private, why in EMBEDDED_AND_IPV6_CASES:
            with self.subTest(address=text, why=why):
                if private:
                    self.assertRaises(Forbidden, policy.check_address, "aaaa.example", text)
                else:
                    policy.check_address("aaaa.example", text)

    def test_embedded_ipv4(self) -> None:
        """L{embedded_ipv4} finds the IPv4 address in each embedding form, and only there."""
        for text, inner in (
            ("::127.0.0.1", "127.0.0.1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("::ffff:0:10.0.0.1", "10.0.0.1"),
            ("64:ff9b::10.0.0.1", "10.0.0.1"),
            ("2002:a00:1::", "10.0.0.1"),
            ("64:ff9b:1::a00:1", None),
            ("2001:db8::a00:1", None),
            ("10.0.0.1", None),
        ):
            with self.subTest(address=text):
                found = embedded_ipv4(ipaddress.ip_address(text))
                self.assertEqual(found, None if inner is None else ipaddress.ip_address(inner))

    def test_deny_rule_covers_ipv6_forms(self) -> None:
        """A C{--deny-host} IPv4 network also refuses the IPv6 forms that carry its addresses."""
        policy = AccessPolicy(deny_hosts=("10.0.0.0/8",))
        for text in ("::10.1.2.3", "::ffff:0:10.1.2.3", "64:ff9b::10.1.2.3", "2002:a01:203::1"):
            with self.subTest(address=text):
                err = self.assertRaises(Forbidden, policy.check_name, text)
                self.assertEqual(err.details, "deny-host 10.0.0.0/8")
        policy.check_name("::ffff:0:11.1.2.3")


# -- AccessPolicy ----------------------------------------------------------------------------


class ClientAllowedTests(SynchronousTestCase):
    """L{AccessPolicy.client_allowed} admits clients by network."""

    def test_defaults_allow_loopback_only(self) -> None:
        """By default loopback clients (IPv4 and IPv6) are allowed and others are not."""
        policy = AccessPolicy()
        self.assertTrue(policy.client_allowed("127.0.0.1"))
        self.assertTrue(policy.client_allowed("127.8.9.10"))
        self.assertTrue(policy.client_allowed("::1"))
        self.assertFalse(policy.client_allowed("10.0.0.1"))
        self.assertFalse(policy.client_allowed("::2"))

    def test_custom_networks(self) -> None:
        """Custom CIDRs replace the defaults."""
        policy = AccessPolicy(allow_clients=("10.0.0.0/8", "2001:db8::/32"))
        self.assertTrue(policy.client_allowed("10.255.0.1"))
        self.assertTrue(policy.client_allowed("2001:db8::5"))
        self.assertFalse(policy.client_allowed("11.0.0.1"))
        self.assertFalse(policy.client_allowed("127.0.0.1"))

    def test_ipv4_mapped_client(self) -> None:
        """An IPv4-mapped IPv6 client address is checked as the IPv4 address it maps."""
        policy = AccessPolicy(allow_clients=("10.0.0.0/8",))
        self.assertTrue(policy.client_allowed("::ffff:10.1.2.3"))
        self.assertFalse(policy.client_allowed("::ffff:11.1.2.3"))
        self.assertTrue(AccessPolicy().client_allowed("::ffff:127.0.0.1"))

    def test_not_an_address(self) -> None:
        """A peer that is not an IP address (e.g. a UNIX socket path) is refused."""
        self.assertFalse(AccessPolicy().client_allowed("/run/aproxy.sock"))


class CheckNameTests(SynchronousTestCase):
    """L{AccessPolicy.check_name} applies rules to the destination as written."""

    def test_deny_by_name(self) -> None:
        """A denied name is refused with 403 http_request_denied naming the rule."""
        policy = AccessPolicy(deny_hosts=("*.evil.example",))
        err = self.assertRaises(Forbidden, policy.check_name, "www.evil.example")
        self.assertEqual(err.status, 403)
        self.assertEqual(err.error_type, "http_request_denied")
        self.assertIn("*.evil.example", err.reason)
        self.assertIn("www.evil.example", err.reason)
        self.assertEqual(err.details, "deny-host *.evil.example")

    def test_no_rules_allow_everything(self) -> None:
        """Without rules any name or literal is allowed and no address check is needed."""
        policy = AccessPolicy()
        policy.check_name("example.com")
        policy.check_name("127.0.0.1")
        self.assertFalse(policy.needs_address_check())

    def test_allow_rules_only_matching(self) -> None:
        """With name allow rules, only matching names pass; others get http_request_denied."""
        policy = AccessPolicy(allow_hosts=(".example.com", "api.test"))
        policy.check_name("example.com")
        policy.check_name("a.example.com")
        policy.check_name("api.test")
        err = self.assertRaises(Forbidden, policy.check_name, "other.test")
        self.assertEqual((err.status, err.error_type), (403, "http_request_denied"))
        self.assertIn("--allow-host", err.reason)

    def test_literal_against_address_deny(self) -> None:
        """A literal address target is checked against address rules: destination_ip_prohibited."""
        policy = AccessPolicy(deny_hosts=("10.0.0.0/8",))
        err = self.assertRaises(Forbidden, policy.check_name, "10.1.2.3")
        self.assertEqual((err.status, err.error_type), (403, "destination_ip_prohibited"))
        self.assertIn("10.0.0.0/8", err.reason)
        self.assertEqual(err.details, "deny-host 10.0.0.0/8")
        policy.check_name("11.1.2.3")

    def test_ipv6_literal_against_address_deny(self) -> None:
        """IPv6 literals, IPv4-mapped ones included, are checked against address rules."""
        policy = AccessPolicy(deny_hosts=("127.0.0.0/8", "fc00::/7"))
        self.assertRaises(Forbidden, policy.check_name, "fd00::1")
        self.assertRaises(Forbidden, policy.check_name, "::ffff:127.0.0.1")
        policy.check_name("2001:db8::1")

    def test_literal_not_matched_by_name_allow(self) -> None:
        """With only name allow rules, a literal address target is refused."""
        policy = AccessPolicy(allow_hosts=("example.com",))
        err = self.assertRaises(Forbidden, policy.check_name, "93.184.216.34")
        self.assertEqual(err.error_type, "destination_ip_prohibited")

    def test_literal_with_block_private(self) -> None:
        """C{--block-private} refuses a private literal target before any connection."""
        policy = AccessPolicy(block_private=True)
        err = self.assertRaises(Forbidden, policy.check_name, "169.254.169.254")
        self.assertEqual(
            (err.error_type, err.details), ("destination_ip_prohibited", "block-private")
        )
        policy.check_name("8.8.8.8")

    def test_names_deferred_to_address_check(self) -> None:
        """With address rules, a name passes check_name; the addresses are checked later."""
        policy = AccessPolicy(deny_hosts=("127.0.0.1",), allow_hosts=("10.0.0.0/8",))
        policy.check_name("anything.example")
        self.assertTrue(policy.needs_address_check())

    def test_deny_wins_over_allow(self) -> None:
        """A name matching both a deny and an allow rule is refused."""
        policy = AccessPolicy(deny_hosts=("*.example.com",), allow_hosts=(".example.com",))
        self.assertRaises(Forbidden, policy.check_name, "www.example.com")
        policy.check_name("example.com")


class CheckAddressTests(SynchronousTestCase):
    """L{AccessPolicy.check_address} applies address rules to each resolved address."""

    def test_block_private(self) -> None:
        """C{--block-private} refuses private resolved addresses and allows public ones."""
        policy = AccessPolicy(block_private=True)
        self.assertTrue(policy.needs_address_check())
        for address in ("127.0.0.1", "10.0.0.1", "::1", "::ffff:192.168.0.1", "100.64.0.1"):
            with self.subTest(address=address):
                err = self.assertRaises(Forbidden, policy.check_address, "rebind.example", address)
                self.assertEqual(err.error_type, "destination_ip_prohibited")
                self.assertIn("rebind.example", err.reason)
                self.assertIn("private", err.reason)
        policy.check_address("public.example", "8.8.8.8")
        policy.check_address("public.example", "2001:4860:4860::8888")

    def test_address_deny(self) -> None:
        """An address deny rule refuses the addresses inside it, naming the rule."""
        policy = AccessPolicy(deny_hosts=("192.0.2.0/24",))
        err = self.assertRaises(Forbidden, policy.check_address, "a.example", "192.0.2.7")
        self.assertEqual((err.status, err.error_type), (403, "destination_ip_prohibited"))
        self.assertEqual(err.details, "deny-host 192.0.2.0/24")
        policy.check_address("a.example", "198.51.100.7")

    def test_address_allow(self) -> None:
        """With an address allow rule, only addresses inside it (or allowed names) pass."""
        policy = AccessPolicy(allow_hosts=("198.51.100.0/24", "named.example"))
        policy.check_address("a.example", "198.51.100.7")
        policy.check_address("named.example", "203.0.113.1")
        err = self.assertRaises(Forbidden, policy.check_address, "a.example", "203.0.113.1")
        self.assertEqual((err.error_type, err.details), ("destination_ip_prohibited", "allow-host"))

    def test_deny_wins_over_allow(self) -> None:
        """An address inside both a deny and an allow rule is refused."""
        policy = AccessPolicy(deny_hosts=("10.0.0.5",), allow_hosts=("10.0.0.0/8",))
        self.assertRaises(Forbidden, policy.check_address, "x.example", "10.0.0.5")
        policy.check_address("x.example", "10.0.0.6")

    def test_block_private_wins_over_allow(self) -> None:
        """C{--block-private} refuses a private address even if an allow rule matches it."""
        policy = AccessPolicy(allow_hosts=("internal.example",), block_private=True)
        self.assertRaises(Forbidden, policy.check_address, "internal.example", "10.0.0.1")


# -- EndpointConnector with address checks --------------------------------------------------


class Resolver:
    """A fake C{resolve}: records the calls and answers from a table (or fails)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Deferred[list[str]]:
        """Answer C{host} from the table, or fail with L{DNSLookupError}."""
        self.calls.append((host, port))
        if host in self.answers:
            return succeed(list(self.answers[host]))
        return fail(DNSLookupError(host))


class CheckedConnectorTests(SynchronousTestCase):
    """L{EndpointConnector} with C{check_address} connects only to addresses that passed."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.policy = AccessPolicy(block_private=True)
        self.resolver = Resolver(
            {
                "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
                "mixed.example": ["127.0.0.1", "93.184.216.34", "10.0.0.1", "1.1.1.1"],
                "rebind.example": ["127.0.0.1", "169.254.169.254", "::1"],
            }
        )
        self.connector = EndpointConnector(
            self.reactor, 5.0, self.policy.check_address, self.resolver
        )
        self.factory = UpstreamFactory()

    def dialed(self) -> list[tuple[str, int]]:
        """The (host, port) pairs passed to the reactor's connectTCP so far."""
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def complete(self, index: int) -> None:
        """Complete the C{index}th recorded connection attempt on a L{StringTransport}."""
        factory = self.reactor.tcpClients[index][2]
        proto = factory.buildProtocol(None)
        assert proto is not None
        proto.makeConnection(StringTransport())

    def refuse(self, index: int) -> None:
        """Make the C{index}th recorded connection attempt fail with connection refused."""
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError())
        )

    def test_connects_to_first_passing_address(self) -> None:
        """A name is resolved by the connector and the first allowed address is dialed."""
        d = self.connector.connect("public.example", 80, self.factory)
        self.assertEqual(self.resolver.calls, [("public.example", 80)])
        self.assertEqual(self.dialed(), [("93.184.216.34", 80)])
        self.assertNoResult(d)
        self.complete(0)
        self.assertIsInstance(self.successResultOf(d), UpstreamProtocol)

    def test_skips_refused_addresses_in_order(self) -> None:
        """Refused addresses are never dialed; the allowed ones are tried in resolver order."""
        d = self.connector.connect("mixed.example", 8080, self.factory)
        self.assertEqual(self.dialed(), [("93.184.216.34", 8080)])
        self.refuse(0)
        self.assertEqual(self.dialed(), [("93.184.216.34", 8080), ("1.1.1.1", 8080)])
        self.assertNoResult(d)
        self.complete(1)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_last_allowed_address_failure_propagates(self) -> None:
        """When every allowed address refuses the connection, that error is the result."""
        d = self.connector.connect("mixed.example", 80, self.factory)
        self.refuse(0)
        self.refuse(1)
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual([h for h, _ in self.dialed()], ["93.184.216.34", "1.1.1.1"])

    def test_all_refused(self) -> None:
        """If every address is refused, nothing is dialed and the result is the policy's 403."""
        d = self.connector.connect("rebind.example", 80, self.factory)
        failure = self.failureResultOf(d, Forbidden)
        self.assertEqual(failure.value.error_type, "destination_ip_prohibited")
        self.assertIn("127.0.0.1", failure.value.reason)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_dns_failure(self) -> None:
        """A failed lookup propagates as DNSLookupError and nothing is dialed."""
        d = self.connector.connect("nxdomain.example", 80, self.factory)
        self.failureResultOf(d, DNSLookupError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_empty_answer(self) -> None:
        """A lookup with no addresses fails with DNSLookupError."""
        self.resolver.answers["empty.example"] = []
        d = self.connector.connect("empty.example", 80, self.factory)
        self.failureResultOf(d, DNSLookupError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_literal_not_resolved(self) -> None:
        """An IP literal is dialed directly, without a lookup."""
        d = self.connector.connect("198.51.100.9", 81, self.factory)
        self.assertEqual(self.resolver.calls, [])
        self.assertEqual(self.dialed(), [("198.51.100.9", 81)])
        self.complete(0)
        self.successResultOf(d)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling the connection attempt stops it without trying the next address."""
        d = self.connector.connect("mixed.example", 80, self.factory)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_without_check_a_name_is_looked_up_then_raced(self) -> None:
        """
        Without check_address a name is looked up through the connector's bounded lookups
        too (never by the endpoint on the reactor's thread pool), and a HostnameEndpoint
        then races the addresses found (Happy Eyeballs): the next one is tried after a
        short delay while the first is still connecting.
        """
        connector = EndpointConnector(self.reactor, 7.0, None, self.resolver)
        d = connector.connect("public.example", 80, self.factory)
        self.assertEqual(self.resolver.calls, [("public.example", 80)])
        self.reactor.advance(0)
        self.assertEqual(self.dialed(), [("93.184.216.34", 80)])
        self.reactor.advance(1)
        self.assertEqual(self.dialed(), [("93.184.216.34", 80), ("2606:2800:220:1::1", 80)])
        self.complete(1)
        self.assertIsInstance(self.successResultOf(d), UpstreamProtocol)
        self.assertEqual(connector.lookups.running, 0)

    def test_factory_uses_checked_connector_only_when_needed(self) -> None:
        """ProxyFactory passes an address check to its connector only if a rule needs it."""
        plain = ProxyFactory(ProxyConfig(deny_host=("evil.example",)), self.reactor)
        checked = ProxyFactory(ProxyConfig(block_private=True), self.reactor)
        assert isinstance(plain.connector, EndpointConnector)
        assert isinstance(checked.connector, EndpointConnector)
        self.assertIsNone(plain.connector._check)
        self.assertIsNotNone(checked.connector._check)


# -- the proxy protocol ----------------------------------------------------------------------


class PolicyProxyTestCase(SynchronousTestCase):
    """Builds a factory with a fake clock and recording connector for a given config."""

    def make_factory(self, config: ProxyConfig | None = None) -> ProxyFactory:
        """A factory on a fresh clock and L{RecordingConnector}, kept as C{self.factory}."""
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(config or ProxyConfig(), self.clock, self.connector)
        return self.factory

    def connect_client(
        self, peer: IPv4Address | IPv6Address = LOCAL_CLIENT
    ) -> tuple[HalfCloseTransport, ProxyProtocol]:
        """A new client connection from C{peer}."""
        proto = self.factory.buildProtocol(peer)
        client = HalfCloseTransport(peerAddress=peer)
        proto.makeConnection(client)
        return client, proto

    def request(
        self, data: bytes, config: ProxyConfig | None = None
    ) -> tuple[HalfCloseTransport, ProxyProtocol]:
        """Send C{data} on a new loopback client connection (new factory if C{config})."""
        if config is not None or not hasattr(self, "factory"):
            self.make_factory(config)
        client, proto = self.connect_client()
        proto.dataReceived(data)
        return client, proto

    def assert_refused(
        self, client: StringTransport, status: int, error: bytes
    ) -> tuple[bytes, bytes]:
        """The client got C{status} with Proxy-Status C{error}, was closed, nothing dialed."""
        value = client.value()
        self.assertEqual(status_of(value), status, value)
        self.assertTrue((proxy_status(value) or b"").startswith(b"aproxy; error=" + error), value)
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.connector.attempts, [])
        return proxy_status(value) or b"", body_of(value)


class AdmissionTests(PolicyProxyTestCase):
    """Clients are admitted by network and counted against the connection limits."""

    def test_client_not_allowed(self) -> None:
        """A client outside --allow gets 403 at once and is closed; nothing is dialed."""
        self.make_factory()
        client, proto = self.connect_client(IPv4Address("TCP", "10.1.2.3", 5000))
        _, body = self.assert_refused(client, 403, b"http_request_denied")
        self.assertIn(b"--allow", body)
        proto.dataReceived(get(b"http://a.example/"))
        self.assertEqual(self.connector.attempts, [])
        proto.connectionLost(Failure(Exception()))
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(self.factory.clients_per_ip, {})

    def test_custom_allow(self) -> None:
        """A client inside a custom --allow network is served."""
        self.make_factory(ProxyConfig(allow=("10.0.0.0/8",)))
        client, proto = self.connect_client(IPv4Address("TCP", "10.1.2.3", 5000))
        proto.dataReceived(get(b"http://a.example/"))
        self.assertEqual(client.value(), b"")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_ipv6_mapped_client_allowed(self) -> None:
        """A loopback client seen as an IPv4-mapped IPv6 address is served by default."""
        self.make_factory()
        client, proto = self.connect_client(IPv6Address("TCP", "::ffff:127.0.0.1", 5000))
        proto.dataReceived(get(b"http://a.example/"))
        self.assertEqual(client.value(), b"")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_max_clients_per_ip(self) -> None:
        """Beyond max_clients_per_ip, a connection gets 503; after one closes, one more fits."""
        self.make_factory(ProxyConfig(max_clients_per_ip=2))
        first, proto1 = self.connect_client()
        second, _ = self.connect_client()
        self.assertFalse(first.disconnecting or second.disconnecting)
        third, proto3 = self.connect_client()
        self.assertEqual(status_of(third.value()), 503)
        self.assertEqual(proxy_status(third.value()), b"aproxy; error=connection_limit_reached")
        self.assertTrue(third.disconnecting)
        proto3.connectionLost(Failure(Exception()))
        proto1.connectionLost(Failure(Exception()))
        fourth, proto4 = self.connect_client()
        self.assertEqual(fourth.value(), b"")
        self.assertFalse(fourth.disconnecting)
        proto4.dataReceived(get(b"http://a.example/"))
        self.assertEqual(len(self.connector.attempts), 1)

    def test_max_clients_per_ip_counts_each_address(self) -> None:
        """The per-address limit does not affect clients from another address."""
        self.make_factory(ProxyConfig(max_clients_per_ip=1))
        self.connect_client(IPv4Address("TCP", "127.0.0.1", 5000))
        other, _ = self.connect_client(IPv4Address("TCP", "127.0.0.2", 5000))
        self.assertEqual(other.value(), b"")
        again, _ = self.connect_client(IPv4Address("TCP", "127.0.0.1", 5001))
        self.assertEqual(status_of(again.value()), 503)

    def test_max_connections(self) -> None:
        """Beyond max_connections (across addresses) a connection gets 503 until one closes."""
        self.make_factory(ProxyConfig(max_connections=2))
        _, proto1 = self.connect_client(IPv4Address("TCP", "127.0.0.1", 5000))
        self.connect_client(IPv4Address("TCP", "127.0.0.2", 5000))
        third, proto3 = self.connect_client(IPv4Address("TCP", "127.0.0.3", 5000))
        self.assertEqual(status_of(third.value()), 503)
        self.assertEqual(proxy_status(third.value()), b"aproxy; error=connection_limit_reached")
        self.assertTrue(third.disconnecting)
        proto3.connectionLost(Failure(Exception()))
        proto1.connectionLost(Failure(Exception()))
        self.assertEqual(self.factory.open_connections, 1)
        fourth, _ = self.connect_client(IPv4Address("TCP", "127.0.0.4", 5000))
        self.assertEqual(fourth.value(), b"")
        self.assertFalse(fourth.disconnecting)


class DestinationTests(PolicyProxyTestCase):
    """Destination rules are applied to each request before anything is dialed."""

    def test_deny_host_by_name(self) -> None:
        """A request to a denied name gets 403 with Proxy-Status and a body naming the rule."""
        client, _ = self.request(
            get(b"http://www.evil.example/"), ProxyConfig(deny_host=(".evil.example",))
        )
        status, body = self.assert_refused(client, 403, b"http_request_denied")
        self.assertEqual(
            status, b'aproxy; error=http_request_denied; details="deny-host .evil.example"'
        )
        self.assertIn(b".evil.example", body)

    def test_deny_host_literal(self) -> None:
        """A literal address target inside a denied network gets 403 destination_ip_prohibited."""
        client, _ = self.request(
            get(b"http://10.9.8.7:8000/"), ProxyConfig(deny_host=("10.0.0.0/8",))
        )
        self.assert_refused(client, 403, b"destination_ip_prohibited")

    def test_deny_host_connect(self) -> None:
        """A CONNECT to a denied name is refused the same way."""
        client, _ = self.request(
            b"CONNECT www.evil.example:443 HTTP/1.1\r\nHost: www.evil.example:443\r\n\r\n",
            ProxyConfig(deny_host=(".evil.example",)),
        )
        self.assert_refused(client, 403, b"http_request_denied")

    def test_allow_host(self) -> None:
        """With --allow-host, a matching name is dialed and another is refused."""
        config = ProxyConfig(allow_host=("*.good.example",))
        client, _ = self.request(get(b"http://other.example/"), config)
        self.assert_refused(client, 403, b"http_request_denied")
        ok, proto = self.connect_client()
        proto.dataReceived(get(b"http://www.good.example/"))
        self.assertEqual(ok.value(), b"")
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("www.good.example", 80))

    def test_block_private_literal(self) -> None:
        """With --block-private, a request to the metadata address is refused without a dial."""
        client, _ = self.request(
            get(b"http://169.254.169.254/latest/meta-data/"), ProxyConfig(block_private=True)
        )
        self.assert_refused(client, 403, b"destination_ip_prohibited")

    def test_block_private_ipv6_forms_of_loopback(self) -> None:
        """
        With --block-private, IPv6 literals that carry a loopback IPv4 address (compatible,
        SIIT, NAT64) or lie in local NAT64 or site-local ranges are refused, for plain
        requests and CONNECT alike, without a dial.
        """
        config = ProxyConfig(block_private=True, connect_ports=None)
        for literal in (
            b"[::127.0.0.1]",
            b"[::ffff:0:127.0.0.1]",
            b"[64:ff9b::127.0.0.1]",
            b"[64:ff9b:1::7f00:1]",
            b"[fec0::1]",
        ):
            with self.subTest(literal=literal):
                client, _ = self.request(get(b"http://" + literal + b":8080/"), config)
                self.assert_refused(client, 403, b"destination_ip_prohibited")
                authority = literal + b":22"
                client, _ = self.request(
                    b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n",
                    config,
                )
                self.assert_refused(client, 403, b"destination_ip_prohibited")

    def test_refusal_from_connector(self) -> None:
        """A Forbidden raised by the connector (an address check) becomes its 403."""
        self.make_factory(ProxyConfig(block_private=True))
        client, proto = self.connect_client()
        proto.dataReceived(get(b"http://rebind.example/"))
        [attempt] = self.connector.attempts
        attempt.deferred.errback(
            Forbidden(
                "destination rebind.example (127.0.0.1) is private", "destination_ip_prohibited"
            )
        )
        self.assertEqual(status_of(client.value()), 403)
        self.assertEqual(proxy_status(client.value()), b"aproxy; error=destination_ip_prohibited")


class HttpPortsTests(PolicyProxyTestCase):
    """
    C{--http-ports} limits the ports absolute-form requests reach (issue 12 item 10): a
    plain C{POST http://host:25/} must not deliver SMTP commands line by line.
    """

    def assert_port_refused(self, client: StringTransport, port: int) -> None:
        """403 http_request_denied naming the port and the option; nothing dialed."""
        status, body = self.assert_refused(client, 403, b"http_request_denied")
        self.assertEqual(status, b'aproxy; error=http_request_denied; details="port %d"' % port)
        self.assertIn(b"--http-ports", body)

    def test_default_refuses_privileged_ports(self) -> None:
        """By default, ports below 1025 other than 80 and 443 are refused, http and https."""
        for url, port in (
            (b"http://mail.example:25/", 25),
            (b"http://mail.example:465/", 465),
            (b"https://mail.example:587/", 587),
            (b"http://ssh.example:22/", 22),
            (b"http://mail.example:1024/", 1024),
        ):
            with self.subTest(url=url):
                client, _ = self.request(get(url), ProxyConfig())
                self.assert_port_refused(client, port)

    def test_smtp_post_not_delivered(self) -> None:
        """The body of a POST to port 25 is never sent anywhere: the client is closed."""
        body = b"HELO x\r\nMAIL FROM:<a@b>\r\n"
        client, _ = self.request(
            b"POST http://mail.example:25/ HTTP/1.1\r\nHost: mail.example:25\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            ProxyConfig(),
        )
        self.assert_port_refused(client, 25)

    def test_default_allows_web_and_unprivileged_ports(self) -> None:
        """80, 443 (the default ports of http and https too) and 1025-65535 are allowed."""
        self.make_factory(ProxyConfig())
        for url, port in (
            (b"http://a.example/", 80),
            (b"https://a.example/", 443),
            (b"http://a.example:443/", 443),
            (b"http://a.example:1025/", 1025),
            (b"http://a.example:8080/", 8080),
            (b"https://a.example:65535/", 65535),
        ):
            with self.subTest(url=url):
                client, proto = self.connect_client()
                proto.dataReceived(get(url))
                self.assertEqual(client.value(), b"")
                self.assertEqual(self.connector.attempts[-1].port, port)

    def test_refused_through_a_parent(self) -> None:
        """A request routed to a parent proxy is refused the same: the parent would reach it."""
        config = ProxyConfig(upstream="http://parent.example:3128")
        client, _ = self.request(get(b"http://mail.example:25/"), config)
        self.assert_port_refused(client, 25)
        ok, proto = self.connect_client()
        proto.dataReceived(get(b"http://a.example:8080/"))
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))

    def test_custom_list_and_any(self) -> None:
        """A custom list replaces the default; None (C{*}) allows every port."""
        config = ProxyConfig(http_ports=((80, 80), (8000, 8010)))
        client, _ = self.request(get(b"http://a.example:8443/"), config)
        self.assert_port_refused(client, 8443)
        client, _ = self.request(get(b"http://a.example:25/"), ProxyConfig(http_ports=None))
        self.assertEqual(client.value(), b"")
        self.assertEqual(self.connector.attempts[-1].port, 25)

    def test_connect_not_affected(self) -> None:
        """CONNECT is governed by --connect-ports alone."""
        config = ProxyConfig(http_ports=((80, 80),), connect_ports=((8443, 8443),))
        client, _ = self.request(
            b"CONNECT a.example:8443 HTTP/1.1\r\nHost: a.example:8443\r\n\r\n", config
        )
        self.assertEqual(client.value(), b"")
        self.assertEqual(self.connector.attempts[-1].port, 8443)

    def test_config_validation(self) -> None:
        """Port ranges outside 1..65535 or reversed are refused, naming http-ports."""
        for ranges in (((0, 80),), ((80, 65536),), ((90, 80),)):
            with self.subTest(ranges=ranges):
                err = self.assertRaises(ValueError, ProxyConfig, http_ports=ranges)
                self.assertIn("http-ports", str(err))


class LoopTests(PolicyProxyTestCase):
    """Requests that would come back to this proxy are refused with proxy_loop_detected."""

    def assert_loop(self, client: StringTransport) -> None:
        """The client got 403 proxy_loop_detected and was closed."""
        value = client.value()
        dialed = [(a.host, a.port) for a in self.connector.attempts]
        self.assertEqual(status_of(value), 403, f"response {value!r}, dialed {dialed}")
        self.assertEqual(proxy_status(value), b"aproxy; error=proxy_loop_detected")
        self.assertTrue(client.disconnecting)

    def test_own_via_marker(self) -> None:
        """A request whose Via carries this proxy's own marker gets 403 and is not dialed."""
        self.make_factory()
        via = b"Via: 1.1 aproxy (" + self.factory.loops.marker + b")\r\n"
        client, _ = self.request(get(b"http://a.example/", via))
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def test_own_marker_among_several_via_fields(self) -> None:
        """The marker is found in any Via field line, in any member of the list."""
        self.make_factory()
        via = (
            b"Via: 1.1 other\r\nVia: 1.0 fred, 1.1 aproxy (" + self.factory.loops.marker + b")\r\n"
        )
        client, _ = self.request(get(b"http://a.example/", via))
        self.assert_loop(client)

    def test_own_marker_on_connect(self) -> None:
        """A CONNECT carrying this proxy's marker is a loop too."""
        self.make_factory(ProxyConfig(connect_ports=None))
        client, _ = self.request(
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nVia: 1.1 aproxy ("
            + self.factory.loops.marker
            + b")\r\n\r\n"
        )
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def test_other_aproxy_via_forwarded(self) -> None:
        """A Via from another aproxy instance (another marker) is forwarded with ours appended."""
        self.make_factory()
        other = ProxyFactory(ProxyConfig(), self.clock, RecordingConnector())
        self.assertNotEqual(other.loops.marker, self.factory.loops.marker)
        assert other.via is not None and self.factory.via is not None
        client, _ = self.request(get(b"http://a.example/", b"Via: 1.1 " + other.via + b"\r\n"))
        [attempt] = self.connector.attempts
        upstream_transport = attempt.succeed()
        head = upstream_transport.value()
        self.assertIn(b"Via: 1.1 " + other.via + b"\r\n", head)
        self.assertIn(b"Via: 1.1 " + self.factory.via + b"\r\n", head)
        self.assertEqual(client.value(), b"")

    def test_marker_is_in_forwarded_via(self) -> None:
        """The Via the proxy appends carries its marker, so a looped request is recognised."""
        self.make_factory()
        self.request(get(b"http://a.example/"))
        upstream_transport = self.connector.attempts[0].succeed()
        self.assertIn(b"(" + self.factory.loops.marker + b")", upstream_transport.value())

    def test_literal_own_address(self) -> None:
        """A literal target equal to a listening address gets 403 without a dial."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://127.0.0.1:8080/"))
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def test_literal_own_address_other_port_allowed(self) -> None:
        """The same address on another port is not this proxy."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://127.0.0.1:8081/"))
        self.assertEqual(client.value(), b"")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_wildcard_listener(self) -> None:
        """With a 0.0.0.0 listener, any loopback address on its port is a loop; others are not."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "0.0.0.0", 8080))
        for url in (b"http://127.0.0.2:8080/", b"http://0.0.0.0:8080/", b"http://[::1]:8080/"):
            with self.subTest(url=url):
                client, _ = self.request(get(url))
                self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])
        ok, _ = self.request(get(b"http://127.0.0.1:8081/"))
        self.assertEqual(ok.value(), b"")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_ipv4_mapped_literal_own_address(self) -> None:
        """An IPv4-mapped IPv6 literal of a listening address is a loop too."""
        self.make_factory(ProxyConfig(via=None))
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://[::ffff:127.0.0.1]:8080/"))
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def test_ipv4_mapped_literal_wildcard_listener(self) -> None:
        """With a 0.0.0.0 listener, an IPv4-mapped loopback literal on its port is a loop."""
        self.make_factory(ProxyConfig(via=None))
        self.factory.loops.note_listening(IPv4Address("TCP", "0.0.0.0", 8080))
        client, _ = self.request(get(b"http://[::ffff:127.0.0.2]:8080/"))
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def test_unspecified_literal_own_port(self) -> None:
        """0.0.0.0 on a listening port reaches this host, so it is a loop too."""
        self.make_factory(ProxyConfig(via=None))
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://0.0.0.0:8080/"))
        self.assert_loop(client)
        self.assertEqual(self.connector.attempts, [])

    def complete_with_peer(
        self, attempt: Attempt, peer: IPv4Address | IPv6Address
    ) -> HalfCloseTransport:
        """Complete C{attempt} on a transport whose peer is C{peer}."""
        proto = attempt.factory.buildProtocol(None)
        assert isinstance(proto, UpstreamProtocol)
        transport = HalfCloseTransport(peerAddress=peer)
        proto.makeConnection(transport)
        attempt.transport = transport
        attempt.protocol = proto
        attempt.deferred.callback(proto)
        return transport

    def test_name_connected_to_own_address(self) -> None:
        """A name whose connection lands on a listening address is a loop: aborted, 403."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://localhost:8080/"))
        [attempt] = self.connector.attempts
        upstream_transport = self.complete_with_peer(attempt, IPv4Address("TCP", "127.0.0.1", 8080))
        self.assert_loop(client)
        self.assertTrue(upstream_transport.disconnecting)
        self.assertEqual(upstream_transport.value(), b"")

    def test_name_connected_to_ipv4_mapped_own_address(self) -> None:
        """A connection whose peer is the IPv4-mapped form of a listening address is a loop."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://self.example:8080/"))
        [attempt] = self.connector.attempts
        upstream_transport = self.complete_with_peer(
            attempt, IPv6Address("TCP", "::ffff:127.0.0.1", 8080)
        )
        self.assert_loop(client)
        self.assertEqual(upstream_transport.value(), b"")

    def test_name_connected_to_unspecified_own_port(self) -> None:
        """A name resolving to 0.0.0.0, connected on a listening port, is a loop."""
        self.make_factory(ProxyConfig(via=None))
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://zero.example:8080/"))
        [attempt] = self.connector.attempts
        upstream_transport = self.complete_with_peer(attempt, IPv4Address("TCP", "0.0.0.0", 8080))
        self.assert_loop(client)
        self.assertEqual(upstream_transport.value(), b"")

    def test_name_connected_elsewhere_forwarded(self) -> None:
        """A name whose connection lands elsewhere is forwarded normally."""
        self.make_factory()
        self.factory.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        client, _ = self.request(get(b"http://localhost:8081/"))
        [attempt] = self.connector.attempts
        upstream_transport = self.complete_with_peer(attempt, IPv4Address("TCP", "127.0.0.1", 8081))
        self.assertTrue(upstream_transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        attempt.respond(OK_0)
        self.assertEqual(status_of(client.value()), 200)


class XForwardedForTests(PolicyProxyTestCase):
    """C{--x-forwarded-for} add, strip or keep change the forwarded head as documented."""

    REQUEST = get(b"http://a.example/", b"X-Forwarded-For: 198.51.100.1\r\n")

    def forwarded(self, mode: str, request: bytes = REQUEST) -> bytes:
        """The head the origin gets for C{request} with C{x_forwarded_for=mode}."""
        self.make_factory(ProxyConfig(x_forwarded_for=mode, via=None))
        self.request(request)
        [attempt] = self.connector.attempts
        value: bytes = attempt.succeed().value()
        return value

    def test_add(self) -> None:
        """ "add" keeps incoming values and appends the client's address."""
        self.assertEqual(
            self.forwarded("add"),
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 198.51.100.1\r\n"
            b"X-Forwarded-For: 127.0.0.1\r\n\r\n",
        )

    def test_add_without_incoming(self) -> None:
        """ "add" without an incoming field adds one with the client's address."""
        self.assertEqual(
            self.forwarded("add", get(b"http://a.example/")),
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n",
        )

    def test_strip(self) -> None:
        """ "strip" removes incoming X-Forwarded-For fields and adds none."""
        self.assertEqual(self.forwarded("strip"), b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")

    def test_keep(self) -> None:
        """ "keep" (the default) forwards incoming values untouched and adds nothing."""
        self.assertEqual(
            self.forwarded("keep"),
            b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n",
        )
        self.assertEqual(ProxyConfig().x_forwarded_for, "keep")

    def test_bad_mode(self) -> None:
        """Any other mode is refused by ProxyConfig."""
        self.assertRaises(ValueError, ProxyConfig, x_forwarded_for="append")
