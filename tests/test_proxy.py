"""
Protocol tests for L{aproxy.client.protocol}: a L{ProxyProtocol} on a L{StringTransport}, origins
completed by hand through a recording connector, and time on a L{MemoryReactorClock}.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig
from aproxy.testing import HalfCloseTransport
from aproxy.upstream.protocol import UpstreamProtocol
from tests.fakes import BufferingTransport
from tests.support import GET_A, GET_B, OK_5, ProxyTestCase


class ForwardingTests(ProxyTestCase):
    """Requests are forwarded in origin form and responses relayed."""

    def test_get_forwarded_in_origin_form(self) -> None:
        """An absolute-form GET reaches the origin in origin form with Host and Via."""
        attempt, upstream = self.forward()
        self.assertEqual((attempt.host, attempt.port), ("a.example", 80))
        self.assertEqual(
            upstream.value(),
            b"GET /x?y=%20 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\nVia: 1.1 aproxy\r\n\r\n",
        )

    def test_response_relayed_with_via(self) -> None:
        """The origin's response reaches the client with the proxy's Via appended."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 aproxy\r\n\r\nhello",
        )
        self.assertFalse(self.client.disconnecting)

    def test_no_via(self) -> None:
        """With via=None no Via field is added in either direction."""
        self.factory = ProxyFactory(ProxyConfig(via=None), self.clock, self.connector)
        self.client, self.proto = self.connect_client()
        attempt, upstream = self.forward()
        attempt.respond(OK_5)
        self.assertNotIn(b"Via", upstream.value())
        self.assertNotIn(b"Via", self.client.value())

    def test_client_paused_while_dialing(self) -> None:
        """The client transport is paused until the origin connection is made."""
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.client.producerState, "paused")
        self.connector.attempts[0].succeed()
        self.assertEqual(self.client.producerState, "producing")

    def test_transports_are_each_others_producers(self) -> None:
        """
        While a request is in flight each transport pauses the other: the upstream one
        through the client's output gate, which stays registered between requests.
        """
        attempt, upstream = self.forward()
        gate = self.client.producer
        assert gate is not None
        self.assertTrue(self.client.streaming)
        gate.pauseProducing()
        self.assertEqual(upstream.producerState, "paused")
        gate.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")
        assert upstream.producer is not None
        upstream.producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        upstream.producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")
        attempt.respond(OK_5)
        self.assertIs(self.client.producer, gate)
        self.assertIsNone(upstream.producer)
        gate.pauseProducing()
        self.assertEqual(upstream.producerState, "producing")

    def test_connection_reused_for_same_origin(self) -> None:
        """After a complete response the upstream connection serves the next request."""
        attempt, upstream = self.forward()
        attempt.respond(OK_5)
        upstream.clear()
        self.proto.dataReceived(GET_A)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertTrue(upstream.value().startswith(b"GET /x?y=%20 HTTP/1.1\r\n"))
        self.assertEqual(self.factory.pool.reused, 1)

    def test_pool_shared_between_clients(self) -> None:
        """A second client connection reuses the idle upstream connection of the first."""
        attempt, upstream = self.forward()
        attempt.respond(OK_5)
        client2, proto2 = self.connect_client()
        proto2.dataReceived(GET_A)
        self.assertEqual(len(self.connector.attempts), 1)
        attempt.respond(OK_5)
        self.assertTrue(client2.value().endswith(b"hello"))

    def test_origins_a_b_a_routed_each_by_target(self) -> None:
        """On one keep-alive client connection, requests to A, B, A reach A, B, A."""
        a, _ = self.forward(GET_A)
        a.respond(OK_5)
        b, b_transport = self.forward(GET_B)
        self.assertEqual((b.host, b.port), ("b.example", 8080))
        self.assertIn(b"Host: b.example:8080\r\n", b_transport.value())
        b.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
        self.take(a.transport)  # type: ignore[arg-type]
        self.proto.dataReceived(GET_A)
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertIn(b"Host: a.example\r\n", a.transport.value())  # type: ignore[union-attr]

    def test_not_reused_when_origin_closes(self) -> None:
        """An origin's Connection: close keeps its connection out of the pool."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(upstream.disconnecting)
        self.assertNotIn(b"Connection: close", self.client.value())
        self.assertEqual(len(self.factory.pool), 0)

    def test_pipelined_requests_answered_in_order(self) -> None:
        """A second pipelined request is held until the first response is complete."""
        self.proto.dataReceived(GET_A + GET_B)
        self.assertEqual(len(self.connector.attempts), 1)
        a = self.connector.attempts[0]
        a.succeed()
        a.respond(OK_5)
        self.assertEqual(len(self.connector.attempts), 2)
        b = self.connector.attempts[1]
        b.succeed()
        b.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
        value = self.client.value()
        self.assertLess(value.index(b"hello"), value.index(b"\r\n\r\nB"))

    def test_http10_client_keep_alive(self) -> None:
        """An HTTP/1.0 client asking for keep-alive gets it, with Connection: keep-alive."""
        attempt, upstream = self.forward(
            b"GET http://a.example/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        self.assertIn(b"Via: 1.0 aproxy", upstream.value())
        attempt.respond(OK_5)
        self.assertIn(b"Connection: keep-alive\r\n", self.client.value())
        self.assertFalse(self.client.disconnecting)

    def test_http10_client_closed_by_default(self) -> None:
        """An HTTP/1.0 client without keep-alive is answered and closed."""
        attempt, _ = self.forward(b"GET http://a.example/ HTTP/1.0\r\n\r\n")
        attempt.respond(OK_5)
        self.assertIn(b"Connection: close\r\n", self.client.value())
        self.assertTrue(self.client.disconnecting)

    def test_half_close_after_request_still_answered(self) -> None:
        """A client that half-closes after its request gets the response, then a close."""
        attempt, _ = self.forward()
        self.proto.readConnectionLost()
        self.assertFalse(self.client.disconnecting)
        attempt.respond(OK_5)
        value = self.client.value()
        self.assertIn(b"Connection: close\r\n", value)
        self.assertTrue(value.endswith(b"hello"))
        self.assertTrue(self.client.disconnecting)

    def test_half_close_mid_body_is_400(self) -> None:
        """A client that half-closes before its request body is complete gets 400."""
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nab"
        )
        self.proto.readConnectionLost()
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(upstream.disconnecting)

    def test_half_close_when_idle_closes(self) -> None:
        """A client that half-closes between requests is closed."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.proto.readConnectionLost()
        self.assertTrue(self.client.disconnecting)

    def test_connection_close_honoured(self) -> None:
        """A client's Connection: close closes the client connection after the response."""
        attempt, upstream = self.forward(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        self.assertNotIn(b"Connection", upstream.value())
        attempt.respond(OK_5)
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(upstream.disconnecting)


class BodyTests(ProxyTestCase):
    """Bodies stream and are re-framed."""

    def test_content_length_body_streamed(self) -> None:
        """A request body is forwarded as it arrives, not accumulated."""
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234"
        )
        self.assertTrue(
            upstream.value().endswith(b"Content-Length: 10\r\nVia: 1.1 aproxy\r\n\r\n01234")
        )
        upstream.clear()
        self.proto.dataReceived(b"56789")
        self.assertEqual(upstream.value(), b"56789")

    def test_chunked_request_reframed(self) -> None:
        """A chunked request body is validated and re-emitted, extensions dropped."""
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.take(upstream)
        self.proto.dataReceived(b"3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
        self.assertEqual(upstream.value(), b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")

    def test_bad_chunk_in_request_gets_400(self) -> None:
        """A malformed chunk size in a request body gets 400 and closes both sides."""
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.proto.dataReceived(b"zz\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(upstream.disconnecting)

    def test_until_close_response_chunked_to_http11(self) -> None:
        """A close-delimited response goes to an HTTP/1.1 client chunked; keep-alive stays."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\n\r\nabc")
        attempt.close()
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVia: 1.1 aproxy\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
        )
        self.assertFalse(self.client.disconnecting)

    def test_until_close_response_to_http10_closes(self) -> None:
        """A close-delimited response goes to an HTTP/1.0 client delimited by close."""
        attempt, _ = self.forward(
            b"GET http://a.example/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        )
        attempt.respond(b"HTTP/1.1 200 OK\r\n\r\nabc")
        attempt.close()
        self.assertTrue(self.client.value().endswith(b"Connection: close\r\n\r\nabc"))
        self.assertTrue(self.client.disconnecting)

    def test_chunked_response_with_trailers(self) -> None:
        """A chunked response is re-framed and its trailers passed on."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n")
        attempt.respond(b"2\r\nhi\r\n0\r\nX: y\r\n\r\n")
        value = self.client.value()
        self.assertNotIn(b"Trailer:", value)
        self.assertTrue(value.endswith(b"\r\n\r\n2\r\nhi\r\n0\r\nX: y\r\n\r\n"))
        self.assertEqual(len(self.factory.pool), 1)

    def test_chunked_response_to_http10_dechunked(self) -> None:
        """A chunked response reaches an HTTP/1.0 client as plain bytes, then a close."""
        attempt, _ = self.forward(b"GET http://a.example/ HTTP/1.0\r\n\r\n")
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        value = self.client.value()
        self.assertNotIn(b"Transfer-Encoding", value)
        self.assertTrue(value.endswith(b"\r\n\r\nhi"))
        self.assertTrue(self.client.disconnecting)

    def test_large_body_read_in_bulk(self) -> None:
        """A large response body is read with the bulk read size, reset when pooled."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n")
        self.assertEqual(upstream.bufferSize, 1 << 18)
        attempt.respond(b"x" * 2000000)
        self.assertEqual(len(self.factory.pool), 1)
        self.assertEqual(upstream.bufferSize, 1 << 16)

    def test_large_request_body_read_in_bulk(self) -> None:
        """A large or chunked request body is read in bulk; the next head is not."""
        _, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n"
        )
        self.assertEqual(self.client.bufferSize, 1 << 18)
        self.proto.dataReceived(b"x" * 1999999)
        self.assertEqual(self.client.bufferSize, 1 << 18)
        self.proto.dataReceived(b"x")
        self.assertEqual(self.client.bufferSize, 1 << 16)
        client, proto = self.connect_client()
        proto.dataReceived(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertEqual(client.bufferSize, 1 << 18)
        self.connector.attempts[-1].succeed()
        proto.dataReceived(b"2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual(client.bufferSize, 1 << 16)
        client, proto = self.connect_client()
        proto.dataReceived(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertEqual(client.bufferSize, 1 << 16)

    def test_head_response_has_no_body(self) -> None:
        """A HEAD response keeps its Content-Length but carries no body."""
        attempt, _ = self.forward(b"HEAD http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertTrue(
            self.client.value().endswith(b"Content-Length: 100\r\nVia: 1.1 aproxy\r\n\r\n")
        )
        self.assertEqual(len(self.factory.pool), 1)

    def test_204_and_304_have_no_body(self) -> None:
        """204 and 304 responses end at their head whatever the headers say."""
        attempt, _ = self.forward()
        for status in (b"204 No Content", b"304 Not Modified"):
            attempt.respond(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.assertTrue(self.take(self.client).endswith(b"Via: 1.1 aproxy\r\n\r\n"))
            self.proto.dataReceived(GET_A)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_interim_relayed_to_http11_only(self) -> None:
        """A 100 Continue is relayed to an HTTP/1.1 client and dropped for HTTP/1.0."""
        attempt, _ = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\n\r\n"
        )
        attempt.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(
            self.take(self.client), b"HTTP/1.1 100 Continue\r\nVia: 1.1 aproxy\r\n\r\n"
        )
        self.proto.dataReceived(b"ok")
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))
        client, proto = self.connect_client()
        proto.dataReceived(b"GET http://c.example/ HTTP/1.0\r\n\r\n")
        c = self.connector.attempts[-1]
        c.succeed()
        c.respond(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK_5)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"))

    def test_interim_burst_in_one_read(self) -> None:
        """
        Thirty 103s and a 200 in one read are all relayed in order (a loop, not a
        recursion per head).
        """
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 30 + OK_5)
        value = self.client.value()
        self.assertEqual(value.count(b"HTTP/1.1 103 Early Hints\r\n"), 30)
        self.assertTrue(value.endswith(b"hello"))
        self.assertFalse(self.client.disconnecting)

    def test_too_many_interim_responses_502(self) -> None:
        """
        600 interim responses in one read: the client gets 32 of them, then a 502 and a
        close, with one log line and no exception.
        """
        events = self.capture_log()
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\n\r\n"
        )
        attempt.respond(b"HTTP/1.1 100 Continue\r\n\r\n" * 600 + OK_5)
        value = self.client.value()
        self.assertEqual(value.count(b"HTTP/1.1 100 Continue\r\n"), 32)
        self.assertIn(b"HTTP/1.1 502 ", value)
        self.assertIn(b"interim", value)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(len(events), 1)
        self.assertNotIn("log_failure", events[0])

    def test_early_response_closes_client(self) -> None:
        """A final response before the request body is complete closes the connection."""
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab"
        )
        attempt.respond(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"Connection: close\r\n", self.client.value())
        self.proto.dataReceived(b"cd")
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(upstream.disconnecting)

    def test_extra_bytes_after_response_not_pooled(self) -> None:
        """An origin that sends bytes after a complete response is not reused."""
        attempt, upstream = self.forward()
        attempt.respond(OK_5 + b"junk")
        self.assertEqual(len(self.factory.pool), 0)
        self.assertTrue(upstream.disconnecting)


class ErrorTests(ProxyTestCase):
    """Failures become short text/plain responses with Proxy-Status."""

    def test_connect_timeout_sends_504(self) -> None:
        """If the origin never answers the dial, the client gets 504 after the timeout."""
        self.proto.dataReceived(GET_A)
        self.clock.advance(self.config.connect_timeout)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 504 "))
        self.assertIn(
            b'Proxy-Status: aproxy; error=connection_timeout; details="a.example:80"', value
        )
        self.assertTrue(self.client.disconnecting)

    def test_refused_sends_502_naming_host(self) -> None:
        """A refused connection gets 502 naming host:port."""
        self.proto.dataReceived(GET_A)
        self.connector.attempts[0].deferred.errback(Failure(error.ConnectionRefusedError()))
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"error=connection_refused", value)
        self.assertTrue(value.endswith(b"connection to a.example:80 refused\n"))

    def test_dns_failure_sends_502(self) -> None:
        """An unresolvable host gets 502 with error=dns_error."""
        self.proto.dataReceived(GET_A)
        self.connector.attempts[0].deferred.errback(Failure(error.DNSLookupError("a.example")))
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"error=dns_error", value)
        self.assertIn(b"a.example", value)

    def test_endpoint_timeout_sends_504(self) -> None:
        """An endpoint's own connect timeout also gets 504."""
        self.proto.dataReceived(GET_A)
        self.connector.attempts[0].deferred.errback(Failure(error.TimeoutError()))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 504 "))

    def test_read_timeout_sends_504(self) -> None:
        """No response head within the read timeout gets 504 and closes the origin."""
        attempt, upstream = self.forward()
        self.clock.advance(self.config.read_timeout - 1)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(1)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 504 "))
        self.assertIn(b"error=http_response_timeout", self.client.value())
        self.assertTrue(upstream.disconnecting)

    def test_read_timeout_between_body_bytes(self) -> None:
        """Activity moves the read deadline; silence mid-body closes the client."""
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        self.clock.advance(self.config.read_timeout - 1)
        attempt.respond(b"cd")
        self.clock.advance(self.config.read_timeout - 1)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.client.value().endswith(b"abcd"))

    def test_header_timeout_sends_408(self) -> None:
        """A request head not finished within the header timeout gets 408 and a close."""
        self.proto.dataReceived(b"GET http://a.example/ HTTP/1.1\r\nHo")
        self.clock.advance(self.config.header_timeout)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(self.client.disconnecting)

    def test_silent_client_closed_after_header_timeout(self) -> None:
        """A new client that sends nothing is closed quietly after the header timeout."""
        self.clock.advance(self.config.header_timeout)
        self.assertEqual(self.client.value(), b"")
        self.assertTrue(self.client.disconnecting)

    def test_idle_timeout_closes_keep_alive_client(self) -> None:
        """An idle keep-alive client is closed after the idle timeout, not before."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.clock.advance(self.config.idle_timeout - 1)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnecting)

    def test_malformed_response_sends_502(self) -> None:
        """A response that is not HTTP gets 502 and the origin connection is closed."""
        attempt, upstream = self.forward()
        attempt.respond(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"error=http_protocol_error", self.client.value())
        self.assertTrue(upstream.disconnecting)

    def test_response_with_cl_and_te_sends_502(self) -> None:
        """A response with both Content-Length and Transfer-Encoding gets 502."""
        attempt, _ = self.forward()
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))

    def test_truncated_response_closes_client(self) -> None:
        """An origin that closes mid-body makes the proxy close the client connection."""
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        attempt.close()
        self.assertTrue(self.client.value().endswith(b"abc"))
        self.assertTrue(self.client.disconnecting)

    def test_bad_chunk_in_response_closes_client(self) -> None:
        """A malformed chunk after the response head started closes the client."""
        attempt, _ = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(self.client.disconnecting)

    def test_origin_closes_without_response(self) -> None:
        """An origin that closes before answering a fresh connection gets 502."""
        attempt, _ = self.forward()
        attempt.close()
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"error=connection_terminated", self.client.value())

    def test_dead_pooled_connection_retried_once(self) -> None:
        """A pooled connection found closed before any response byte is retried fresh."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.take(self.client)
        self.proto.dataReceived(GET_A)
        attempt.close()
        self.assertEqual(len(self.connector.attempts), 2)
        retry = self.connector.attempts[1]
        upstream = retry.succeed()
        self.assertTrue(upstream.value().startswith(b"GET /x?y=%20 HTTP/1.1"))
        retry.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))

    def test_post_with_body_not_retried(self) -> None:
        """A request whose body was sent is not replayed on a fresh connection."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.take(self.client)
        self.proto.dataReceived(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        )
        attempt.close()
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))

    def test_parse_error_closes_with_400(self) -> None:
        """A malformed request gets 400, Connection: close, and the connection closes."""
        self.proto.dataReceived(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b"Connection: close\r\n", value)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.connector.attempts, [])

    def test_origin_form_explains_forward_proxy(self) -> None:
        """An origin-form request gets 400 explaining that this is a forward proxy."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"forward proxy", self.client.value())

    def test_https_target_dials_tls(self) -> None:
        """
        An https:// target is dialled on port 443 with a TLS layer around the upstream
        protocol, and nothing is sent before that TLS connection is ready.
        """
        self.proto.dataReceived(b"GET https://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n")
        [attempt] = self.connector.attempts
        self.assertEqual((attempt.host, attempt.port), ("a.example", 443))
        layer = attempt.factory.buildProtocol(None)
        assert isinstance(layer, TLSMemoryBIOProtocol)
        self.assertIsInstance(layer.wrappedProtocol, UpstreamProtocol)
        self.assertEqual(self.client.value(), b"")

    def test_client_gone_aborts_upstream(self) -> None:
        """A client that disconnects mid-request takes its upstream connection with it."""
        attempt, upstream = self.forward()
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(upstream.disconnecting)
        self.assertEqual(len(self.factory.pool), 0)

    def test_client_gone_while_dialing(self) -> None:
        """A client that disconnects while the origin is being dialed cancels the dial."""
        self.proto.dataReceived(GET_A)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.connector.attempts[0].deferred.called)


