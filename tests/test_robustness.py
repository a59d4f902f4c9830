"""
What a hostile or broken peer can't do to the proxy (issue #12, item 8): every request gets
an answer or a clean close, and no exception reaches the reactor. A bug met while handling
a request costs that connection only: a 500 (or a close), one log line with the traceback.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.python.failure import Failure

from aproxy.errors import BadRequest
from aproxy.http.target import parse_absolute_target, parse_authority
from aproxy.observe.records import Exchange
from aproxy.upstream.protocol import UpstreamFactory
from tests.support import OK_5, ProxyTestCase

LONG_LABEL = "x" * 64


class HostNameTests(ProxyTestCase):
    """A host name DNS can't carry is a 400 naming it, before any lookup."""

    def test_label_over_63_characters_is_400(self) -> None:
        """A 64-character label in an absolute-form target: 400 naming the host."""
        events = self.capture_log()
        self.proto.dataReceived(
            b"GET http://%s.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n" % LONG_LABEL.encode()
        )
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 400 "), value)
        self.assertIn(b"bad host name", value)
        self.assertIn(b"xxxxxxxx", value)
        self.assertEqual(self.connector.attempts, [])
        self.assertEqual([e for e in events if "log_failure" in e], [])

    def test_connect_label_over_63_characters_is_400(self) -> None:
        """The same for a CONNECT target."""
        head = b"CONNECT %s.invalid:443 HTTP/1.1\r\nHost: a\r\n\r\n" % LONG_LABEL.encode()
        self.proto.dataReceived(head)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.connector.attempts, [])

    def test_name_rules(self) -> None:
        """
        Empty labels and over-long names are refused; 63-character labels, a final dot
        and addresses pass.
        """
        for bad in (b"a..b", b".a", LONG_LABEL.encode(), b"a." * 127 + b"a"):
            self.assertRaises(BadRequest, parse_authority, bad, 80)
        for good in (b"x" * 63 + b".example", b"example.com.", b"127.0.0.1", b"[::1]"):
            parse_authority(good, 80)
        target = parse_absolute_target(b"http://" + b"a" * 63 + b"/", b"GET")
        self.assertEqual(target.host, "a" * 63)


class EarlyResponseTests(ProxyTestCase):
    """An origin that answers and closes while the client still uploads."""

    def test_origin_answers_413_and_closes_during_upload(self) -> None:
        """
        The client gets the 413 and its connection closes; body bytes it still sends are
        ignored, without an exception.
        """
        events = self.capture_log()
        attempt, upstream = self.forward(
            b"POST http://a.example/up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        attempt.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        attempt.close()
        self.proto.dataReceived(b"x" * 4096)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 413 "), value)
        self.assertIn(b"Connection: close\r\n", value)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual([e for e in events if "log_failure" in e], [])


class TunnelCloseTests(ProxyTestCase):
    """Both ends of a tunnel closing in one reactor pass."""

    def test_client_eof_after_origin_lost(self) -> None:
        """
        The client's half-close arriving after the origin's connection ended (its socket
        closed) does not touch the origin's transport.
        """
        events = self.capture_log()
        attempt, upstream = self.forward(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n")
        attempt.close()
        self.proto.readConnectionLost()
        self.assertFalse(upstream.write_closed)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual([e for e in events if "log_failure" in e], [])


class LastLineOfDefenceTests(ProxyTestCase):
    """An unexpected exception while handling a request costs that request only."""

    def break_target_parsing(self) -> None:
        """Make the next target parse raise, as a bug would."""

        def broken(raw: bytes, method: bytes) -> Any:
            raise RuntimeError("a bug")

        self.factory.parse_target = broken  # type: ignore[method-assign]

    def test_bug_before_response_is_500(self) -> None:
        """A 500 with Proxy-Status proxy_internal_error, one log line, a close."""
        events = self.capture_log()
        self.break_target_parsing()
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 500 "), value)
        self.assertIn(b"Proxy-Status: aproxy; error=proxy_internal_error", value)
        self.assertTrue(self.client.disconnecting)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_connections_unaffected(self) -> None:
        """Another client connection is served normally after the bug."""
        self.capture_log()
        self.break_target_parsing()
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
        del self.factory.parse_target
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(self.client.disconnecting)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(OK_5)
        self.assertTrue(client.value().endswith(b"hello"))
        self.assertEqual(self.factory.open_connections, 1)

    def test_bug_after_response_started_closes(self) -> None:
        """Once the response started, a bug closes the connection without a 500."""
        events = self.capture_log()
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")

        def broken(data: bytes, head: bytes | None) -> None:
            raise RuntimeError("a bug")

        exchange = self.proto.exchange
        assert exchange is not None
        exchange._response_data = broken  # type: ignore[method-assign]
        attempt.respond(b"world")
        self.assertNotIn(b" 500 ", self.client.value())
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bug_in_deferred_callback(self) -> None:
        """A bug in the dial's callback is answered too (no unhandled error in a Deferred)."""
        events = self.capture_log()
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")

        def broken(up: Any, reused: bool) -> None:
            raise RuntimeError("a bug")

        exchange = self.proto.exchange
        assert exchange is not None
        exchange._attach = broken  # type: ignore[method-assign]
        self.connector.attempts[0].succeed()
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# -- random requests through the real protocol -------------------------------------------

_SCHEMES = st.sampled_from(
    [b"http", b"https", b"HTTP", b"ws", b"wss", b"ftp", b"", b"h\xfftp", b"http+x"]
)
_HOST_CHARS = st.sampled_from(list(b"abcxyz019-._~[]:%@\xff/?#*"))
_HOSTS = st.one_of(
    st.lists(_HOST_CHARS, max_size=80).map(bytes),
    st.sampled_from([b"a" * 64 + b".com", b"[::1]", b"127.0.0.1", b"[fe80::1%25eth0]", b""]),
)
_PORTS = st.one_of(st.just(b""), st.integers(-5, 70000).map(lambda n: b":%d" % n))
_PATHS = st.lists(st.sampled_from(list(b"/?#%ab *\xff\t")), max_size=40).map(bytes)
_METHODS = st.sampled_from(
    [b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b"TRACE", b"PUT", b"get", b"G\xffT"]
)
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b""])


