"""Parent pools (C{--route PATTERN=STRATEGY:MEMBER,...}): strategies, health, failover."""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import Any

from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from aproxy import ProxyFactory
from aproxy.client.stages import IRequestStage, StageRequest
from aproxy.config import ProxyConfig
from aproxy.testing import HalfCloseTransport, RecordingConnector
from aproxy.upstream.routes import RETRY, RETRY_MAX, Pool, Router, parse_pool, parse_route
from tests.loopback import LOCAL, fetch_all
from tests.origin import Origin, OriginProtocol, OriginRequest, respond
from tests.support import ProxyTestCase
from tests.tracking import ConnectionTracking

A, B, C = "http://192.0.2.1:3128", "http://192.0.2.2:3128", "http://192.0.2.3:3128"


def names(pool: Pool, picks: list[int | None]) -> list[str]:
    """The member names of C{picks}."""
    return [pool.members[i].name if i is not None else "-" for i in picks]


class ParseTests(SynchronousTestCase):
    """Pool route targets: members, weights, direct; mistakes are one line."""

    def test_members_and_weights(self) -> None:
        """Members in order, weights where given, direct allowed."""
        _, pool = parse_route(f"*=rr:{A}#weight=3, direct")
        assert isinstance(pool, Pool)
        self.assertEqual([(m.name, m.weight) for m in pool.members], [(A, 3), ("direct", 1)])
        self.assertEqual(pool.name, f"rr:{A}#weight=3,direct")

    def test_refused(self) -> None:
        """One member, a bad weight, a member twice, or a bad URL is refused."""
        for bad in (f"rr:{A}", f"rr:{A}#weight=0,{B}", f"rr:{A}#w=2,{B}", f"rr:{A},{A}", "rr:x,y"):
            with self.assertRaises(ValueError, msg=bad):
                parse_route("*=" + bad)

    def test_check_target_is_host_port(self) -> None:
        """--parent-check-target must be HOST:PORT: anything else is one line."""
        self.assertEqual(
            ProxyConfig(parent_check_target="a.example:443").parent_check_target, "a.example:443"
        )
        for bad in ("a.example", "a.example:x", "http://a.example/"):
            with self.assertRaisesRegex(ValueError, "^parent-check-target must be HOST:PORT"):
                ProxyConfig(parent_check_target=bad)

    def test_upstream_takes_a_pool(self) -> None:
        """--upstream STRATEGY:... is a pool for everything no route matched."""
        config = ProxyConfig(upstream=f"least:{A},{B}")
        [pool] = Router(config.all_routes).pools
        self.assertEqual(pool.strategy, "least")
        with self.assertRaisesRegex(ValueError, "^upstream: "):
            ProxyConfig(upstream=f"rr:{A}")


class StrategyTests(SynchronousTestCase):
    """How each strategy spreads requests over the members that are up."""

    def test_round_robin_weighted_and_smooth(self) -> None:
        """rr takes members in turn, weights respected and interleaved."""
        pool = parse_pool("rr", f"{A},{B}#weight=3")
        picks = names(pool, [pool.pick(0, "c", set()) for _ in range(8)])
        self.assertEqual(Counter(picks), {A: 2, B: 6})
        self.assertNotIn([B, B, B, B], [picks[i : i + 4] for i in range(5)])
        even = parse_pool("rr", f"{A},{B},{C}")
        self.assertEqual(names(even, [even.pick(0, "c", set()) for _ in range(3)]), [A, B, C])

    def test_least_in_flight(self) -> None:
        """least picks the member with the fewest requests in flight for its weight."""
        pool = parse_pool("least", f"{A},{B}#weight=2")
        pool.members[1].in_flight = 1
        self.assertEqual(pool.pick(0, "c", set()), 0)
        pool.members[0].in_flight = 1
        self.assertEqual(pool.pick(0, "c", set()), 1)  # 1/2 < 1/1

    def test_random_weighted(self) -> None:
        """random follows the weights."""
        pool = parse_pool("random", f"{A},{B}#weight=3")
        counts = Counter(pool.pick(0, "c", set()) for _ in range(4000))
        self.assertTrue(800 < counts[0] < 1200, counts)

    def test_client_sticky(self) -> None:
        """client keeps each client on one member; a member's loss moves only its clients."""
        pool = parse_pool("client", f"{A},{B},{C}")
        clients = [f"10.0.0.{i}" for i in range(300)]
        first = {c: pool.pick(0, c, set()) for c in clients}
        self.assertEqual(first, {c: pool.pick(0, c, set()) for c in clients})
        self.assertEqual(set(first.values()), {0, 1, 2})
        pool.failed(0, 0.0, "refused")
        after = {c: pool.pick(1, c, set()) for c in clients}
        for c in clients:
            if first[c] != 0:
                self.assertEqual(after[c], first[c])
            else:
                self.assertIn(after[c], (1, 2))