class ForwardedForTests(ProxyTestCase):
    """--x-forwarded-for strip removes every spelling, in the head and in trailers."""

    config = ProxyConfig(x_forwarded_for="strip")

    def test_underscore_spellings_stripped(self) -> None:
        """X-Forwarded_For and friends (the same CGI/WSGI variable) are removed too."""
        _, upstream = self.forward(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n"
            b"X-Forwarded_For: 2.2.2.2\r\nX_Forwarded_For: 3.3.3.3\r\n"
            b"x_forwarded-for: 4.4.4.4\r\nX-Kept: 5\r\n\r\n"
        )
        value = upstream.value()
        for address in (b"1.1.1.1", b"2.2.2.2", b"3.3.3.3", b"4.4.4.4"):
            self.assertNotIn(address, value)
        self.assertIn(b"X-Kept: 5\r\n", value)

    def test_trailer_stripped(self) -> None:
        """An X-Forwarded-For sent as a chunked trailer is removed; other trailers stay."""
        _, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded_For: 2.2.2.2\r\n"
            b"X-Sum: 7\r\n\r\n"
        )
        value = upstream.value()
        self.assertNotIn(b"1.1.1.1", value)
        self.assertNotIn(b"2.2.2.2", value)
        self.assertTrue(value.endswith(b"2\r\nhi\r\n0\r\nX-Sum: 7\r\n\r\n"), value)

    def test_trailer_kept_without_strip(self) -> None:
        """Without strip, a trailer X-Forwarded-For is passed on as received."""
        self.factory = ProxyFactory(ProxyConfig(), self.clock, self.connector)
        self.client, self.proto = self.connect_client()
        _, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n"
        )
        self.assertIn(b"X-Forwarded-For: 1.1.1.1\r\n", upstream.value())


