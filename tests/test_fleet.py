"""
Cache fleets (C{--route PATTERN=hash:URL,URL,...}): who owns a URL, members that fail,
and the proxy sending each URL to its owner, on fake transports and then with three
proxies on loopback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aproxy import ProxyConfig, ProxyFactory
from aproxy.run.tap import Options
from aproxy.upstream.routes import (
    FLEET_DOWN,
    Fleet,
    Parent,
    Router,
    fleet_forwarded,
    fleet_key,
    parse_parent,
    parse_route,
)
from tests.loopback import LOCAL, fetch_all
from tests.origin import Origin, OriginProtocol, OriginRequest, respond
from tests.support import ProxyTestCase
from tests.tracking import ConnectionTracking

A, B, C = "http://192.0.2.1:3128", "http://192.0.2.2:3128", "http://127.0.0.1:8080"
ROUTE = f"*.fleet.example=hash:{A},{B},{C}"
FRESH = b"Cache-Control: max-age=600"


def urls(n: int) -> list[bytes]:
    """C{n} distinct URL keys."""
    return [b"http://a.example/%d" % i for i in range(n)]


class FleetRouteTests(SynchronousTestCase):
    """C{hash:} route targets and what a fleet needs to know about itself."""

    def test_parse(self) -> None:
        """The members are parent URLs, in order; the fleet is named by them."""
        pattern, fleet = parse_route(f"*.x.example=hash:{A}, {B}")
        self.assertEqual(pattern, "*.x.example")
        assert isinstance(fleet, Fleet)
        self.assertEqual(fleet.members, (parse_parent(A), parse_parent(B)))
        self.assertEqual(fleet.name, f"hash:{A},{B}")

    def test_refused(self) -> None:
        """One member, the same member twice, or a SOCKS5 member is refused."""
        for bad in (
            f"*=hash:{A}",
            f"*=hash:{A},{A}",
            f"*=hash:{A},socks5://192.0.2.3:1080",
            "*=hash:",
        ):
            with self.assertRaises(ValueError, msg=bad):
                parse_route(bad)

    def test_bad_route_is_one_usage_line(self) -> None:
        """A bad fleet on the command line is a usage error naming the option."""
        with self.assertRaisesRegex(usage.UsageError, "route: .*at least two"):
            Options().parseOptions(["--route", f"*=hash:{A}"])

    def test_router(self) -> None:
        """A fleet's hosts have no single parent; fleet_for finds the fleet."""
        router = Router((ROUTE, "*=direct"))
        self.assertIsNone(router.parent_for("a.fleet.example"))
        self.assertIsNotNone(router.fleet_for("a.fleet.example"))
        self.assertIsNone(router.fleet_for("other.example"))
        self.assertEqual(router.fleet_hosts, {"192.0.2.1", "192.0.2.2", "127.0.0.1"})
        placed = Router((ROUTE,), [("127.0.0.1", 8080)])
        self.assertEqual(placed.fleet_hosts, {"192.0.2.1", "192.0.2.2"})
        self.assertEqual(router.parents, ())

    def test_place_by_listening_address(self) -> None:
        """A proxy finds itself among the members by its listening addresses."""
        config = ProxyConfig(route=(ROUTE,), port=("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(config.own_addresses, (("127.0.0.1", 8080),))
        [fleet] = Router(config.all_routes, config.own_addresses).fleets
        self.assertEqual(fleet.own, 2)
        ipv6 = ProxyConfig(port=("tcp6:3128:interface=\\:\\:1",))
        self.assertEqual(ipv6.own_addresses, (("::1", 3128),))

    def test_place_by_fleet_self(self) -> None:
        """--fleet-self names the member a proxy is when its listeners don't show it."""
        config = ProxyConfig(route=(ROUTE,), port=("tcp:3128:interface=0.0.0.0",), fleet_self=B)
        [fleet] = Router(config.all_routes, config.own_addresses).fleets
        self.assertEqual(fleet.own, 1)
        with self.assertRaisesRegex(usage.UsageError, "fleet-self"):
            Options().parseOptions(["--fleet-self", "ftp://x"])

    def test_not_a_member(self) -> None:
        """A proxy that is not among the members sends every URL to one of them."""
        [fleet] = Router((ROUTE,), [("127.0.0.1", 9999)]).fleets
        self.assertIsNone(fleet.own)
        self.assertTrue(all(fleet.owner(url, 0) is not None for url in urls(200)))

    def test_key(self) -> None:
        """The key is the URL with the scheme's default port left out, host lowercased."""
        self.assertEqual(fleet_key(b"http", "A.Example", 80, b"/x?Y"), b"http://a.example/x?Y")
        self.assertEqual(fleet_key(b"https", "a.example", 8443, b"/"), b"https://a.example:8443/")

    def test_forwarded(self) -> None:
        """A request another member sent says so in CDN-Loop, among other CDNs."""
        self.assertTrue(fleet_forwarded([b"aproxy-fleet"]))
        self.assertTrue(fleet_forwarded([b"cdn-a; v=1, AProxy-Fleet ; x=y"]))
        self.assertTrue(fleet_forwarded([b"other", b"aproxy-fleet"]))
        self.assertFalse(fleet_forwarded([]))
        self.assertFalse(fleet_forwarded([b"aproxy-fleets, x-aproxy-fleet"]))


class OwnerTests(SynchronousTestCase):
    """Rendezvous hashing: every member agrees, and a member's failure moves only its share."""

    def setUp(self) -> None:
        self.members = tuple(parse_parent(u) for u in (A, B, C))

    def owners(self, fleet: Fleet, keys: list[bytes], now: float = 0.0) -> list[Parent | None]:
        """The owner of each key."""
        return [fleet.owner(key, now) for key in keys]

    def test_spread_and_agreement(self) -> None:
        """Each member owns about a third; two proxies with the same list agree."""
        keys = urls(3000)
        first = self.owners(Fleet(self.members), keys)
        self.assertEqual(first, self.owners(Fleet(self.members), keys))
        counts = Counter(first)
        self.assertEqual(set(counts), set(self.members))
        for member, count in counts.items():
            self.assertTrue(800 < count < 1200, (member, count))

    def test_own_share_is_served_here(self) -> None:
        """The member a proxy is owns its share as None: serve it here."""
        keys = urls(600)
        outside = self.owners(Fleet(self.members), keys)
        fleet = Fleet(self.members)
        fleet.own = 2
        inside = self.owners(fleet, keys)
        for before, after in zip(outside, inside, strict=True):
            self.assertEqual(after, None if before == self.members[2] else before)

    def test_failed_member_moves_only_its_share(self) -> None:
        """A member marked down loses its URLs to the others until FLEET_DOWN passes."""
        keys = urls(600)
        fleet = Fleet(self.members)
        before = self.owners(fleet, keys)
        fleet.failed(self.members[0], 100.0)
        during = self.owners(fleet, keys, 101.0)
        moved = 0
        for old, new in zip(before, during, strict=True):
            if old == self.members[0]:
                moved += 1
                self.assertIn(new, self.members[1:])
            else:
                self.assertEqual(new, old)
        self.assertTrue(150 < moved < 250, moved)
        self.assertEqual(self.owners(fleet, keys, 100.0 + FLEET_DOWN + 1), before)

    def test_all_others_down(self) -> None:
        """With every other member down, a member serves everything itself."""
        fleet = Fleet(self.members)
        fleet.own = 2
        fleet.failed(self.members[0], 0.0)
        fleet.failed(self.members[1], 0.0)
        fleet.failed(self.members[2], 0.0)  # (itself: never marked)
        self.assertEqual(set(self.owners(fleet, urls(100), 1.0)), {None})


class FleetProxyTests(ProxyTestCase):
    """A member of a three-proxy fleet (the third, C{127.0.0.1:8080}), on fake transports."""

    config = ProxyConfig(
        route=(ROUTE,),
        port=("tcp:8080:interface=127.0.0.1",),
        cache_memory="4MiB",
        pool_size=0,
        via=None,
        max_clients_per_ip=50,
        allow=("127.0.0.1/32", "192.0.2.0/24"),
        cache_purge_from=("127.0.0.1/32",),
    )

    def setUp(self) -> None:
        super().setUp()
        [self.fleet] = self.factory.runtime.dialer.router.fleets

    def url_of(self, member: int | None, skip: int = 0) -> bytes:
        """A URL of a.fleet.example that C{member} (None: this proxy) owns."""
        want = None if member is None else self.fleet.members[member]
        for i in range(1000):
            path = b"/%d" % i
            if self.fleet.owner(fleet_key(b"http", "a.fleet.example", 80, path), 0) == want:
                if skip == 0:
                    return path
                skip -= 1
        raise AssertionError("no such URL")

    def request(self, path: bytes, *fields: bytes) -> tuple[Any, Any]:
        """Send a GET for C{path} on a new client connection; return client and attempt."""
        client, proto = self.connect_client()
        extra = b"".join(f + b"\r\n" for f in fields)
        proto.dataReceived(
            b"GET http://a.fleet.example"
            + path
            + b" HTTP/1.1\r\nHost: a.fleet.example\r\n"
            + extra
            + b"\r\n"
        )
        return client, self.connector.attempts[-1]

    def test_owner_gets_a_proxy_request_with_cdn_loop(self) -> None:
        """A URL another member owns goes to it in absolute form, saying it is a member's."""
        path = self.url_of(0)
        client, attempt = self.request(path)
        self.assertEqual((attempt.host, attempt.port), ("192.0.2.1", 3128))
        sent = attempt.succeed().value()
        self.assertTrue(sent.startswith(b"GET http://a.fleet.example" + path + b" HTTP/1.1\r\n"))
        self.assertIn(b"\r\nCDN-Loop: aproxy-fleet\r\n", sent)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + FRESH + b"\r\n\r\nok")
        self.assertTrue(client.value().endswith(b"\r\n\r\nok"))
        self.assertNotIn(b"Cache-Status", client.value())

    def test_members_share_is_not_cached_here(self) -> None:
        """What the owner serves is not stored here: the next request goes to it again."""
        path = self.url_of(1)
        for _ in range(2):
            client, attempt = self.request(path)
            self.assertEqual(attempt.host, "192.0.2.2")
            attempt.succeed()
            attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + FRESH + b"\r\n\r\nok")
        self.assertEqual(len(self.connector.attempts), 2)

    def test_own_share_is_fetched_and_cached_here(self) -> None:
        """A URL this proxy owns goes to the origin once, then is a hit."""
        path = self.url_of(None)
        client, attempt = self.request(path)
        self.assertEqual((attempt.host, attempt.port), ("a.fleet.example", 80))
        sent = attempt.succeed().value()
        self.assertTrue(sent.startswith(b"GET " + path + b" HTTP/1.1\r\n"))
        self.assertNotIn(b"CDN-Loop", sent)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + FRESH + b"\r\n\r\nok")
        client, _ = self.request(path)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertIn(b"Cache-Status: aproxy; hit", client.value())

    def test_member_request_is_served_here(self) -> None:
        """A request a member sent (CDN-Loop) goes to the origin, whoever owns it."""
        path = self.url_of(0)
        _, attempt = self.request(path, b"CDN-Loop: aproxy-fleet")
        self.assertEqual((attempt.host, attempt.port), ("a.fleet.example", 80))
        self.assertIn(b"\r\nCDN-Loop: aproxy-fleet\r\n", attempt.succeed().value())

    def test_refused_member_fails_over(self) -> None:
        """An owner that refuses is marked down; the URL's next owner gets the request."""
        path, other = self.url_of(0), self.url_of(0, skip=1)
        client, attempt = self.request(path)
        attempt.deferred.errback(error.ConnectionRefusedError())
        retry = self.connector.attempts[-1]
        self.assertIsNot(retry, attempt)
        self.assertIn(retry.host, ("192.0.2.2", "a.fleet.example"))
        retry.succeed()
        retry.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK\r\n"), client.value())
        # Another of its URLs skips it at once.
        _, attempt = self.request(other)
        self.assertNotEqual(attempt.host, "192.0.2.1")

    def test_every_member_down_is_served_here(self) -> None:
        """When both other members refuse, this proxy fetches the URL itself."""
        path = self.url_of(0)
        client, attempt = self.request(path)
        hosts = []
        while attempt.host != "a.fleet.example":
            hosts.append(attempt.host)
            attempt.deferred.errback(error.ConnectionRefusedError())
            attempt = self.connector.attempts[-1]
        self.assertEqual(hosts[0], "192.0.2.1")
        self.assertLessEqual(len(hosts), 2)
        attempt.succeed()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_served_here_after_failures_is_cached(self) -> None:
        """A URL that falls to this proxy when its owner fails is stored here, as its own."""
        path = self.url_of(0)
        client, attempt = self.request(path)
        while attempt.host != "a.fleet.example":
            attempt.deferred.errback(error.ConnectionRefusedError())
            attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + FRESH + b"\r\n\r\nok")
        self.assertIn(b"Cache-Status: aproxy; fwd=uri-miss; fwd-status=200; stored", client.value())
        before = len(self.connector.attempts)
        client, _ = self.request(path)
        self.assertEqual(len(self.connector.attempts), before)
        self.assertIn(b"Cache-Status: aproxy; hit", client.value())

    def test_purge_goes_to_the_owner_when_allowed_here(self) -> None:
        """A PURGE this proxy allows goes on to the owner; one it refuses stops here."""
        path = self.url_of(0)
        url = b"http://a.fleet.example" + path
        client, proto = self.connect_client()
        proto.dataReceived(b"PURGE " + url + b" HTTP/1.1\r\nHost: a.fleet.example\r\n\r\n")
        [attempt] = self.connector.attempts
        self.assertEqual(attempt.host, "192.0.2.1")
        self.assertTrue(attempt.succeed().value().startswith(b"PURGE " + url + b" HTTP/1.1"))
        proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.77", 5000))
        transport = self.connect_transport(proto, "192.0.2.77")
        proto.dataReceived(b"PURGE " + url + b" HTTP/1.1\r\nHost: a.fleet.example\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "), transport.value())
        self.assertEqual(len(self.connector.attempts), 1)

    def test_member_timeout_fails_over(self) -> None:
        """An owner that does not answer within the connect timeout is skipped too."""
        path = self.url_of(0)
        client, attempt = self.request(path)
        self.clock.advance(self.factory.config.connect_timeout + 1)
        self.assertEqual(client.value(), b"")
        retry = self.connector.attempts[-1]
        self.assertIsNot(retry, attempt)
        self.assertTrue(attempt.deferred.called)  # (cancelled)

    def test_members_are_not_limited_per_address(self) -> None:
        """A member carries many clients: --max-clients-per-ip does not apply to it."""
        for _ in range(60):
            proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 5000))
            transport = self.connect_transport(proto, "192.0.2.2")
            self.assertEqual(transport.value(), b"")
        for expected in [b""] * 50 + [b"HTTP/1.1 503 "]:
            proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.77", 5001))
            transport = self.connect_transport(proto, "192.0.2.77")
            self.assertTrue(transport.value().startswith(expected), transport.value())

    def connect_transport(self, proto: Any, host: str) -> Any:
        """Connect C{proto} to a fake transport from C{host}."""
        from aproxy.testing import HalfCloseTransport

        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, 5000))
        proto.makeConnection(transport)
        return transport


