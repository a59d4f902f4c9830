"""
The seams of the request path (issue #13, item 6), tried with small stand-in stages: a
request answered without any origin (stage A), and bodies observed or changed chunk by
chunk on their way through (stage B), with flow control as without a stage.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aproxy.client.factory import ProxyFactory
from aproxy.client.stages import (
    Answer,
    IAnswerBody,
    IAnswerSink,
    IBodyFilter,
    IRequestStage,
    StageRequest,
)
from aproxy.config import ProxyConfig
from aproxy.http.head import ResponseHead
from tests.support import GET_A, OK_5, ProxyTestCase


@implementer(IBodyFilter)
class Upper:
    """Changes every chunk to upper case, and adds a tail at the end."""

    observe_only = False

    def __init__(self, tail: bytes = b"", finish: bool = False) -> None:
        self.seen: list[bytes] = []
        self.tail = tail
        self.ended = False
        self.finish = finish
        self.abandons: list[bool] = []

    def data(self, chunk: bytes) -> bytes:
        """Keep a copy (as a cache would), pass it on changed."""
        self.seen.append(chunk)
        return chunk.upper()

    def end(self) -> bytes:
        """The tail."""
        self.ended = True
        return self.tail

    def abandoned(self, can_finish: bool) -> bool:
        """Note it; ask for the rest when told to."""
        self.abandons.append(can_finish)
        return self.finish


@implementer(IAnswerBody)
class Source:
    """A streamed body the test feeds by hand, noting how the exchange drives it."""

    def __init__(self) -> None:
        self.sink: Any = None
        self.calls: list[str] = []

    def start(self, sink: IAnswerSink) -> None:
        """Remember the sink."""
        self.sink = sink
        self.calls.append("start")

    def pauseProducing(self) -> None:
        """Note it."""
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        """Note it."""
        self.calls.append("resume")

    def stopProducing(self) -> None:
        """Note it."""
        self.calls.append("stop")


@implementer(IRequestStage)
class Stage:
    """Answers requests for /cached itself; filters what it is told to."""

    name = "test"

    def __init__(self, request_filter: Upper | None = None, response_filter: Upper | None = None):
        self.requests: list[StageRequest] = []
        self.req_filter = request_filter
        self.resp_filter = response_filter
        self.later: Deferred[Answer | None] | None = None
        self.cancelled: list[StageRequest] = []
        self.ended: list[StageRequest] = []
        self.source = Source()
        self.replacement: Answer | None = None

    def answer(self, request: StageRequest) -> Answer | Deferred[Answer | None] | None:
        """Answer /cached at once, /later when told, /stream streamed; add to /revalidate."""
        self.requests.append(request)
        path = request.target.path
        if path == b"/cached":
            return Answer(200, b"OK", ((b"X-Cache", b"HIT"),), b"from the stage")
        if path == b"/later":
            self.later = Deferred(lambda d: self.cancelled.append(request))
            return self.later
        if path == b"/stream":
            return Answer(200, b"OK", (), source=self.source, length=6)
        if path == b"/revalidate":
            request.upstream_fields = b'If-None-Match: "v1"\r\n'
            request.upstream_drop = (b"if-modified-since",)
            request.response_fields = b"X-Stage: saw it\r\n"
        return None

    def replace_response(self, request: StageRequest, head: ResponseHead) -> Answer | None:
        """The replacement set, for a 304."""
        return self.replacement if head.status == 304 else None

    def finished(self, request: StageRequest) -> None:
        """Note it."""
        self.ended.append(request)

    def request_filter(self, request: StageRequest) -> Upper | None:
        """The request filter given, if any."""
        return self.req_filter

    def response_filter(self, request: StageRequest, head: ResponseHead) -> Upper | None:
        """The response filter given, if any."""
        return self.resp_filter


class StageTests(ProxyTestCase):
    """Stages installed on the factory."""

    def install(self, stage: Stage) -> None:
        """A factory with C{stage}, and a new client connection to it."""
        self.factory = ProxyFactory(ProxyConfig(), self.clock, self.connector, stages=[stage])
        self.factory.via = b"aproxy"
        self.client, self.proto = self.connect_client()

    def test_stage_is_an_irequeststage(self) -> None:
        """The stand-in provides the interface (so mypy_zope and zope check it)."""
        verifyObject(IRequestStage, Stage())
        verifyObject(IBodyFilter, Upper())

    def test_answer_without_origin(self) -> None:
        """A stage's answer goes to the client; no upstream connection is made."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/cached HTTP/1.1\r\nHost: a\r\n\r\n")
        value = self.client.value()
        self.assertEqual(
            value,
            b"HTTP/1.1 200 OK\r\nX-Cache: HIT\r\nContent-Length: 14\r\nVia: 1.1 aproxy\r\n\r\n"
            b"from the stage",
        )
        self.assertEqual(self.connector.attempts, [])
        self.assertFalse(self.client.disconnecting)
        [request] = stage.requests
        self.assertEqual((request.target.host, request.client), ("a.example", "127.0.0.1"))

    def test_keep_alive_after_answer(self) -> None:
        """After a stage's answer the next request on the connection goes upstream."""
        self.install(Stage())
        self.proto.dataReceived(b"GET http://a.example/cached HTTP/1.1\r\nHost: a\r\n\r\n")
        self.take(self.client)
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))

    def test_policy_before_stages(self) -> None:
        """A refused destination is refused before any stage sees it."""
        stage = Stage()
        self.factory = ProxyFactory(
            ProxyConfig(deny_host=("a.example",)), self.clock, self.connector, stages=[stage]
        )
        self.client, self.proto = self.connect_client()
        self.proto.dataReceived(b"GET http://a.example/cached HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(stage.requests, [])

    def test_response_filter_changes_body_rechunked(self) -> None:
        """A response body passes the filter chunk by chunk and goes back chunked."""
        upper = Upper(tail=b"!")
        self.install(Stage(response_filter=upper))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        attempt.respond(b"world")
        value = self.client.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", value)
        self.assertNotIn(b"Content-Length", value)
        self.assertTrue(value.endswith(b"5\r\nHELLO\r\n5\r\nWORLD\r\n1\r\n!\r\n0\r\n\r\n"), value)
        self.assertEqual(upper.seen, [b"hello", b"world"])
        self.assertTrue(upper.ended)
        self.assertFalse(self.client.disconnecting)

    def test_response_filter_keeps_flow_control(self) -> None:
        """With a filter, a slow client still pauses the origin (producers unchanged)."""
        self.install(Stage(response_filter=Upper()))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        gate = self.client.producer
        assert gate is not None
        gate.pauseProducing()
        self.assertEqual(upstream.producerState, "paused")
        gate.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")

    def test_request_filter_changes_body_rechunked(self) -> None:
        """A request body passes the filter and goes upstream chunked."""
        upper = Upper()
        self.install(Stage(request_filter=upper))
        attempt, upstream = self.forward(
            b"POST http://a.example/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab"
        )
        self.proto.dataReceived(b"cd")
        value = upstream.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", value)
        self.assertNotIn(b"Content-Length", value)
        self.assertTrue(value.endswith(b"2\r\nAB\r\n2\r\nCD\r\n0\r\n\r\n"), value)
        self.assertTrue(upper.ended)

    def test_no_stage_no_change(self) -> None:
        """Without stages the body keeps its framing (the hot path is untouched)."""
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertIn(b"Content-Length: 5\r\n", self.client.value())
        self.assertEqual(self.factory.runtime.stages, ())

    def test_stages_survive_reload(self) -> None:
        """Stages given to the factory are part of every runtime, reloads included."""
        stage = Stage()
        self.install(stage)
        self.factory.reconfigure(ProxyConfig())
        self.assertEqual(self.factory.runtime.stages, (stage,))


class StageSeamTests(ProxyTestCase):
    """What the cache builds on: late and streamed answers, fields, replaced responses."""

    def install(self, stage: Stage) -> None:
        """A factory with C{stage}, and a new client connection to it."""
        self.factory = ProxyFactory(ProxyConfig(), self.clock, self.connector, stages=[stage])
        self.factory.via = b"aproxy"
        self.client, self.proto = self.connect_client()

    def test_later_answer_waits_with_client_paused(self) -> None:
        """A Deferred answer holds the request (client paused) and is sent when it fires."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/later HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.client.producerState, "paused")
        assert stage.later is not None
        stage.later.callback(Answer(203, b"Late", (), b"ok"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 203 Late\r\n"))
        self.assertTrue(self.client.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.connector.attempts, [])

    def test_later_none_goes_upstream(self) -> None:
        """A Deferred that fires None lets the request go to the origin."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/later HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.connector.attempts, [])
        assert stage.later is not None
        stage.later.callback(None)
        [attempt] = self.connector.attempts
        upstream = attempt.succeed()
        self.assertTrue(upstream.value().startswith(b"GET /later HTTP/1.1\r\n"))

    def test_later_cancelled_when_client_leaves(self) -> None:
        """A client that leaves while a stage's answer is pending cancels it."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/later HTTP/1.1\r\nHost: a\r\n\r\n")
        self.proto.connectionLost()
        self.assertEqual(stage.cancelled, stage.requests)
        self.assertEqual(stage.ended, stage.requests)

    def test_later_answer_times_out_504(self) -> None:
        """A stage that never answers is bounded by the read timeout: 504."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/later HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(ProxyConfig().read_timeout + 1)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 504 "), self.client.value())

    def test_streamed_answer_follows_client_pace(self) -> None:
        """A streamed body is the client's producer, framed by its length; keep-alive after."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        source = stage.source
        self.assertEqual(source.calls, ["start"])
        self.assertIn(b"Content-Length: 6\r\n", self.client.value())
        gate = self.client.producer
        assert gate is not None
        gate.pauseProducing()
        gate.resumeProducing()
        self.assertEqual(source.calls, ["start", "pause", "resume"])
        source.sink.answer_data(b"abc")
        source.sink.answer_data(b"def")
        self.assertTrue(self.client.value().endswith(b"\r\n\r\nabcdef"))
        source.sink.answer_done()
        self.assertFalse(self.client.disconnecting)
        self.take(self.client)
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))
        self.assertEqual(len(stage.ended), 2)

    def test_streamed_answer_stopped_when_client_leaves(self) -> None:
        """A client that leaves mid-answer stops the source (it releases what it holds)."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        self.proto.connectionLost()
        self.assertEqual(stage.source.calls, ["start", "stop"])

    def test_streamed_answer_failure_cuts_short(self) -> None:
        """A source that can't complete closes the client connection (it sees truncation)."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"GET http://a.example/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        stage.source.sink.answer_data(b"ab")
        stage.source.sink.answer_failed("the stored object is gone")
        self.assertTrue(self.client.disconnecting)

    def test_head_gets_head_only(self) -> None:
        """A HEAD answered by a stage gets the head with the body's length, no body."""
        stage = Stage()
        self.install(stage)
        self.proto.dataReceived(b"HEAD http://a.example/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.endswith(b"Content-Length: 6\r\nVia: 1.1 aproxy\r\n\r\n"), value)
        self.assertEqual(stage.source.calls, ["stop"])
        self.assertFalse(self.client.disconnecting)

    def test_fields_added_and_dropped_upstream(self) -> None:
        """A stage's fields go upstream (its dropped ones don't) and back to the client."""
        self.install(Stage())
        attempt, upstream = self.forward(
            b"GET http://a.example/revalidate HTTP/1.1\r\nHost: a\r\n"
            b"If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n\r\n"
        )
        sent = upstream.value()
        self.assertIn(b'If-None-Match: "v1"\r\n', sent)
        self.assertNotIn(b"If-Modified-Since", sent)
        attempt.respond(OK_5)
        self.assertIn(b"X-Stage: saw it\r\n", self.client.value())

    def test_304_replaced_and_connection_pooled(self) -> None:
        """A response a stage replaces is not relayed; its bodiless connection is reused."""
        stage = Stage()
        stage.replacement = Answer(200, b"OK", ((b"X-From", b"store"),), b"stored")
        self.install(stage)
        attempt, upstream = self.forward(
            b"GET http://a.example/revalidate HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        attempt.respond(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\nX-From: store\r\n"), value)
        self.assertTrue(value.endswith(b"stored"))
        self.assertNotIn(b"304", value)
        self.assertFalse(upstream.disconnecting)
        self.assertEqual(len(self.factory.pool), 1)

    def test_abandoned_filter_drains_rest(self) -> None:
        """A filter that asks for the rest when its client leaves gets it, then end()."""
        upper = Upper(finish=True)
        self.install(Stage(response_filter=upper))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.proto.connectionLost()
        self.assertEqual(upper.abandons, [True])
        self.assertFalse(upstream.disconnecting)
        attempt.respond(b"world")
        self.assertEqual(upper.seen, [b"hello", b"world"])
        self.assertTrue(upper.ended)
        self.assertTrue(upstream.disconnecting)

    def test_abandoned_filter_declines(self) -> None:
        """A filter that declines is told once, and the origin connection is dropped."""
        upper = Upper()
        self.install(Stage(response_filter=upper))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.proto.connectionLost()
        self.assertEqual(upper.abandons, [True])
        self.assertFalse(upper.ended)
        self.assertTrue(upstream.disconnecting)

    def test_drain_gives_up_after_read_timeout(self) -> None:
        """A drained origin that goes quiet is given up after the read timeout."""
        upper = Upper(finish=True)
        self.install(Stage(response_filter=upper))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.proto.connectionLost()
        self.clock.advance(ProxyConfig().read_timeout + 1)
        self.assertEqual(upper.abandons, [True, False])
        self.assertFalse(upper.ended)
        self.assertTrue(upstream.disconnecting)

    def test_origin_failure_abandons_filter(self) -> None:
        """An origin that closes mid-body: the filter is told it can't finish."""
        upper = Upper(finish=True)
        self.install(Stage(response_filter=upper))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        attempt.close()
        self.assertEqual(upper.abandons, [False])
        self.assertFalse(upper.ended)