class WebSocketSchemeTests(ProxyTestCase):
    """aiohttp's ws:// request to a proxy is served as http:// with its Upgrade."""

    def test_ws_target_upgraded(self) -> None:
        """GET ws://host/path with Upgrade: websocket reaches host:80 and may switch."""
        attempt, upstream = self.forward(
            b"GET ws://a.example/chat HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        self.assertEqual((attempt.host, attempt.port), ("a.example", 80))
        value = upstream.value()
        self.assertTrue(value.startswith(b"GET /chat HTTP/1.1\r\n"), value)
        self.assertIn(b"Upgrade: websocket\r\n", value)
        attempt.respond(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 101 "))
        self.assertTrue(self.proto.is_tunnel)


class ClosingTests(ProxyTestCase):
    """A connection the proxy closes goes for good (issue #12, item 4)."""

    def test_close_after_dial_failure_reads_again(self) -> None:
        """
        A 502 for a refused origin, sent while the client was paused for the dial,
        resumes reading before closing: a TLS transport must read the client's
        close_notify (or close) to finish closing.
        """
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.client.producerState, "paused")
        self.connector.attempts[0].deferred.errback(Failure(error.ConnectionRefusedError()))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.producerState, "producing")
        self.assertIsNone(self.client.producer)

    def test_client_that_never_closes_is_aborted(self) -> None:
        """
        A closed connection whose client neither reads the rest nor closes is aborted
        after the idle timeout, and the timer goes with the connection.
        """
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(self.client.disconnecting)
        self.clock.advance(self.config.idle_timeout - 1)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_linger_timer_cancelled_when_client_closes(self) -> None:
        """A client that closes in time leaves no timer behind."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowReaderTests(ProxyTestCase):
    """
    A client that pipelines requests and doesn't read the answers costs a bounded amount
    of memory: no next request starts while its answers back up (issue #12, item 1).
    """

    def connect_client(self) -> tuple[HalfCloseTransport, ProxyProtocol]:
        """A client connection whose transport buffers like TCP, pausing at 4 KiB."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = BufferingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        client.bufferSize = 4096
        proto.makeConnection(client)
        return client, proto

    def test_next_request_waits_until_answers_are_read(self) -> None:
        """
        A pipelined request is not sent upstream while the client's write buffer is over
        its size, and is sent once the client read what waited.
        """
        client = self.client
        assert isinstance(client, BufferingTransport)
        attempt, upstream = self.forward(GET_A + GET_A)
        big = b"HTTP/1.1 200 OK\r\nContent-Length: 8000\r\n\r\n" + b"x" * 8000
        attempt.respond(big)
        self.assertTrue(client.paused_producer)
        self.assertEqual(upstream.value().count(b"GET /x"), 1)
        self.assertEqual(client.producerState, "paused")
        client.drain()
        self.assertEqual(upstream.value().count(b"GET /x"), 2)
        self.assertEqual(client.producerState, "producing")
        attempt.respond(OK_5)
        self.assertTrue(client.value().endswith(b"hello"))
        self.assertFalse(client.disconnecting)

    def test_origin_paused_while_client_does_not_read(self) -> None:
        """The origin in flight is paused while the client's write buffer is full."""
        client = self.client
        assert isinstance(client, BufferingTransport)
        attempt, upstream = self.forward()
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"x" * 5000)
        self.assertEqual(upstream.producerState, "paused")
        client.drain()
        self.assertEqual(upstream.producerState, "producing")

    def test_local_answers_stop_when_client_does_not_read(self) -> None:
        """
        Locally answered pipelined requests stop being answered (and the client stops
        being read) once the answers back up; all are answered as the client reads.
        """
        client = self.client
        assert isinstance(client, BufferingTransport)
        request = b"OPTIONS http://a.example/ HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n"
        self.proto.dataReceived(request * 500)
        written = client.value()
        answer = written[: written.index(b"\r\n\r\n") + 4]
        self.assertLessEqual(len(written), client.bufferSize + len(answer))
        self.assertLess(written.count(b"HTTP/1.1 200 OK"), 500)
        self.assertEqual(client.producerState, "paused")
        answered = 0
        for _ in range(500):
            answered += client.drain().count(b"HTTP/1.1 200 OK")
            if answered == 500:
                break
        self.assertEqual(answered, 500)
        self.assertEqual(client.producerState, "producing")

    def test_waiting_client_closed_after_idle_timeout(self) -> None:
        """A client that reads none of its answers is closed after the idle timeout."""
        attempt, upstream = self.forward(GET_A + GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 8000\r\n\r\n" + b"x" * 8000)
        self.clock.advance(self.config.idle_timeout)
        self.assertTrue(self.client.disconnecting)
        self.assertIsNone(self.client.producer)
        # The second request was never started, so it has no answer (no 504).
        self.assertEqual(upstream.value().count(b"GET /x"), 1)
        self.assertNotIn(b" 504 ", self.client.value())


class MaxForwardsTests(ProxyTestCase):
    """Max-Forwards is honoured for OPTIONS and TRACE (RFC 9110 section 7.6.2)."""

    def test_trace_zero_answered_locally(self) -> None:
        """TRACE with Max-Forwards: 0 is answered by the proxy, echoing the head."""
        self.proto.dataReceived(
            b"TRACE http://a.example/ HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n"
            b"Cookie: secret\r\n\r\n"
        )
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\n"))
        self.assertIn(b"TRACE http://a.example/ HTTP/1.1\r\nHost: a\r\n", value)
        self.assertNotIn(b"secret", value)
        self.assertEqual(self.connector.attempts, [])
        self.assertFalse(self.client.disconnecting)

    def test_options_decremented(self) -> None:
        """OPTIONS with Max-Forwards: 3 is forwarded with Max-Forwards: 2."""
        attempt, upstream = self.forward(
            b"OPTIONS http://a.example HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\n\r\n"
        )
        value = upstream.value()
        self.assertTrue(value.startswith(b"OPTIONS * HTTP/1.1\r\n"))
        self.assertIn(b"Max-Forwards: 2\r\n", value)
        self.assertNotIn(b"Max-Forwards: 3", value)

    def test_many_local_answers_pipelined(self) -> None:
        """Thousands of pipelined locally answered requests don't exhaust the stack."""
        request = b"OPTIONS http://a.example/ HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n"
        self.proto.dataReceived(request * 1500)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 200 OK"), 1500)
