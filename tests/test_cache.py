"""
The cache as a stage of the proxy (issue #14), through the client protocol on fake
transports: misses stored while they stream, hits without an origin, revalidation,
HEAD and ranges from a stored GET, conditionals, invalidation, Vary, only-if-cached,
collapsed misses, clients that leave, PURGE, and the disk store across restarts.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError

from aproxy.cache.stage import SYNC_INTERVAL
from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.client.stages import StageRequest
from aproxy.config import ProxyConfig
from aproxy.observe.records import Exchange
from aproxy.testing import Attempt, HalfCloseTransport
from tests.support import ProxyTestCase

URL = b"http://a.example/file"


def get(url: bytes = URL, *fields: bytes, method: bytes = b"GET") -> bytes:
    """A request for C{url} with extra field lines."""
    extra = b"".join(f + b"\r\n" for f in fields)
    return method + b" " + url + b" HTTP/1.1\r\nHost: a.example\r\n" + extra + b"\r\n"


def ok(body: bytes = b"hello", *fields: bytes, status: bytes = b"200 OK") -> bytes:
    """A response with C{body} (Content-Length) and extra field lines."""
    extra = b"".join(f + b"\r\n" for f in fields)
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


FRESH = b"Cache-Control: max-age=60"


class CacheTests(ProxyTestCase):
    """The memory cache, one client after another."""

    config = ProxyConfig(cache_memory="4MiB", pool_size=0, cache_purge_from=["127.0.0.1/32"])

    def setUp(self) -> None:
        super().setUp()
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)

    def ask(self, request: bytes, response: bytes | None = None) -> tuple[bytes, bytes | None]:
        """
        Send C{request} on a new client connection; if it goes upstream, answer it with
        C{response}. @return: What the client got, and what went upstream (L{None}: none).
        """
        client, proto = self.connect_client()
        before = len(self.connector.attempts)
        proto.dataReceived(request)
        sent = None
        if len(self.connector.attempts) > before:
            attempt = self.connector.attempts[-1]
            upstream = attempt.succeed()
            sent = upstream.value()
            if response is not None:
                attempt.respond(response)
        return client.value(), sent

    def test_miss_stored_then_hit(self) -> None:
        """A fresh response is stored as it streams, then answered without the origin."""
        got, sent = self.ask(get(), ok(b"hello", FRESH))
        self.assertIsNotNone(sent)
        self.assertIn(b"Content-Length: 5\r\n", got)
        self.assertIn(b"Cache-Status: aproxy; fwd=uri-miss; fwd-status=200; stored\r\n", got)
        self.clock.advance(10)
        got, sent = self.ask(get())
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got)
        self.assertIn(b"Age: 10\r\n", got)
        self.assertIn(b"Cache-Status: aproxy; hit; ttl=50\r\n", got)
        self.assertTrue(got.endswith(b"\r\n\r\nhello"))
        self.assertEqual([r.cache for r in self.records], ["TCP_MISS", "TCP_MEM_HIT"])

    def test_received_age_counts(self) -> None:
        """
        The Age an origin (itself a cache) sends starts the stored response's age: a hit
        says the sum, once, and a response older than its max-age is stale at once.
        """
        self.ask(get(), ok(b"hello", b"Cache-Control: max-age=100", b"Age: 30"))
        self.clock.advance(5)
        got, sent = self.ask(get())
        self.assertIsNone(sent)
        self.assertEqual(got.count(b"\r\nAge: "), 1)
        self.assertIn(b"\r\nAge: 35\r\n", got)
        self.assertIn(b"Cache-Status: aproxy; hit; ttl=65\r\n", got)
        old = b"http://a.example/old"
        self.ask(get(old), ok(b"x", b"Cache-Control: max-age=100", b"Age: 500"))
        _, sent = self.ask(get(old), ok(b"x"))
        self.assertIsNotNone(sent)

    def test_stale_on_arrival_without_validator_not_stored(self) -> None:
        """A response no later request could use or revalidate is not written at all."""
        for fields in ((b"Cache-Control: max-age=0",), (b"Expires: 0",)):
            got, _ = self.ask(get(), ok(b"x", *fields))
            self.assertIn(b"detail=stale-on-arrival", got, fields)
        got, _ = self.ask(get(), ok(b"x", b"Cache-Control: max-age=0", b'ETag: "v"'))
        self.assertIn(b"; stored\r\n", got)

    def test_no_store_and_private_not_stored(self) -> None:
        """no-store and private responses go to the origin every time."""
        for directive in (b"no-store", b"private", b"max-age=60, no-store"):
            url = b"http://a.example/" + directive.replace(b" ", b"").replace(b",", b"")
            self.ask(get(url), ok(b"x", b"Cache-Control: " + directive))
            _, sent = self.ask(get(url), ok(b"x"))
            self.assertIsNotNone(sent, directive)

    def test_request_with_authorization_needs_public(self) -> None:
        """A response to a request with Authorization is stored only when it says public."""
        auth = b"Authorization: Basic dTpw"
        self.ask(get(URL, auth), ok(b"x", FRESH))
        _, sent = self.ask(get(URL, auth), ok(b"x", FRESH))
        self.assertIsNotNone(sent)
        other = b"http://a.example/public"
        self.ask(get(other, auth), ok(b"x", b"Cache-Control: public, max-age=60"))
        _, sent = self.ask(get(other, auth))
        self.assertIsNone(sent)

    def test_stale_revalidated_304(self) -> None:
        """A stale object is revalidated with its ETag; a 304 serves the stored body."""
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "v1"'))
        self.clock.advance(61)
        client, proto = self.connect_client()
        proto.dataReceived(get())
        attempt = self.connector.attempts[-1]
        upstream = attempt.succeed()
        self.assertIn(b'If-None-Match: "v1"\r\n', upstream.value())
        attempt.respond(
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=120\r\n\r\n'
        )
        got = client.value()
        self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got)
        self.assertIn(b"Cache-Status: aproxy; fwd=stale; fwd-status=304; ttl=120\r\n", got)
        self.assertIn(b"Cache-Control: max-age=120\r\n", got)
        self.assertTrue(got.endswith(b"hello"))
        self.assertEqual(self.records[-1].cache, "TCP_REFRESH_UNMODIFIED")
        # Refreshed: fresh again without the origin.
        _, sent = self.ask(get())
        self.assertIsNone(sent)

    def refused(self, request: bytes) -> bytes:
        """Send C{request} on a new connection; refuse its dial; what the client got."""
        client, proto = self.connect_client()
        proto.dataReceived(request)
        self.connector.attempts[-1].deferred.errback(ConnectionRefusedError())
        return bytes(client.value())

    def test_unreachable_origin_error_has_cache_status(self) -> None:
        """The proxy's own 502 for a miss says in Cache-Status why it went forward."""
        got = self.refused(get())
        self.assertTrue(got.startswith(b"HTTP/1.1 502 "), got)
        self.assertIn(b"Cache-Status: aproxy; fwd=uri-miss\r\n", got)

    def test_must_revalidate_unreachable_is_504(self) -> None:
        """A stale must-revalidate object whose origin is down: 504 (RFC 9111 4.2.4)."""
        self.ask(get(), ok(b"hello", b"Cache-Control: max-age=60, must-revalidate", b'ETag: "1"'))
        self.clock.advance(61)
        got = self.refused(get())
        self.assertTrue(got.startswith(b"HTTP/1.1 504 "), got)
        self.assertIn(b"Cache-Status: aproxy; fwd=stale\r\n", got)
        self.assertNotIn(b"hello", got)

    def test_stale_served_when_origin_unreachable(self) -> None:
        """
        A stale object whose origin refuses the connection, closes it without a response
        or does not answer in time is served stale (RFC 9111 section 4.2.4: a
        disconnected cache may), saying so in Cache-Status; the log says
        TCP_REFRESH_FAIL_OLD, as Squid's.
        """
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "1"'))
        self.clock.advance(61)
        got = self.refused(get())
        self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got)
        self.assertIn(b"Cache-Status: aproxy; fwd=stale; ttl=-1; detail=origin-unreachable", got)
        self.assertIn(b"Age: 61\r\n", got)
        self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)
        self.assertEqual(self.records[-1].cache, "TCP_REFRESH_FAIL_OLD")
        client, proto = self.connect_client()
        proto.dataReceived(get())
        self.connector.attempts[-1].succeed()
        self.connector.attempts[-1].close()
        self.assertTrue(client.value().endswith(b"\r\n\r\nhello"), client.value())
        client, proto = self.connect_client()
        proto.dataReceived(get())
        self.connector.attempts[-1].succeed()
        self.clock.advance(self.config.read_timeout + 1)
        self.assertTrue(client.value().endswith(b"\r\n\r\nhello"), client.value())
        # (The keep-alive connection goes on: its next request goes to the origin.)
        dials = len(self.connector.attempts)
        proto.dataReceived(get(method=b"HEAD"))
        self.assertFalse(client.disconnecting)
        self.assertEqual(len(self.connector.attempts), dials + 1)

    def test_fallback_dropped_when_done(self) -> None:
        """The stale fallback refers to its request: it is dropped when the exchange
        ends, so no reference cycle is left for the garbage collector per revalidation."""
        cache = self.factory.cache
        assert cache is not None
        seen: list[StageRequest] = []
        finished = cache.finished

        def spy(request: StageRequest) -> None:
            seen.append(request)
            finished(request)

        self.patch(cache, "finished", spy)
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "1"'))
        self.clock.advance(61)
        self.ask(get(), b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\n\r\n')
        self.assertEqual(len(seen), 2)
        self.assertIsNone(seen[1].fallback)

    def test_not_served_stale_when_forbidden(self) -> None:
        """
        No stale copy when the response forbids it (no-cache; must-revalidate and
        s-maxage get 504 instead, see above), when the client asked for a fresh one, or
        when it is stale by more than a week: the origin's failure is the answer.
        """
        url = b"http://a.example/no-cache"
        self.ask(get(url), ok(b"hello", b"Cache-Control: no-cache", b'ETag: "1"'))
        got = self.refused(get(url))
        self.assertTrue(got.startswith(b"HTTP/1.1 502 "), got)
        self.ask(get(), ok(b"hello", b"Cache-Control: max-age=60, s-maxage=60", b'ETag: "1"'))
        self.clock.advance(61)
        self.assertTrue(self.refused(get()).startswith(b"HTTP/1.1 504 "))
        other = b"http://a.example/old"
        self.ask(get(other), ok(b"hello", FRESH, b'ETag: "1"'))
        self.clock.advance(61)
        for limit in (b"Cache-Control: no-cache", b"Cache-Control: max-age=30"):
            got = self.refused(get(other, limit))
            self.assertTrue(got.startswith(b"HTTP/1.1 502 "), got)
        self.clock.advance(7 * 24 * 3600)
        got = self.refused(get(other))
        self.assertTrue(got.startswith(b"HTTP/1.1 502 "), got)

    def test_stale_revalidated_200_replaces(self) -> None:
        """A stale object whose origin answers 200 is replaced by the new response."""
        self.ask(get(), ok(b"old", FRESH, b'ETag: "v1"'))
        self.clock.advance(61)
        got, _ = self.ask(get(), ok(b"new!", FRESH, b'ETag: "v2"'))
        self.assertTrue(got.endswith(b"new!"))
        self.assertEqual(self.records[-1].cache, "TCP_REFRESH_MODIFIED")
        got, sent = self.ask(get())
        self.assertIsNone(sent)
        self.assertTrue(got.endswith(b"new!"))

    def test_head_from_stored_get(self) -> None:
        """A HEAD is answered from a stored GET: its head and length, no body."""
        self.ask(get(), ok(b"hello", FRESH))
        got, sent = self.ask(get(method=b"HEAD"))
        self.assertIsNone(sent)
        self.assertIn(b"Content-Length: 5\r\n", got)
        self.assertTrue(got.endswith(b"\r\n\r\n"), got)

    def test_range_from_stored(self) -> None:
        """A single range is answered 206 from a complete stored object."""
        self.ask(get(), ok(b"0123456789", FRESH))
        got, sent = self.ask(get(URL, b"Range: bytes=2-4"))
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 206 Partial Content\r\n"), got)
        self.assertIn(b"Content-Range: bytes 2-4/10\r\n", got)
        self.assertIn(b"Content-Length: 3\r\n", got)
        self.assertTrue(got.endswith(b"\r\n\r\n234"))
        got, _ = self.ask(get(URL, b"Range: bytes=20-"))
        self.assertTrue(got.startswith(b"HTTP/1.1 416 "), got)
        self.assertIn(b"Content-Range: bytes */10\r\n", got)

    def test_client_conditional_answered_304(self) -> None:
        """A client's matching If-None-Match on a fresh object gets 304 from the cache."""
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "v1"'))
        got, sent = self.ask(get(URL, b'If-None-Match: "v1"'))
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 304 Not Modified\r\n"), got)
        self.assertNotIn(b"Content-Length", got)
        self.assertIn(b'ETag: "v1"\r\n', got)
        got, _ = self.ask(get(URL, b'If-None-Match: "v0"'))
        self.assertTrue(got.endswith(b"hello"))

    def test_unsafe_method_invalidates(self) -> None:
        """A successful POST to a URL removes its stored response."""
        self.ask(get(), ok(b"hello", FRESH))
        post = b"POST " + URL + b" HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n"
        got, _ = self.ask(post, ok(b"done"))
        self.assertIn(b"Cache-Status: aproxy; fwd=method\r\n", got)
        _, sent = self.ask(get(), ok(b"hello", FRESH))
        self.assertIsNotNone(sent)

    def test_vary_selects_variant(self) -> None:
        """Vary: a request with other values of the named fields is a vary-miss."""
        self.ask(get(URL, b"Accept-Language: en"), ok(b"hello", FRESH, b"Vary: Accept-Language"))
        _, sent = self.ask(get(URL, b"Accept-Language: en"))
        self.assertIsNone(sent)
        got, sent = self.ask(get(URL, b"Accept-Language: fr"), ok(b"salut", FRESH))
        self.assertIsNotNone(sent)
        self.assertIn(b"fwd=vary-miss", got)

    def test_only_if_cached_504(self) -> None:
        """only-if-cached with nothing stored gets 504, and no origin request."""
        got, sent = self.ask(get(URL, b"Cache-Control: only-if-cached"))
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 504 "), got)

    def test_request_no_cache_revalidates(self) -> None:
        """A client's no-cache makes the cache check with the origin first."""
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "v1"'))
        _, sent = self.ask(
            get(URL, b"Cache-Control: no-cache"), b"HTTP/1.1 304 Not Modified\r\n\r\n"
        )
        assert sent is not None
        self.assertIn(b'If-None-Match: "v1"', sent)

    def follower(self) -> tuple[HalfCloseTransport, HalfCloseTransport, ProxyProtocol, Attempt]:
        """
        A fetch in flight (its dial completed, no response yet) and a second client that
        asked for the same URL: the first client, the second and its protocol, the dial.
        """
        first, p1 = self.connect_client()
        p1.dataReceived(get())
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        second, p2 = self.connect_client()
        p2.dataReceived(get())
        return first, second, p2, attempt

    def test_collapsed_miss_one_origin_request(self) -> None:
        """A second request for a URL being fetched follows that fetch as it arrives."""
        first, second, p2, attempt = self.follower()
        self.assertEqual(len(self.connector.attempts), 1)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + FRESH + b"\r\n\r\nhello")
        self.assertTrue(second.value().endswith(b"\r\n\r\nhello"), second.value())
        self.assertIn(b"collapsed", second.value())
        attempt.respond(b"world")
        self.assertTrue(first.value().endswith(b"helloworld"))
        self.assertTrue(second.value().endswith(b"helloworld"))
        self.assertEqual(self.factory.cache.collapsed, 1)  # type: ignore[union-attr]

    def test_no_content_stored_and_answered(self) -> None:
        """
        A cacheable 204 has no body: it is stored when its head ends (before, its store
        waited for an end that never came, and later requests followed it forever), and
        a hit of it has no framing fields and ends at its head.
        """
        no_content = b"HTTP/1.1 204 No Content\r\n" + FRESH + b"\r\n\r\n"
        got, _ = self.ask(get(), no_content)
        self.assertIn(b"; stored\r\n", got)
        self.assertEqual(self.factory.cache.fills, {})  # type: ignore[union-attr]
        client, proto = self.connect_client()
        proto.dataReceived(get() + get())
        self.assertEqual(len(self.connector.attempts), 1)
        got = client.value()
        self.assertEqual(got.count(b"HTTP/1.1 204 No Content\r\n"), 2, got)
        self.assertIn(b"Cache-Status: aproxy; hit;", got)
        self.assertNotIn(b"Transfer-Encoding", got)
        self.assertNotIn(b"Content-Length", got)
        self.assertTrue(got.endswith(b"\r\n\r\n"), got)

    def test_collapsed_onto_a_no_content_response(self) -> None:
        """A follower of a fetch that turns out a 204 gets no body framing either."""
        first, second, p2, attempt = self.follower()
        attempt.respond(b"HTTP/1.1 204 No Content\r\n" + FRESH + b"\r\n\r\n")
        got = second.value()
        self.assertTrue(got.startswith(b"HTTP/1.1 204 No Content\r\n"), got)
        self.assertIn(b"collapsed", got)
        self.assertNotIn(b"Transfer-Encoding", got)
        self.assertTrue(got.endswith(b"\r\n\r\n"), got)
        p2.dataReceived(get())
        self.assertEqual(second.value().count(b"HTTP/1.1 204"), 2)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_collapsed_onto_a_fetch_without_length(self) -> None:
        """
        Followers of a chunked response (its length unknown until its end) follow it
        too: chunked to an HTTP/1.1 client, delimited by the close to HTTP/1.0.
        """
        first, second, p2, attempt = self.follower()
        old, p3 = self.connect_client()
        p3.dataReceived(get().replace(b"HTTP/1.1", b"HTTP/1.0"))
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + FRESH + b"\r\n\r\n5\r\nhello\r\n"
        )
        self.assertEqual(len(self.connector.attempts), 1)
        attempt.respond(b"5\r\nworld\r\n0\r\n\r\n")
        got = second.value()
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", got)
        self.assertNotIn(b"Content-Length", got)
        self.assertIn(b"collapsed", got)
        self.assertTrue(got.endswith(b"\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"), got)
        got = old.value()
        self.assertNotIn(b"Content-Length", got)
        self.assertNotIn(b"chunked", got)
        self.assertTrue(got.endswith(b"\r\n\r\nhelloworld"), got)
        self.assertTrue(old.disconnecting)
        self.assertFalse(second.disconnecting)
        self.assertEqual(self.factory.cache.collapsed, 2)  # type: ignore[union-attr]
        # And it was stored, with its length now known.
        got, sent = self.ask(get())
        self.assertIsNone(sent)
        self.assertIn(b"Content-Length: 10\r\n", got)

    def test_range_request_does_not_follow_a_full_fetch(self) -> None:
        """A Range request during a fetch of the whole gets its own origin request."""
        first, p1 = self.connect_client()
        p1.dataReceived(get())
        self.connector.attempts[-1].succeed()
        second, p2 = self.connect_client()
        p2.dataReceived(get(URL, b"Range: bytes=0-1"))
        self.assertEqual(len(self.connector.attempts), 2)

    def test_collapsed_but_not_storable_goes_upstream(self) -> None:
        """Followers of a response that can't be stored get their own origin request."""
        first, second, p2, attempt = self.follower()
        attempt.respond(ok(b"mine", b"Cache-Control: no-store"))
        self.assertEqual(len(self.connector.attempts), 2)
        own = self.connector.attempts[-1]
        own.succeed()
        own.respond(ok(b"yours", b"Cache-Control: no-store"))
        self.assertTrue(second.value().endswith(b"yours"))
        self.assertIn(
            b"Cache-Status: aproxy; fwd=uri-miss; fwd-status=200; detail=no-store", second.value()
        )

    def test_leader_leaves_follower_gets_all(self) -> None:
        """A client that leaves does not stop a fetch another client follows."""
        first, p1 = self.connect_client()
        p1.dataReceived(get())
        attempt = self.connector.attempts[-1]
        upstream = attempt.succeed()
        second, p2 = self.connect_client()
        p2.dataReceived(get())
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + FRESH + b"\r\n\r\nhello")
        p1.connectionLost()
        self.assertFalse(upstream.disconnecting)
        attempt.respond(b"world")
        self.assertTrue(second.value().endswith(b"helloworld"))
        _, sent = self.ask(get())
        self.assertIsNone(sent)

    def test_leaver_alone_with_much_left_stops(self) -> None:
        """Nobody left and most of the body to come: the fetch stops, nothing is stored."""
        first, p1 = self.connect_client()
        p1.dataReceived(get())
        attempt = self.connector.attempts[-1]
        upstream = attempt.succeed()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n" + FRESH + b"\r\n\r\nab")
        p1.connectionLost()
        self.assertTrue(upstream.disconnecting)
        _, sent = self.ask(get())
        self.assertIsNotNone(sent)

    def test_several_ranges_go_to_the_origin(self) -> None:
        """A stored object answers a single range; several ranges are the origin's to
        answer (multipart/byteranges), and nothing is stored from that."""
        self.ask(get(), ok(b"hello world", FRESH))
        got, sent = self.ask(get(URL, b"Range: bytes=0-1"))
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 206 "), got)
        for ranges in (b"Range: bytes=0-1,4-5", b"Range: bytes=0-1\r\nRange: bytes=4-5"):
            got, sent = self.ask(get(URL, ranges), ok(b"multipart", status=b"206 Partial Content"))
            self.assertIsNotNone(sent)
            self.assertIn(b"Cache-Status: aproxy; fwd=request; fwd-status=206", got)

    def test_purge(self) -> None:
        """PURGE from an allowed network removes the URL; the next request is a miss."""
        self.ask(get(), ok(b"hello", FRESH))
        got, sent = self.ask(get(method=b"PURGE"))
        self.assertIsNone(sent)
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got)
        self.assertIn(b"Cache-Status: aproxy; detail=purge\r\n", got)
        got, _ = self.ask(get(method=b"PURGE"))
        self.assertTrue(got.startswith(b"HTTP/1.1 404 "), got)
        _, sent = self.ask(get(), ok(b"hello", FRESH))
        self.assertIsNotNone(sent)

    def test_purge_refused_elsewhere(self) -> None:
        """PURGE from a client outside --cache-purge-from gets 403."""
        factory = ProxyFactory(
            ProxyConfig(cache_memory="1MiB", allow=["0.0.0.0/0"]), self.clock, self.connector
        )
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(get(method=b"PURGE"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 403 "), client.value())


class DiskCacheTests(ProxyTestCase):
    """The disk store: shared, and kept across restarts."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.config = ProxyConfig(cache_dir=self.dir, pool_size=0)
        super().setUp()

    def fetch(self, factory: ProxyFactory, response: bytes | None) -> tuple[bytes, bool]:
        """GET URL through C{factory}; @return: what the client got, whether it went upstream."""
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        before = len(self.connector.attempts)
        proto.dataReceived(get())
        went = len(self.connector.attempts) > before
        if went and response is not None:
            attempt = self.connector.attempts[-1]
            attempt.succeed()
            attempt.respond(response)
        return client.value(), went

    def test_object_over_the_store_size_not_written(self) -> None:
        """A response larger than the whole disk store is relayed, not written and lost."""
        config = ProxyConfig(cache_dir=self.dir, cache_size="64KiB", pool_size=0)
        factory = ProxyFactory(config, self.clock, self.connector)
        got, went = self.fetch(factory, ok(b"x" * 100_000, FRESH))
        self.assertTrue(went)
        self.assertIn(b"detail=too-large", got)
        self.assertTrue(got.endswith(b"x" * 100_000))

    def test_purge_reaches_the_memory_of_other_workers(self) -> None:
        """
        With --workers, each worker has its own memory tier over the shared disk: a
        PURGE through one worker removes the others' memory copies within SYNC_INTERVAL.
        """
        config = ProxyConfig(
            cache_dir=self.dir,
            cache_memory="1MiB",
            pool_size=0,
            cache_purge_from=("127.0.0.1/32",),
        )
        one = ProxyFactory(config, self.clock, self.connector)
        two = ProxyFactory(config, self.clock, self.connector)
        self.fetch(one, ok(b"old", FRESH))
        got, went = self.fetch(two, None)
        self.assertFalse(went)
        self.assertIn(b"Cache-Status: aproxy; hit", got)
        got, went = self.fetch(two, None)  # now from two's memory
        self.assertFalse(went)
        proto = one.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        proto.dataReceived(get(method=b"PURGE"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"), client.value())
        self.clock.advance(SYNC_INTERVAL)
        got, went = self.fetch(two, ok(b"new", FRESH))
        self.assertTrue(went)
        self.assertTrue(got.endswith(b"new"))

    def test_hit_after_restart(self) -> None:
        """An object stored by one factory is a hit for another on the same directory."""
        self.fetch(self.factory, ok(b"x" * 100_000, FRESH))
        other = ProxyFactory(self.config, self.clock, self.connector)
        got, went = self.fetch(other, None)
        self.assertFalse(went)
        self.assertTrue(got.endswith(b"x" * 100_000))
        self.assertIn(b"Cache-Status: aproxy; hit", got)

    def test_large_object_revalidated_streams_from_disk(self) -> None:
        """A stale object on disk answered after a 304 streams its whole body."""
        body = b"z" * 600_000
        self.fetch(self.factory, ok(body, b"Cache-Control: max-age=1", b'ETag: "e"'))
        self.clock.advance(5)
        got, went = self.fetch(self.factory, b"HTTP/1.1 304 Not Modified\r\n\r\n")
        self.assertTrue(went)
        self.assertIn(b"fwd-status=304", got)
        self.assertTrue(got.endswith(body), len(got))

    def test_truncated_file_is_a_miss(self) -> None:
        """An object whose file was cut short is never served."""
        self.fetch(self.factory, ok(b"y" * 1000, FRESH))
        for root, _, files in os.walk(os.path.join(self.dir, "objects")):
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(10)
        _, went = self.fetch(self.factory, ok(b"y" * 1000, FRESH))
        self.assertTrue(went)


class CacheMetricsTests(ProxyTestCase):
    """The cache's figures in /metrics."""

    config = ProxyConfig(cache_memory="1MiB", pool_size=0)

    def test_metrics(self) -> None:
        """Requests by result, bytes and objects by tier appear in the metrics."""
        from aproxy.observe.metrics import Metrics

        metrics = Metrics(self.factory, self.clock)
        self.factory.observers.append(metrics)
        for _ in range(2):
            client, proto = self.connect_client()
            proto.dataReceived(get())
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(ok(b"hello", FRESH))
        client, proto = self.connect_client()
        proto.dataReceived(get())
        text = metrics.render().decode()
        self.assertIn('aproxy_cache_requests_total{result="TCP_MISS"} 1.0', text)
        self.assertIn('aproxy_cache_requests_total{result="TCP_MEM_HIT"} 1.0', text)
        self.assertIn('aproxy_cache_requests_total{result="TCP_CF_HIT"} 1.0', text)
        self.assertIn('aproxy_cache_objects{tier="memory"} 1.0', text)
        self.assertIn("aproxy_cache_collapsed_total 1.0", text)
        self.assertIn("aproxy_cache_saved_bytes_total 5.0", text)


class CacheEdgeTests(ProxyTestCase):
    """Limits and the requests the cache leaves to the origin."""

    config = ProxyConfig(cache_memory="64KiB", pool_size=0)

    def ask(self, request: bytes, response: bytes | None) -> tuple[bytes, bool]:
        """Send C{request}; answer an origin request with C{response}."""
        client, proto = self.connect_client()
        before = len(self.connector.attempts)
        proto.dataReceived(request)
        went = len(self.connector.attempts) > before
        if went and response is not None:
            attempt = self.connector.attempts[-1]
            attempt.succeed()
            attempt.respond(response)
        return client.value(), went

    def test_memory_only_object_bound(self) -> None:
        """Without a disk, an object over a quarter of the memory tier is not stored."""
        got, _ = self.ask(get(), ok(b"q" * 20_000, FRESH))
        self.assertIn(b"detail=too-large", got)
        _, went = self.ask(get(), ok(b"q" * 20_000, FRESH))
        self.assertTrue(went)

    def test_if_match_goes_to_origin(self) -> None:
        """A request with If-Match is the origin's to evaluate, even when a copy is fresh."""
        self.ask(get(), ok(b"hello", FRESH, b'ETag: "v1"'))
        _, went = self.ask(get(URL, b'If-Match: "v1"'), ok(b"hello"))
        self.assertTrue(went)
        _, went = self.ask(get(), None)
        self.assertFalse(went)