class RandomRequestTests(ProxyTestCase):
    """Whatever the request line, the proxy answers or closes cleanly."""

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_METHODS, _SCHEMES, _HOSTS, _PORTS, _PATHS, _VERSIONS, st.booleans())
    def test_random_request_lines(
        self,
        method: bytes,
        scheme: bytes,
        host: bytes,
        port: bytes,
        path: bytes,
        version: bytes,
        authority_form: bool,
    ) -> None:
        """
        A random request line, in absolute or authority form, gets a response or a
        clean close, or is dialed; no exception is logged.
        """
        events = self.capture_log()
        client, proto = self.connect_client()
        before = len(self.connector.attempts)
        target = host + port if authority_form else scheme + b"://" + host + port + path
        proto.dataReceived(method + b" " + target + b" " + version + b"\r\nHost: h\r\n\r\n")
        if len(self.connector.attempts) > before:
            attempt = self.connector.attempts[-1]
            if isinstance(attempt.factory, UpstreamFactory):
                attempt.succeed()
                attempt.respond(OK_5)
                attempt.close()
            else:
                # TLS to the origin: a handshake can't be faked here; fail the dial.
                attempt.deferred.errback(Failure(error.ConnectionRefusedError()))
        value = client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 ") or client.disconnecting, value)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        proto.connectionLost(Failure(error.ConnectionDone()))


class RefusedRequestRecordTests(ProxyTestCase):
    """Requests refused before they had a parsed head still leave a record (review)."""

    def test_malformed_request_is_recorded(self) -> None:
        """A CL+TE request gets 400 and a record (method and target unknown: -)."""
        records: list[Exchange] = []
        self.factory.observers.append(records.append)
        self.proto.dataReceived(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))
        [record] = records
        self.assertEqual((record.status, record.method, record.target), (400, "-", "-"))
        self.assertEqual(record.client, "127.0.0.1")
        self.assertEqual(record.bytes_to_client, len(self.client.value()))

    def test_head_too_large_is_recorded(self) -> None:
        """A head over the limit gets 431 and a record."""
        records: list[Exchange] = []
        self.factory.observers.append(records.append)
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nX: " + b"y" * 70000)
        self.assertEqual([r.status for r in records], [431])

    def test_response_head_too_large_names_it(self) -> None:
        """An origin head over --max-head-size: 502 saying so, with RFC 9209's type."""
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "), value[:100])
        self.assertIn(b"error=http_response_header_section_size", value)
        self.assertIn(b"response head is larger than --max-head-size", value)
