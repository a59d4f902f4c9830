"""
The seams of the request path (issue #13, item 6), tried with small stand-in stages: a
request answered without any origin (stage A), and bodies observed or changed chunk by
chunk on their way through (stage B), with flow control as without a stage.
"""

from __future__ import annotations

from zope.interface import implementer
from zope.interface.verify import verifyObject

from aproxy.client.factory import ProxyFactory
from aproxy.client.stages import Answer, IBodyFilter, IRequestStage, StageRequest
from aproxy.config import ProxyConfig
from aproxy.http.head import ResponseHead
from tests.support import GET_A, OK_5, ProxyTestCase


@implementer(IBodyFilter)
class Upper:
    """Changes every chunk to upper case, and adds a tail at the end."""

    def __init__(self, tail: bytes = b"") -> None:
        self.seen: list[bytes] = []
        self.tail = tail
        self.ended = False

    def data(self, chunk: bytes) -> bytes:
        """Keep a copy (as a cache would), pass it on changed."""
        self.seen.append(chunk)
        return chunk.upper()

    def end(self) -> bytes:
        """The tail."""
        self.ended = True
        return self.tail


@implementer(IRequestStage)
class Stage:
    """Answers requests for /cached itself; filters what it is told to."""

    name = "test"

    def __init__(self, request_filter: Upper | None = None, response_filter: Upper | None = None):
        self.requests: list[StageRequest] = []
        self.req_filter = request_filter
        self.resp_filter = response_filter

    def answer(self, request: StageRequest) -> Answer | None:
        """Answer /cached."""
        self.requests.append(request)
        if request.target.path == b"/cached":
            return Answer(200, b"OK", ((b"X-Cache", b"HIT"),), b"from the stage")
        return None

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
