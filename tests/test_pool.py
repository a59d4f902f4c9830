"""
The upstream connection pool (L{aproxy.upstream.pool.UpstreamPool}) on a fake clock: the
maximum age of a pooled connection, new limits on reload, and a reload that tightens the
address rules reaching connections already in the pool.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.testing import HalfCloseTransport, RecordingConnector
from aproxy.upstream.pool import UpstreamPool
from aproxy.upstream.protocol import UpstreamFactory, UpstreamProtocol

GET_LOCAL = b"GET http://localhost:8000/ HTTP/1.1\r\nHost: localhost:8000\r\n\r\n"
OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
KEY = ("origin.example", 80)


def connection(clock: Clock | None = None, key: tuple[str, int] = KEY) -> UpstreamProtocol:
    """An upstream connection on a L{StringTransport}, built as the proxy builds them."""
    proto = UpstreamFactory(65536, clock).buildProtocol(None)
    proto.key = key
    proto.makeConnection(StringTransport())
    return proto


def closed(proto: UpstreamProtocol) -> bool:
    """Whether the pool closed C{proto}'s transport."""
    disconnecting: bool = proto.transport.disconnecting
    return disconnecting


class MaxAgeTests(SynchronousTestCase):
    """A pooled connection is not reused past C{max_age}, however busy it is."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock, 10, idle_timeout=5, max_age=120)

    def test_busy_connection_retired_at_max_age(self) -> None:
        """
        A connection used every 4 s (within the 5 s idle timeout, so it never idles out)
        is reused until it is 120 s old, then closed instead of handed out.
        """
        proto = connection(self.clock)
        uses = 0
        while True:
            self.pool.release(proto)
            self.clock.advance(4)
            if self.pool.acquire(KEY) is None:
                break
            uses += 1
        self.assertEqual(uses, 29)
        self.assertEqual(self.clock.seconds(), 120)
        self.assertTrue(closed(proto))
        self.assertEqual(len(self.pool), 0)

    def test_age_counts_from_connection_made(self) -> None:
        """The age counts from when the connection was made, not from its first return."""
        pool = UpstreamPool(self.clock, 10, idle_timeout=30, max_age=120)
        proto = connection(self.clock)
        self.clock.advance(100)
        pool.release(proto)
        self.clock.advance(19)
        self.assertIs(pool.acquire(KEY), proto)
        pool.release(proto)
        self.clock.advance(1)
        self.assertIsNone(pool.acquire(KEY))
        self.assertTrue(closed(proto))

    def test_release_of_old_connection_closes_it(self) -> None:
        """A connection that comes back older than the maximum age is closed, not kept."""
        proto = connection(self.clock)
        self.clock.advance(120)
        self.pool.release(proto)
        self.assertTrue(closed(proto))
        self.assertEqual(len(self.pool), 0)

    def test_sweep_closes_idle_connection_at_max_age(self) -> None:
        """With a long idle timeout, the sweep still closes a connection at its max age."""
        pool = UpstreamPool(self.clock, 10, idle_timeout=600, max_age=10)
        proto = connection(self.clock)
        pool.release(proto)
        self.clock.advance(9)
        self.assertFalse(closed(proto))
        self.clock.advance(1)
        self.assertTrue(closed(proto))
        self.assertEqual(len(pool), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_age_unknown_counts_from_first_release(self) -> None:
        """A connection built without a clock is aged from its first return to the pool."""
        proto = connection(None)
        self.clock.advance(1000)
        self.pool.release(proto)
        self.clock.advance(4)
        self.assertIs(self.pool.acquire(KEY), proto)


class ReconfigureTests(SynchronousTestCase):
    """New pool limits (a reload) apply to the connections already held."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock, 3, idle_timeout=30, max_age=120)

    def test_smaller_size_closes_least_recently_used(self) -> None:
        """Shrinking the size per key closes the connections used longest ago."""
        protos = [connection(self.clock) for _ in range(3)]
        for proto in protos:
            self.pool.release(proto)
        self.pool.reconfigure(1, 30, 120)
        self.assertEqual([closed(p) for p in protos], [True, True, False])
        self.assertIs(self.pool.acquire(KEY), protos[2])
        self.pool.release(protos[2])
        extra = connection(self.clock)
        self.pool.release(extra)
        self.assertTrue(closed(extra))

    def test_shorter_idle_timeout_applies_to_held_connections(self) -> None:
        """A shorter idle timeout closes connections already idle that long at once."""
        proto = connection(self.clock)
        self.pool.release(proto)
        self.clock.advance(10)
        self.pool.reconfigure(3, 5, 120)
        self.assertTrue(closed(proto))
        later = connection(self.clock)
        self.pool.release(later)
        self.clock.advance(5)
        self.assertTrue(closed(later))

    def test_shorter_max_age_applies_to_held_connections(self) -> None:
        """A shorter maximum age closes connections already that old."""
        proto = connection(self.clock)
        self.clock.advance(20)
        self.pool.release(proto)
        self.pool.reconfigure(3, 30, 10)
        self.assertTrue(closed(proto))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReloadTightensRulesTests(SynchronousTestCase):
    """
    A reload that adds address rules reaches pooled connections: each is checked against
    the rules in force before it is used again.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(ProxyConfig(), self.clock, self.connector)

    def request(self) -> HalfCloseTransport:
        """A client connection sending one GET for C{http://localhost:8000/}."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(GET_LOCAL)
        return client

    def pooled_connection(self) -> HalfCloseTransport:
        """Serve one request over a new connection to 127.0.0.1, which goes to the pool."""
        client = self.request()
        [attempt] = self.connector.attempts
        upstream = attempt.succeed()
        upstream.peerAddr = IPv4Address("TCP", "127.0.0.1", 8000)
        attempt.respond(OK_5)
        self.assertTrue(client.value().endswith(b"hello"))
        self.assertEqual(len(self.factory.pool), 1)
        return upstream

    def test_reload_denying_address_refuses_pooled_connection(self) -> None:
        """
        After a reload adds C{deny-host 127.0.0.0/8} and C{block-private}, a request that
        would reuse a pooled connection to 127.0.0.1 gets 403, and that connection is
        closed; nothing is dialed.
        """
        upstream = self.pooled_connection()
        upstream.clear()
        self.factory.reconfigure(ProxyConfig(deny_host=("127.0.0.0/8",), block_private=True))
        client = self.request()
        response = client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 403 "), response)
        self.assertIn(b"127.0.0.0/8", response)
        self.assertEqual(upstream.value(), b"")
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(len(self.factory.pool), 0)
        # Taken from the pool but refused: not counted as reused (the metric).
        self.assertEqual(self.factory.pool.reused, 0)

    def test_reload_block_private_refuses_pooled_connection(self) -> None:
        """C{block-private} added by a reload refuses a pooled loopback connection too."""
        upstream = self.pooled_connection()
        self.factory.reconfigure(ProxyConfig(block_private=True))
        response = self.request().value()
        self.assertTrue(response.startswith(b"HTTP/1.1 403 "), response)
        self.assertIn(b"block-private", response)
        self.assertTrue(upstream.disconnecting)

    def test_reload_allowing_address_keeps_pooled_connection(self) -> None:
        """A reload whose rules still allow the connection's address keeps reusing it."""
        upstream = self.pooled_connection()
        upstream.clear()
        self.factory.reconfigure(ProxyConfig(deny_host=("10.0.0.0/8",)))
        self.request()
        self.assertEqual(self.factory.pool.reused, 1)
        self.assertTrue(upstream.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.assertEqual(len(self.connector.attempts), 1)


class MaxAgeOptionTests(SynchronousTestCase):
    """C{--pool-max-age} (config key C{pool-max-age}) reaches the factory's pool."""

    def test_option_sets_pool_max_age(self) -> None:
        """The option becomes C{ProxyConfig.pool_max_age}; the default is 120 s."""
        from aproxy.run.tap import Options

        options = Options()
        options.parseOptions(["--pool-max-age", "30"])
        self.assertEqual(options["proxy-config"].pool_max_age, 30)
        self.assertEqual(ProxyConfig().pool_max_age, 120)

    def test_factory_pool_uses_max_age(self) -> None:
        """The factory's pool retires connections at the configured maximum age."""
        clock = MemoryReactorClock()
        factory = ProxyFactory(ProxyConfig(pool_max_age=10), clock, RecordingConnector())
        proto = factory.upstream_factory.buildProtocol(None)
        proto.key = KEY
        proto.makeConnection(StringTransport())
        clock.advance(10)
        factory.pool.release(proto)
        self.assertTrue(closed(proto))

    def test_bad_max_age_refused(self) -> None:
        """Zero, negative, infinite and nan ages are refused, naming the option."""
        for value in (0, -1, float("inf"), float("nan")):
            with self.assertRaisesRegex(ValueError, "^pool-max-age must be"):
                ProxyConfig(pool_max_age=value)
