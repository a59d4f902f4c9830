"""
RFC 5861's stale responses. stale-while-revalidate (section 3): a stale object within its
window is answered at once while the proxy revalidates it through itself
(L{aproxy.client.background}); past the window, or when anything forbids serving it
stale, the client waits for the origin. stale-if-error (section 4): a stale object
answers in place of the origin's 500, 502, 503 or 504 within its window.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError

from aproxy.cache.background import MAX_BACKGROUND
from aproxy.client.background import SinkTransport, background_request, revalidation_request
from aproxy.client.stages import StageRequest
from aproxy.config import ProxyConfig
from aproxy.http.head import Target, parse_request_head
from aproxy.observe.records import Exchange
from tests.support import ProxyTestCase

URL = b"http://a.example/swr"
REQUEST = b"GET " + URL + b" HTTP/1.1\r\nHost: a.example\r\nAccept-Encoding: gzip\r\n\r\n"
SWR = b"Cache-Control: max-age=1, stale-while-revalidate=60"


def response(cache_control: bytes, etag: bytes, body: bytes = b"hello") -> bytes:
    """A 200 with C{body}, the given C{Cache-Control} line and an ETag."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
        + cache_control
        + b'\r\nETag: "'
        + etag
        + b'"\r\n\r\n'
        + body
    )