class HealthTests(SynchronousTestCase):
    """A member that fails is skipped for a while that doubles, and is back on success."""

    def test_backoff_doubles_and_resets(self) -> None:
        """30 s, 60 s, ... up to 5 minutes; a success starts over."""
        pool = parse_pool("rr", f"{A},{B}")
        now = 0.0
        for expected in (RETRY, 2 * RETRY, 4 * RETRY, 8 * RETRY, RETRY_MAX, RETRY_MAX):
            pool.failed(0, now, "refused")
            self.assertEqual(pool.members[0].down_until - now, expected)
            now = pool.members[0].down_until
        pool.succeeded(0)
        self.assertTrue(pool.members[0].up(now))
        pool.failed(0, now, "refused")
        self.assertEqual(pool.members[0].down_until - now, RETRY)

    def test_down_members_skipped_then_tried_last(self) -> None:
        """A down member is not picked; when all are down the first to retry is."""
        pool = parse_pool("rr", f"{A},{B}")
        pool.failed(0, 0.0, "refused")
        self.assertEqual({pool.pick(1.0, "c", set()) for _ in range(4)}, {1})
        pool.failed(1, 5.0, "refused")
        self.assertEqual(pool.pick(6.0, "c", set()), 0)
        self.assertIsNone(pool.pick(6.0, "c", {0, 1}))


class ReloadTests(ProxyTestCase):
    """A reload keeps the health of the members whose URL is unchanged."""

    config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0)

    def test_down_member_stays_down(self) -> None:
        """A member down before the reload is down after it; a new member starts up."""
        [pool] = self.factory.runtime.dialer.router.pools
        pool.failed(0, self.clock.seconds(), "refused")
        self.factory.reconfigure(ProxyConfig(route=(f"*=least:{A},{C}",), pool_size=0))
        [after] = self.factory.runtime.dialer.router.pools
        now = self.clock.seconds()
        self.assertEqual([m.up(now) for m in after.members], [False, True])
        self.assertEqual(after.members[0].last_error, "refused")