class _Late(Factory):
    """Listens before the proxy it hands connections to exists (its port is in its config)."""

    target: Factory[Any] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        assert self.target is not None
        return self.target.buildProtocol(addr)


class FleetIntegrationTests(ConnectionTracking, TestCase):
    """Three proxies on loopback, one fleet: each URL reaches the origin once."""

    timeout = 60

    @inlineCallbacks
    def test_each_url_fetched_once_and_a_member_stopped(self) -> Generator[Any, Any, None]:
        """
        URLs asked through every member reach the origin once; with one member stopped,
        only its share is fetched again (by its next owner), and no request fails.
        """
        hits: Counter[bytes] = Counter()

        def handler(request: OriginRequest, proto: OriginProtocol) -> None:
            hits[request.target] += 1
            respond(proto, request.target, fields=(b"Cache-Control: max-age=600",))

        origin = Origin(b"origin", handler)
        self.track(origin)
        listening = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(origin)
        self.addCleanup(listening.stopListening)
        oport = listening.getHost().port
        lates = [_Late() for _ in range(3)]
        ports = []
        for late in lates:
            port = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(late)
            self.addCleanup(port.stopListening)
            ports.append(port)
        members = [f"http://{LOCAL}:{p.getHost().port}" for p in ports]
        route = f"{LOCAL}=hash:" + ",".join(members)
        factories = []
        for late, me in zip(lates, members, strict=True):
            factory = ProxyFactory(
                ProxyConfig(route=(route,), fleet_self=me, cache_memory="8MiB"), reactor
            )
            factory.clients = self.track(factory)  # type: ignore[attr-defined]
            self.track(factory.upstream_factory)
            self.addCleanup(factory.stopFactory)
            late.target = factory
            factories.append(factory)
        paths = [f"/{i}" for i in range(150)]
        # Each member asked for every URL: 450 requests, 150 origin fetches.
        for member in range(3):
            got = yield deferToThread(fetch_all, ports[member].getHost().port, paths, oport)
            self.assertEqual(got, [(200, p.encode()) for p in paths])
        self.assertEqual(set(hits.values()), {1})
        self.assertEqual(len(hits), 150)
        # Stop the third member: its listener and every connection it has.
        yield ports[2].stopListening()
        for proto in factories[2].clients:  # type: ignore[attr-defined]
            if proto.transport is not None:
                proto.transport.abortConnection()
        reference = Fleet(tuple(parse_parent(m) for m in members))
        third = parse_parent(members[2])
        expected = {
            p.encode()
            for p in paths
            if reference.owner(fleet_key(b"http", LOCAL, oport, p.encode()), 0) == third
        }
        self.assertTrue(20 < len(expected) < 80, len(expected))
        for member in range(2):
            got = yield deferToThread(fetch_all, ports[member].getHost().port, paths, oport)
            self.assertEqual(got, [(200, p.encode()) for p in paths])
        refetched = {path for path, count in hits.items() if count == 2}
        self.assertEqual(refetched, expected)
        self.assertEqual(max(hits.values()), 2)