class StaleWhileRevalidateTests(ProxyTestCase):
    """The memory cache with stored responses that allow stale-while-revalidate."""

    config = ProxyConfig(cache_memory="4MiB", pool_size=0)

    def setUp(self) -> None:
        super().setUp()
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)

    def store(self, cache_control: bytes = SWR, request: bytes = REQUEST, wait: int = 5) -> None:
        """Store a response to C{request}, then let it go stale (C{wait} seconds)."""
        client, proto = self.connect_client()
        proto.dataReceived(request)
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(response(cache_control, b"v1"))
        self.assertIn(b"; stored\r\n", client.value())
        self.clock.advance(wait)

    def ask(self, request: bytes = REQUEST) -> bytes:
        """
        Send C{request} on a new connection; what the client got at once (a background
        revalidation it started begins right after, in the same reactor turn).
        """
        client, proto = self.connect_client()
        proto.dataReceived(request)
        got = bytes(client.value())
        self.clock.advance(0)
        return got

    @property
    def running(self) -> set[bytes]:
        """The keys with a background revalidation in flight."""
        cache = self.factory.cache
        assert cache is not None
        return cache.revalidations.running

    def test_stale_served_at_once_and_revalidated_behind(self) -> None:
        """
        Within the window the stale object is the answer, without waiting; the proxy
        revalidates it with one conditional request of its own, whose 304 makes the
        object fresh for the next clients.
        """
        self.store()
        dials = len(self.connector.attempts)
        got = self.ask()
        self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)
        self.assertIn(b"Cache-Status: aproxy; hit; ttl=-4; detail=stale-while-revalidate", got)
        self.assertEqual(len(self.connector.attempts), dials + 1)
        attempt = self.connector.attempts[-1]
        upstream = attempt.succeed()
        sent = upstream.value()
        self.assertTrue(sent.startswith(b"GET /swr HTTP/1.1\r\n"), sent)
        self.assertIn(b'If-None-Match: "v1"\r\n', sent)
        self.assertIn(b"Accept-Encoding: gzip\r\n", sent)
        self.assertEqual(len(self.running), 1)
        attempt.respond(
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=100\r\n\r\n'
        )
        self.clock.advance(0)
        self.assertEqual(self.running, set())
        self.assertEqual(self.records[-1].cache, "TCP_REFRESH_UNMODIFIED")
        got = self.ask()
        self.assertIn(b"Cache-Status: aproxy; hit; ttl=100\r\n", got)
        self.assertEqual(len(self.connector.attempts), dials + 1)

    def test_one_revalidation_per_url(self) -> None:
        """Clients meanwhile get the stale object too, and cause no second request."""
        self.store()
        dials = len(self.connector.attempts)
        for _ in range(3):
            self.assertIn(b"detail=stale-while-revalidate", self.ask())
        self.assertEqual(len(self.connector.attempts), dials + 1)

    def test_one_revalidation_per_variant(self) -> None:
        """Each Vary variant of a URL is revalidated on its own: a stale variant B is not
        left unrevalidated while variant A's revalidation runs."""
        vary = SWR + b"\r\nVary: Accept-Encoding"
        other = REQUEST.replace(b"gzip", b"br")
        self.store(vary, wait=0)
        self.store(vary, other)
        dials = len(self.connector.attempts)
        self.assertIn(b"stale-while-revalidate", self.ask())
        self.assertIn(b"stale-while-revalidate", self.ask(other))
        self.assertEqual(len(self.connector.attempts), dials + 2)
        self.assertEqual(len(self.running), 2)

    def test_new_response_replaces(self) -> None:
        """A revalidation answered with a new 200 stores that response."""
        self.store()
        self.ask()
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(response(b"Cache-Control: max-age=100", b"v2", b"new!"))
        self.clock.advance(0)
        got = self.ask()
        self.assertTrue(got.endswith(b"\r\n\r\nnew!"), got)
        self.assertIn(b"hit; ttl=100\r\n", got)

    def test_failed_revalidation_ends(self) -> None:
        """An origin that can't be reached ends the revalidation: the next may start."""
        self.store()
        self.ask()
        self.connector.attempts[-1].deferred.errback(ConnectionRefusedError())
        self.clock.advance(0)
        self.assertEqual(self.running, set())
        dials = len(self.connector.attempts)
        self.ask()
        self.assertEqual(len(self.connector.attempts), dials + 1)

    def test_past_the_window_the_client_waits(self) -> None:
        """Past max-age + stale-while-revalidate, the client's own request revalidates."""
        self.store(b"Cache-Control: max-age=1, stale-while-revalidate=3")
        got = self.ask()
        self.assertEqual(got, b"")
        self.assertEqual(self.running, set())

    def test_not_when_forbidden(self) -> None:
        """must-revalidate or no-cache in the response, and any freshness limit the
        client sets (RFC 9111 section 5.2.1), each keep the client waiting for the
        origin."""
        for i, directive in enumerate((b", must-revalidate", b", no-cache")):
            url = b"http://a.example/%d" % i
            request = REQUEST.replace(URL, url)
            self.store(SWR + directive, request)
            self.assertEqual(self.ask(request), b"", directive)
        self.store()
        for limit in (
            b"Pragma: no-cache",
            b"Cache-Control: no-cache",
            b"Cache-Control: max-age=2",
            b"Cache-Control: min-fresh=30",
            b"Cache-Control: max-stale=1",
        ):
            asked = REQUEST.replace(b"\r\n\r\n", b"\r\n" + limit + b"\r\n\r\n")
            self.assertEqual(self.ask(asked), b"", limit)
        self.assertEqual(self.running, set())

    def test_no_client_slot_taken(self) -> None:
        """
        The revalidation takes none of its client's connections under
        --max-clients-per-ip (before, a client at its limit had it refused, and its next
        own connection could be refused while one ran), and its address is not noted as
        one of the proxy's own.
        """
        self.factory.reconfigure(replace(self.config, max_clients_per_ip=3))
        self.store()
        dials = len(self.connector.attempts)
        owned = set(self.factory.loops.own_addresses)
        self.assertIn(b"stale-while-revalidate", self.ask())
        self.assertEqual(len(self.connector.attempts), dials + 1)
        self.assertEqual(self.factory.clients_per_ip["127.0.0.1"], 3)
        self.assertEqual(self.factory.loops.own_addresses, owned)

    def test_not_for_a_session_user(self) -> None:
        """A request of an intercepted session (its user logged in with the CONNECT, no
        credentials of its own) is not repeated as a plain request, which --auth would
        refuse: the client waits for the origin instead."""
        head = parse_request_head(REQUEST[:-4])
        view = StageRequest(head, Target(b"http", "a.example", 80, b"/swr", b""), "::1", "u")
        self.assertFalse(background_request(self.factory, self.clock, view, lambda: None))

    def test_bounded(self) -> None:
        """At most MAX_BACKGROUND revalidations run at once; then clients wait."""
        for i in range(MAX_BACKGROUND + 1):
            self.store(request=REQUEST.replace(URL, b"http://a.example/n%d" % i), wait=0)
        self.clock.advance(5)
        for i in range(MAX_BACKGROUND):
            got = self.ask(REQUEST.replace(URL, b"http://a.example/n%d" % i))
            self.assertIn(b"stale-while-revalidate", got)
        got = self.ask(REQUEST.replace(URL, b"http://a.example/n%d" % MAX_BACKGROUND))
        self.assertEqual(got, b"")
        self.assertEqual(len(self.running), MAX_BACKGROUND)


