"""Every finished request and tunnel is reported once to the factory's observers."""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure

from aproxy.records import Exchange
from tests.test_proxy import GET_A, OK_5, ProxyTestCase


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