class PoolProxyTests(ProxyTestCase):
    """A proxy whose route is a pool of two parents, on fake transports."""

    config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0, connect_ports=None, via=None)

    def request(self, connect: bool = False) -> tuple[object, object]:
        """A GET (or a CONNECT) on a new client connection; its client and dial."""
        client, proto = self.connect_client()
        if connect:
            proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        else:
            proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        return client, self.connector.attempts[-1]

    def test_requests_take_turns(self) -> None:
        """Two requests go to the two parents in turn, in absolute form."""
        hosts = []
        for _ in range(2):
            _, attempt = self.request()
            hosts.append(attempt.host)  # type: ignore[attr-defined]
            sent = attempt.succeed().value()  # type: ignore[attr-defined]
            self.assertTrue(sent.startswith(b"GET http://a.example/ HTTP/1.1\r\n"))
        self.assertEqual(hosts, ["192.0.2.1", "192.0.2.2"])

    def test_refused_member_fails_over(self) -> None:
        """A parent that refuses is skipped: the other serves the request, no 502."""
        client, attempt = self.request()
        attempt.deferred.errback(error.ConnectionRefusedError())  # type: ignore[attr-defined]
        retry = self.connector.attempts[-1]
        self.assertEqual(retry.host, "192.0.2.2")
        retry.succeed()
        retry.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"))  # type: ignore[attr-defined]
        # The next request skips the member that failed.
        _, attempt = self.request()
        self.assertEqual(attempt.host, "192.0.2.2")  # type: ignore[attr-defined]

    def test_every_member_failed_is_one_502_naming_them(self) -> None:
        """Only when both parents fail does the client get a 502, naming both."""
        client, attempt = self.request()
        attempt.deferred.errback(error.ConnectionRefusedError())  # type: ignore[attr-defined]
        self.connector.attempts[-1].deferred.errback(error.ConnectionRefusedError())
        value = client.value()  # type: ignore[attr-defined]
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "), value)
        self.assertIn(A.encode(), value)
        self.assertIn(B.encode(), value)

    def test_connect_fails_over(self) -> None:
        """A CONNECT through a pool goes to the next parent when the first refuses."""
        client, attempt = self.request(connect=True)
        attempt.deferred.errback(error.ConnectionRefusedError())  # type: ignore[attr-defined]
        retry = self.connector.attempts[-1]
        self.assertEqual(retry.host, "192.0.2.2")
        self.assertEqual(client.value(), b"")  # type: ignore[attr-defined]


class DirectMemberTests(ProxyTestCase):
    """A pool may mix parents and direct."""

    config = ProxyConfig(route=(f"*=rr:direct,{A}",), pool_size=0, via=None)

    def test_direct_then_parent(self) -> None:
        """rr over direct and a parent: the origin itself, then the parent."""
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        first = self.connector.attempts[-1]
        self.assertEqual((first.host, first.port), ("a.example", 80))
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertEqual(self.connector.attempts[-1].host, "192.0.2.1")


class PoolMetricsTests(ProxyTestCase):
    """aproxy_parent_up and aproxy_parent_requests_total."""

    config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0, via=None)

    def test_up_and_requests(self) -> None:
        """A member that failed is 0 until its retry; requests are counted per parent."""
        from prometheus_client import CollectorRegistry

        from aproxy.observe.metrics import Metrics

        registry = CollectorRegistry()
        metrics = Metrics(self.factory, self.clock, registry)
        self.factory.observers.append(metrics)
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.connector.attempts[-1].deferred.errback(error.ConnectionRefusedError())
        retry = self.connector.attempts[-1]
        retry.succeed()
        retry.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        up = registry.get_sample_value
        self.assertEqual(up("aproxy_parent_up", {"parent": A}), 0.0)
        self.assertEqual(up("aproxy_parent_up", {"parent": B}), 1.0)
        self.assertEqual(up("aproxy_parent_requests_total", {"parent": B, "result": "ok"}), 1.0)
        self.clock.advance(RETRY)
        self.assertEqual(up("aproxy_parent_up", {"parent": A}), 1.0)


class PoolIntegrationTests(ConnectionTracking, TestCase):
    """Two real parents on loopback behind a pool; one is stopped in the middle of a run."""

    timeout = 60

    @inlineCallbacks
    def test_no_request_fails_when_a_member_stops(self) -> Generator[Any, Any, None]:
        """Keep-alive GETs through an rr pool: stopping one parent fails none of them."""

        def handler(request: OriginRequest, proto: OriginProtocol) -> None:
            respond(proto, request.target)

        origin = Origin(b"origin", handler)
        self.track(origin)
        listening = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(origin)
        self.addCleanup(listening.stopListening)
        oport = listening.getHost().port
        parents = []
        for _ in range(2):
            parent = ProxyFactory(ProxyConfig(), reactor)
            parent.clients = self.track(parent)  # type: ignore[attr-defined]
            self.track(parent.upstream_factory)
            port = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(parent)
            self.addCleanup(port.stopListening)
            parents.append((parent, port))
        members = ",".join(f"http://{LOCAL}:{p.getHost().port}" for _, p in parents)
        child = ProxyFactory(ProxyConfig(upstream=f"rr:{members}"), reactor)
        self.track(child)
        self.track(child.upstream_factory)
        child_port = yield serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(child)
        self.addCleanup(child_port.stopListening)
        cport = child_port.getHost().port
        paths = [f"/{i}" for i in range(20)]
        got = yield deferToThread(fetch_all, cport, paths, oport)
        self.assertEqual(got, [(200, p.encode()) for p in paths])
        # Stop the first parent: its listener and the connections it has.
        first, first_port = parents[0]
        yield first_port.stopListening()
        for proto in first.clients:  # type: ignore[attr-defined]
            if proto.transport is not None:
                proto.transport.abortConnection()
        got = yield deferToThread(fetch_all, cport, paths, oport)
        self.assertEqual(got, [(200, p.encode()) for p in paths])