class StaleIfErrorTests(ProxyTestCase):
    """A stored object revalidated while its origin answers with a server error."""

    config = ProxyConfig(cache_memory="4MiB", pool_size=0)

    def setUp(self) -> None:
        super().setUp()
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)

    def revalidated(self, stored: bytes, request: bytes = REQUEST, status: bytes = b"503") -> bytes:
        """
        Store C{stored} (a Cache-Control line), let it go 5 s stale, ask again and let the
        origin answer C{status} with a body: what the client got.
        """
        url = b"http://a.example/sie" + stored.replace(b" ", b"").replace(b",", b"")[14:]
        request = request.replace(URL, url)
        for answer in (response(stored, b"v1"), None):
            client, proto = self.connect_client()
            proto.dataReceived(request)
            attempt = self.connector.attempts[-1]
            attempt.succeed()
            if answer is not None:
                attempt.respond(answer)
                self.clock.advance(5)
        attempt.respond(b"HTTP/1.1 " + status + b" Oops\r\nContent-Length: 5\r\n\r\noops!")
        return bytes(client.value())

    def test_stale_in_place_of_a_server_error(self) -> None:
        """Within the window, the stored object answers; Cache-Status says why."""
        for status in (b"500", b"502", b"503", b"504"):
            got = self.revalidated(b"Cache-Control: max-age=1, stale-if-error=60", status=status)
            self.assertTrue(got.startswith(b"HTTP/1.1 200 OK\r\n"), got)
            self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)
            value = b"aproxy; fwd=stale; fwd-status=" + status + b"; ttl=-4; detail=stale-if-error"
            self.assertIn(b"Cache-Status: " + value + b"\r\n", got)
            self.assertEqual(self.records[-1].cache, "TCP_REFRESH_FAIL_OLD")

    def test_request_directive(self) -> None:
        """The client's own stale-if-error opens the window too."""
        asked = REQUEST.replace(b"\r\n\r\n", b"\r\nCache-Control: stale-if-error=30\r\n\r\n")
        got = self.revalidated(b"Cache-Control: max-age=1", asked)
        self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)

    def test_error_passed_on(self) -> None:
        """
        The origin's error is the answer without the directive, past the window, when
        the response forbids serving it stale, and for other statuses.
        """
        for stored, status in (
            (b"Cache-Control: max-age=1", b"503"),
            (b"Cache-Control: max-age=1, stale-if-error=3", b"503"),
            (b"Cache-Control: max-age=1, stale-if-error=60, must-revalidate", b"503"),
            (b"Cache-Control: max-age=1, stale-if-error=60, no-cache", b"503"),
            (b"Cache-Control: max-age=1, stale-if-error=60", b"501"),
        ):
            got = self.revalidated(stored, status=status)
            self.assertTrue(got.startswith(b"HTTP/1.1 " + status), (stored, got))
            self.assertTrue(got.endswith(b"oops!"), got)
        pragma = REQUEST.replace(b"\r\n\r\n", b"\r\nPragma: no-cache\r\n\r\n")
        got = self.revalidated(b"Cache-Control: max-age=2, stale-if-error=60", pragma)
        self.assertTrue(got.endswith(b"oops!"), got)  # (a client's limit, as above)


class RevalidationRequestTests(ProxyTestCase):
    """L{revalidation_request} and L{SinkTransport}."""

    def view(self, raw: bytes) -> StageRequest:
        """What a stage sees of request C{raw}."""
        head = parse_request_head(raw[:-4])  # (the reader's head: no blank line)
        return StageRequest(head, Target(b"http", "a.example", 80, b"/", b""), "127.0.0.1", None)

    def test_fields(self) -> None:
        """The client's fields go along, less its directives, preconditions, range and
        connection fields; the revalidation asks for a fresh copy and closes."""
        raw = (
            b"HEAD http://a.example/x HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n"
            b'Cache-Control: max-stale\r\nPragma: no-cache\r\nIf-None-Match: "a"\r\n'
            b"If-Modified-Since: x\r\nRange: bytes=0-1\r\nConnection: keep-alive\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n"
        )
        self.assertEqual(
            revalidation_request(self.view(raw)),
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n"
            b"Cache-Control: max-age=0\r\nConnection: close\r\n\r\n",
        )

    def test_origin_form_not_repeated(self) -> None:
        """A request in origin form (no scheme or host to repeat it with) is not made
        again."""
        self.assertIsNone(revalidation_request(self.view(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")))

    def test_sink(self) -> None:
        """The sink drops what is written and ends its protocol once, a turn later."""
        ended: list[object] = []
        address = IPv4Address("TCP", "127.0.0.1", 0)
        sink = SinkTransport(self.clock, address, address, lambda: ended.append(None))
        sink.protocol = self.factory.buildProtocol(address)
        sink.protocol.makeConnection(sink)
        sink.write(b"abc")
        sink.writeSequence([b"de", b"f"])
        self.assertEqual(sink.written, 6)
        sink.loseConnection()
        sink.abortConnection()
        self.assertEqual(ended, [])
        self.clock.advance(0)
        self.assertEqual(ended, [None])
        self.assertFalse(sink.connected)
