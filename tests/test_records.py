"""Every finished request and tunnel is reported once to the factory's observers."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aproxy.observe.records import MAX_LOGGED_FIELD, Exchange
from tests.support import GET_A, OK_5, ProxyTestCase


class RecordTests(ProxyTestCase):
    """The Exchange records carry what an access log and metrics need."""

    def setUp(self) -> None:
        super().setUp()
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)

    def test_forwarded_request(self) -> None:
        """A forwarded GET is recorded with status, both byte counts and its duration."""
        self.clock.advance(3)
        attempt, upstream = self.forward()
        self.clock.advance(0.25)
        attempt.respond(OK_5)
        [record] = self.records
        self.assertEqual(
            (record.client, record.method, record.target, record.status, record.error),
            ("127.0.0.1", "GET", "http://a.example/x?y=%20", 200, None),
        )
        self.assertEqual(record.bytes_to_client, len(self.client.value()))
        self.assertEqual(record.bytes_to_origin, len(upstream.value()))
        self.assertEqual((record.time, record.duration, record.upstream), (3, 0.25, "direct"))

    def test_error_response(self) -> None:
        """A 502 is recorded with its Proxy-Status error type."""
        self.proto.dataReceived(GET_A)
        self.connector.attempts[0].deferred.errback(Failure(error.ConnectionRefusedError()))
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        [record] = self.records
        self.assertEqual((record.status, record.error), (502, "connection_refused"))
        self.assertEqual(record.bytes_to_client, len(self.client.value()))

    def test_truncated_response(self) -> None:
        """A response cut short is recorded with its status and http_response_incomplete."""
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        attempt.close()
        [record] = self.records
        self.assertEqual((record.status, record.error), (200, "http_response_incomplete"))

    def test_tunnel(self) -> None:
        """A CONNECT tunnel is recorded when it closes, with the bytes it relayed."""
        attempt, upstream = self.forward(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\nhello"
        )
        attempt.respond(b"world!")
        self.assertEqual(self.records, [])
        attempt.close()
        [record] = self.records
        self.assertEqual(
            (record.method, record.target, record.status), ("CONNECT", "example.com:443", 200)
        )
        self.assertEqual(record.bytes_to_origin, 5)
        self.assertEqual(record.bytes_to_client, 39 + 6)

    def test_client_gone_mid_request(self) -> None:
        """A client that leaves before its response is recorded with status 0."""
        self.forward()
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        [record] = self.records
        self.assertEqual(record.status, 0)

    def test_each_request_once(self) -> None:
        """Keep-alive requests are recorded one each, never twice."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.proto.dataReceived(GET_A)
        attempt.respond(OK_5)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual([r.status for r in self.records], [200, 200])

    def test_no_observers_no_records(self) -> None:
        """Without observers nothing is built (the default)."""
        self.factory.observers.clear()
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.assertEqual(self.records, [])


class RequestFieldsTests(ProxyTestCase):
    """
    Records carry the client's HTTP version, Referer and User-Agent (issue 12 item 18),
    read from the request's field lines only when an observer asks for them.
    """

    def setUp(self) -> None:
        super().setUp()
        self.records: list[Exchange] = []
        self.factory.observers.append(self.records.append)

    def test_http10_with_referer_and_user_agent(self) -> None:
        """An HTTP/1.0 request's version, Referer and User-Agent are recorded as sent."""
        attempt, _ = self.forward(
            b"GET http://a.example/p HTTP/1.0\r\nHost: a.example\r\n"
            b"Referer: http://b.example/from?q=1\r\nuser-AGENT:  Wget/1.21.4  \r\n\r\n"
        )
        attempt.respond(OK_5)
        attempt.close()
        [record] = self.records
        self.assertEqual(record.version, "HTTP/1.0")
        self.assertEqual(record.referer, "http://b.example/from?q=1")
        self.assertEqual(record.user_agent, "Wget/1.21.4")

    def test_http11_without_fields(self) -> None:
        """Without the fields they are None; the version is the client's HTTP/1.1."""
        attempt, _ = self.forward(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        attempt.respond(OK_5)
        [record] = self.records
        self.assertEqual(
            (record.version, record.referer, record.user_agent), ("HTTP/1.1", None, None)
        )

    def test_connect(self) -> None:
        """A CONNECT's User-Agent is recorded too (curl and browsers send one)."""
        attempt, _ = self.forward(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\n\r\n"
        )
        attempt.close()
        [record] = self.records
        self.assertEqual((record.method, record.user_agent), ("CONNECT", "curl/8.5.0"))

    def test_refused_request(self) -> None:
        """A request the proxy refuses itself is recorded with its fields."""
        self.proto.dataReceived(
            b"GET http://a.example:25/ HTTP/1.0\r\nHost: a.example\r\nUser-Agent: x\r\n\r\n"
        )
        [record] = self.records
        self.assertEqual((record.status, record.version, record.user_agent), (403, "HTTP/1.0", "x"))


class ExchangeFieldsTests(SynchronousTestCase):
    """L{Exchange.referer} and L{Exchange.user_agent} from field lines or given values."""

    def make(self, **kwargs: Any) -> Exchange:
        """A record with the given extra arguments."""
        return Exchange(
            0.0, "127.0.0.1", None, "GET", "http://a/", 200, 1, 1, 0.0, "direct", None, **kwargs
        )

    def test_several_fields_joined(self) -> None:
        """Repeated fields are joined with ", " in order, as Apache logs them."""
        record = self.make(fields=b"Referer: a\r\nX: y\r\nREFERER: b\r\n")
        self.assertEqual(record.referer, "a, b")

    def test_empty_value(self) -> None:
        """An empty field is an empty string, not a missing one."""
        self.assertEqual(self.make(fields=b"User-Agent:\r\n").user_agent, "")

    def test_bounded(self) -> None:
        """A huge value is cut to MAX_LOGGED_FIELD bytes."""
        record = self.make(fields=b"User-Agent: " + b"u" * 70000 + b"\r\n")
        self.assertEqual(record.user_agent, "u" * MAX_LOGGED_FIELD)

    def test_bytes_kept(self) -> None:
        """UTF-8 is decoded; other bytes survive as surrogates and encode back unchanged."""
        record = self.make(fields=b"Referer: caf\xc3\xa9 \xff\r\n")
        self.assertEqual(record.referer, "caf\u00e9 \udcff")
        assert record.referer is not None
        self.assertEqual(record.referer.encode("utf-8", "surrogateescape"), b"caf\xc3\xa9 \xff")

    def test_given_values_win(self) -> None:
        """Values passed in are kept; fields fill in only what was not given."""
        record = self.make(referer="r", fields=b"Referer: other\r\nUser-Agent: ua\r\n")
        self.assertEqual((record.referer, record.user_agent), ("r", "ua"))
        self.assertEqual(self.make().referer, None)
        self.assertEqual(self.make().version, "HTTP/1.1")