class DiedBeforeAnsweringTests(ProxyTestCase):
    """A member whose connection dies before any response byte: the next member."""

    config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0, via=None)

    def test_idempotent_request_goes_to_the_next(self) -> None:
        """A GET sent to a member that closes without answering is sent to the other."""
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        first = self.connector.attempts[-1]
        first.succeed()
        first.close()
        second = self.connector.attempts[-1]
        self.assertIsNot(second, first)
        self.assertEqual(second.host, "192.0.2.2")
        second.succeed()
        second.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"))

    def test_request_with_a_body_is_not_sent_twice(self) -> None:
        """A POST whose member died is a 502: it may have been acted on."""
        client, proto = self.connect_client()
        proto.dataReceived(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nhi"
        )
        first = self.connector.attempts[-1]
        first.succeed()
        first.close()
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))


@implementer(IRequestStage)
class _Exit:
    """A stand-in for an addon that picks each request's exit (the StageRequest.parent seam)."""

    name = "exit"

    def __init__(self, choice: str) -> None:
        self.choice = choice

    def answer(self, request: StageRequest) -> None:
        request.parent = self.choice

    def replace_response(self, request: StageRequest, head: Any) -> None:
        return None

    def finished(self, request: StageRequest) -> None:
        pass

    def request_filter(self, request: StageRequest) -> None:
        return None

    def response_filter(self, request: StageRequest, head: Any) -> None:
        return None


class StageChoosesTheExitTests(SynchronousTestCase):
    """Code picks the exit per request: a stage sets StageRequest.parent at stage A."""

    def dial_for(self, choice: str) -> tuple[str, int]:
        """Where a GET goes when the stage chooses C{choice} (routes say a pool)."""
        clock = MemoryReactorClock()
        connector = RecordingConnector()
        config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0)
        factory = ProxyFactory(config, clock, connector, stages=[_Exit(choice)])
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000)))
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        attempt = connector.attempts[-1]
        return attempt.host, attempt.port

    def test_parent_or_direct(self) -> None:
        """The stage's parent URL, or direct, wins over the routes."""
        self.assertEqual(self.dial_for(C), ("192.0.2.3", 3128))
        self.assertEqual(self.dial_for("direct"), ("a.example", 80))


class PoolStatusPageTests(SynchronousTestCase):
    """/status lists pool members with their state and last error."""

    def test_members_listed(self) -> None:
        """A member that failed shows down, when it is retried, and why."""
        from aproxy.observe.status import History, render_status

        pool = parse_pool("rr", f"{A},direct")
        pool.failed(0, 100.0, "connection refused")
        page = render_status(
            History(0.0), 110.0, 0, 0, 0, 0, ProxyConfig(), "1", pools=[pool]
        ).decode()
        self.assertIn("<h2>Parent pools</h2>", page)
        self.assertIn(f"<td>rr</td><td>{A}</td><td>down, retried in 20 s</td>", page)
        self.assertIn("<td>connection refused</td>", page)
        self.assertIn("<td>direct</td><td>up</td>", page)
        self.assertNotIn(
            "Parent pools",
            render_status(History(0.0), 110.0, 0, 0, 0, 0, ProxyConfig(), "1").decode(),
        )


class ActiveCheckTests(ProxyTestCase):
    """--parent-check: members are checked with a TCP connection every S seconds."""

    config = ProxyConfig(route=(f"*=rr:{A},{B}",), pool_size=0, parent_check=5)

    def setUp(self) -> None:
        super().setUp()
        self.factory.startFactory()
        self.addCleanup(self.factory.stopFactory)
        [self.pool] = self.factory.runtime.dialer.router.pools

    def test_check_brings_a_member_back_and_takes_one_out(self) -> None:
        """A down member that connects is up again; an up one that doesn't is down."""
        from twisted.internet.protocol import Protocol

        self.pool.failed(0, self.clock.seconds(), "refused")
        self.clock.advance(5)
        first, second = self.connector.attempts[-2:]
        self.assertEqual({first.host, second.host}, {"192.0.2.1", "192.0.2.2"})
        by_host = {a.host: a for a in (first, second)}
        by_host["192.0.2.1"].deferred.callback(Protocol())
        by_host["192.0.2.2"].deferred.errback(error.ConnectionRefusedError())
        now = self.clock.seconds()
        self.assertTrue(self.pool.members[0].up(now))
        self.assertFalse(self.pool.members[1].up(now))
        self.assertEqual(self.pool.members[1].last_error, "failed its check")
        # The next round comes 5 s later; the stop cancels what is in flight.
        self.clock.advance(5)
        self.assertEqual(len(self.connector.attempts), 4)

    def test_a_failing_round_does_not_stop_the_checks(self) -> None:
        """A bug in one round is logged; the next round still comes."""

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        self.patch(self.connector, "connect", broken)
        self.clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(self.connector, "connect", type(self.connector).connect.__get__(self.connector))
        self.clock.advance(5)
        self.assertEqual(len(self.connector.attempts), 2)

    def test_off_by_default(self) -> None:
        """Without --parent-check nothing is dialled."""
        factory = ProxyFactory(ProxyConfig(route=(f"*=rr:{A},{B}",)), self.clock, self.connector)
        factory.startFactory()
        self.addCleanup(factory.stopFactory)
        before = len(self.connector.attempts)
        self.clock.advance(3600)
        self.assertEqual(len(self.connector.attempts), before + 2)  # (this class's own)


class TargetCheckTests(ProxyTestCase):
    """--parent-check-target: the check is a CONNECT through each member."""

    config = ProxyConfig(
        route=(f"*=rr:{A},{B}",),
        pool_size=0,
        parent_check=5,
        parent_check_target="check.example:443",
    )

    def setUp(self) -> None:
        super().setUp()
        self.factory.startFactory()
        self.addCleanup(self.factory.stopFactory)
        [self.pool] = self.factory.runtime.dialer.router.pools

    def connect(self, attempt: Any) -> tuple[Any, HalfCloseTransport]:
        """Complete a dial on a fake transport; the outermost layer and transport."""
        layer = attempt.factory.buildProtocol(None)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 3128))
        layer.makeConnection(transport)
        attempt.deferred.callback(layer)
        return layer, transport

    def test_connect_answered_or_refused(self) -> None:
        """A member whose CONNECT is accepted is up; one that refuses it is down."""
        self.pool.failed(0, self.clock.seconds(), "refused")
        self.clock.advance(5)
        by_host = {a.host: a for a in self.connector.attempts[-2:]}
        layer, transport = self.connect(by_host["192.0.2.1"])
        self.assertTrue(transport.value().startswith(b"CONNECT check.example:443 HTTP/1.1\r\n"))
        layer.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        other, _ = self.connect(by_host["192.0.2.2"])
        other.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        now = self.clock.seconds()
        self.assertTrue(self.pool.members[0].up(now))
        self.assertFalse(self.pool.members[1].up(now))
        self.assertTrue(transport.disconnecting)
