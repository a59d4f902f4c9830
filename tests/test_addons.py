"""
The addon API (issue #16): every hook on an in-memory proxy (a fake clock and connector):
edits, refusals, answers, parents, async hooks and their timeout, failures, body
transformers on Content-Length and chunked bodies, flow control, and the notification
hooks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SkipTest

from aproxy.addons.api import AddonExchange, Fields, RequestView
from aproxy.addons.bodies import Replace
from aproxy.client.factory import ProxyFactory
from aproxy.client.stages import Answer, answer_bytes
from aproxy.config import ProxyConfig
from tests.support import GET_A, OK_5, ProxyTestCase

POST_A = b"POST http://a.example/p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\n\r\n"


class Hooks:
    """An addon whose hooks are the callables it is given, recording each call."""

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        self.calls: list[str] = []
        for name, hook in hooks.items():
            setattr(self, name, self._recording(name, hook))

    def _recording(self, name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return hook(*args)

        return call


class Upper:
    """A transformer: upper case, and a tail at the end."""

    def __init__(self, tail: bytes = b"") -> None:
        self.tail = tail
        self.fed: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        self.fed.append(chunk)
        return chunk.upper()

    def end(self) -> bytes:
        return self.tail


class AddonTestCase(ProxyTestCase):
    """A factory with the addons a test installs."""

    def install(self, *addons: Any, **config: Any) -> None:
        """A factory with C{addons}, and a new client connection to it."""
        self.factory = ProxyFactory(
            ProxyConfig(**config), self.clock, self.connector, addons=list(addons)
        )
        self.factory.via = b"aproxy"
        self.client, self.proto = self.connect_client()


class RequestHookTests(AddonTestCase):
    """The request hook: edits, refusals, answers, a chosen parent."""

    def test_no_addon_no_hooks(self) -> None:
        """Without addons the runtime has none, and nothing changes."""
        self.assertIsNone(self.factory.runtime.addons)
        attempt, upstream = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertIn(b"Content-Length: 5\r\n", self.client.value())

    def test_edit_request_fields(self) -> None:
        """Fields a request hook sets, adds and removes are what the origin gets."""
        seen: list[AddonExchange] = []

        def request(ex: AddonExchange) -> None:
            seen.append(ex)
            ex.request.fields.set("X-Added", "1")
            ex.request.fields.remove("User-Agent")

        self.install(Hooks(request=request))
        attempt, upstream = self.forward(GET_A)
        sent = upstream.value()
        self.assertIn(b"X-Added: 1\r\n", sent)
        self.assertNotIn(b"User-Agent", sent)
        [ex] = seen
        self.assertEqual(
            (ex.request.method, ex.request.host, ex.request.port, ex.client),
            ("GET", "a.example", 80, "127.0.0.1"),
        )
        self.assertEqual(ex.request.target, "http://a.example/x?y=%20")

    def test_framing_fields_are_locked(self) -> None:
        """Changing a framing field is an addon failure: 500 naming it, no upstream."""

        def request(ex: AddonExchange) -> None:
            ex.request.fields.set("Content-Length", "100")

        self.install(Hooks(request=request))
        events = self.capture_log()
        self.proto.dataReceived(GET_A)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 500 "), value)
        self.assertIn(b'details="addon Hooks"', value)
        self.assertEqual(self.connector.attempts, [])
        self.assertTrue(any("addon" in str(e.get("log_format")) for e in events))
        self.flushLoggedErrors(ValueError)

    def test_bad_field_value_refused(self) -> None:
        """A value with CR LF can't be set (no header injection through an addon)."""
        errors: list[Exception] = []

        def request(ex: AddonExchange) -> None:
            try:
                ex.request.fields.set("X-A", "1\r\nX-B: 2")
            except ValueError as e:
                errors.append(e)

        self.install(Hooks(request=request))
        attempt, upstream = self.forward(GET_A)
        self.assertEqual(len(errors), 1)
        self.assertNotIn(b"X-B", upstream.value())

    def test_deny(self) -> None:
        """A refusal is a 403 naming the addon, and the connection stays usable."""
        self.install(Hooks(request=lambda ex: ex.deny()))
        self.proto.dataReceived(GET_A)
        value = self.take(self.client)
        self.assertTrue(value.startswith(b"HTTP/1.1 403 Forbidden\r\n"), value)
        self.assertIn(
            b'Proxy-Status: aproxy; error=http_request_denied; details="addon Hooks"', value
        )
        self.assertEqual(self.connector.attempts, [])
        self.assertFalse(self.client.disconnecting)

    def test_deny_with_status_and_body(self) -> None:
        """A refusal may give its status and body."""
        self.install(Hooks(request=lambda ex: ex.deny(451, "gone")))
        self.proto.dataReceived(GET_A)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 451 "), value)
        self.assertTrue(value.endswith(b"\r\n\r\ngone"), value)

    def test_deny_stops_later_addons(self) -> None:
        """Once an addon refused, later addons' request hooks are not called."""
        second = Hooks(request=lambda ex: None)
        self.install(Hooks(request=lambda ex: ex.deny()), second)
        self.proto.dataReceived(GET_A)
        self.assertEqual(second.calls, [])

    def test_answer_locally(self) -> None:
        """A request hook's answer is the response: framed by the proxy, no origin."""

        def request(ex: AddonExchange) -> None:
            ex.answer(200, "<p>hi</p>", [("Content-Type", "text/html")])

        self.install(Hooks(request=request))
        self.proto.dataReceived(GET_A)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"))
        self.assertIn(b"Content-Length: 9\r\n", value)
        self.assertTrue(value.endswith(b"<p>hi</p>"))
        self.assertEqual(self.connector.attempts, [])

    def test_connect_denied(self) -> None:
        """A CONNECT reaches the request hook too, and can be refused."""
        methods: list[str] = []

        def request(ex: AddonExchange) -> None:
            methods.append(ex.request.method)
            ex.deny()

        self.install(Hooks(request=request))
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))
        self.assertEqual(methods, ["CONNECT"])
        self.assertEqual(self.connector.attempts, [])

    def test_parent_chosen(self) -> None:
        """A request hook picks the parent this request goes through."""

        def request(ex: AddonExchange) -> None:
            ex.parent = "http://parent.example:3128"

        self.install(Hooks(request=request))
        attempt, upstream = self.forward(GET_A)
        self.assertEqual((attempt.host, attempt.port), ("parent.example", 3128))
        self.assertTrue(upstream.value().startswith(b"GET http://a.example/x?y=%20 HTTP/1.1"))

    def test_pool_chosen_with_failover_and_health(self) -> None:
        """A pool picked by name rotates, fails over, and remembers a member that failed."""

        def request(ex: AddonExchange) -> None:
            ex.parent = "rr:http://p1.example:3128,http://p2.example:3128"

        self.install(Hooks(request=request), pool_size=0)
        self.proto.dataReceived(GET_A)
        first = self.connector.attempts[-1]
        first.deferred.errback(ConnectionRefusedError())
        second = self.connector.attempts[-1]
        self.assertEqual([first.host, second.host], ["p1.example", "p2.example"])
        second.succeed()
        second.respond(OK_5)
        self.assertTrue(self.take(self.client).endswith(b"hello"))
        # p1 is down now: the next request goes to p2 at once.
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.connector.attempts[-1].host, "p2.example")
        self.assertEqual(len(self.connector.attempts), 3)

    def test_pool_named_like_a_route_shares_its_health(self) -> None:
        """The spec of a --route pool names that very pool."""
        spec = "rr:http://p1.example:3128,http://p2.example:3128"
        self.install(Hooks(request=lambda ex: None), route=[f"*.other.example={spec}"])
        router = self.factory.runtime.dialer.router
        [route_pool] = router.pools
        self.assertIs(router.exit_named(spec), route_pool)
        self.assertIsNone(router.exit_named("direct"))

    def test_bad_parent_is_a_failure(self) -> None:
        """A parent that isn't a URL is the addon's failure (500), not a crash."""

        def request(ex: AddonExchange) -> None:
            ex.parent = "not a url"

        self.install(Hooks(request=request))
        self.proto.dataReceived(GET_A)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))

    def test_range_removed_with_body_transformer(self) -> None:
        """With an addon that transforms responses, Range requests are answered whole."""
        self.install(Hooks(response_body=lambda ex: None))
        request = GET_A.replace(b"\r\n\r\n", b'\r\nRange: bytes=0-1\r\nIf-Range: "x"\r\n\r\n')
        attempt, upstream = self.forward(request)
        self.assertNotIn(b"Range", upstream.value())

    def test_range_kept_without_body_transformer(self) -> None:
        """Without one, Range goes on."""
        self.install(Hooks(request=lambda ex: None))
        attempt, upstream = self.forward(
            GET_A.replace(b"\r\n\r\n", b"\r\nRange: bytes=0-1\r\n\r\n")
        )
        self.assertIn(b"Range: bytes=0-1", upstream.value())


class AsyncHookTests(AddonTestCase):
    """Hooks that answer later: the client waits, bounded, and cancelling works."""

    def test_deferred_request_hook(self) -> None:
        """The request waits for the hook's Deferred, then goes on with its edits."""
        later: Deferred[None] = Deferred()

        def request(ex: AddonExchange) -> Deferred[None]:
            def edit(_: object) -> None:
                ex.request.fields.set("X-Later", "yes")

            return later.addCallback(edit)

        self.install(Hooks(request=request))
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.connector.attempts, [])
        later.callback(None)
        attempt = self.connector.attempts[-1]
        self.assertIn(b"X-Later: yes", attempt.succeed().value())
        timers = [c for c in self.clock.getDelayedCalls() if "_hook_timed_out" in repr(c)]
        self.assertEqual(timers, [])

    def test_hooks_after_a_waiting_one_run_in_order(self) -> None:
        """A sync hook, a waiting one, then two more: all run, in the addons' order."""
        later: Deferred[None] = Deferred()
        order: list[str] = []

        def mark(name: str, result: Any = None) -> Callable[[AddonExchange], Any]:
            def hook(ex: AddonExchange) -> Any:
                order.append(name)
                ex.request.fields.add("X-Order", name)
                return result

            return hook

        self.install(
            Hooks(request=mark("a")),
            Hooks(request=mark("b", later)),
            Hooks(request=mark("c")),
            Hooks(request=mark("d", Deferred.fromCoroutine(_done()))),
        )
        self.proto.dataReceived(GET_A)
        self.assertEqual(order, ["a", "b"])
        later.callback(None)
        self.assertEqual(order, ["a", "b", "c", "d"])
        sent = self.connector.attempts[-1].succeed().value()
        self.assertIn(b"X-Order: a\r\nX-Order: b\r\nX-Order: c\r\nX-Order: d\r\n", sent)

    def test_async_def_hook(self) -> None:
        """An async def hook awaiting a Deferred works the same way."""
        later: Deferred[None] = Deferred()

        async def request(ex: AddonExchange) -> None:
            await later
            ex.deny(403, "later")

        self.install(Hooks(request=request))
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.client.value(), b"")
        later.callback(None)
        self.assertTrue(self.client.value().endswith(b"later"))

    def test_timeout_is_504_and_cancels(self) -> None:
        """A hook that doesn't answer in time: 504 naming it, and it is cancelled."""
        cancelled: list[bool] = []
        later: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        self.install(Hooks(request=lambda ex: later), addon_timeout=2)
        self.proto.dataReceived(GET_A)
        self.clock.advance(1.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.2)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 504 "), value)
        self.assertIn(b'details="addon Hooks"', value)
        self.assertEqual(cancelled, [True])

    def test_client_leaving_cancels(self) -> None:
        """A hook still waiting when its client leaves is cancelled."""
        cancelled: list[bool] = []
        later: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        self.install(Hooks(request=lambda ex: later))
        self.proto.dataReceived(GET_A)
        self.proto.connectionLost()
        self.assertEqual(cancelled, [True])
        timers = [c for c in self.clock.getDelayedCalls() if "_hook_timed_out" in repr(c)]
        self.assertEqual(timers, [])

    def test_async_failure_is_500(self) -> None:
        """A Deferred that fails is the addon's failure: 500 naming it."""
        later: Deferred[None] = Deferred()
        self.install(Hooks(request=lambda ex: later))
        self.proto.dataReceived(GET_A)
        later.errback(RuntimeError("boom"))
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 500 "), value)
        self.assertIn(b'details="addon Hooks"', value)
        self.flushLoggedErrors(RuntimeError)

    def test_deferred_response_hook_holds_the_origin(self) -> None:
        """While a response hook waits, the origin's bytes are held, then relayed."""
        later: Deferred[None] = Deferred()

        def response(ex: AddonExchange) -> Deferred[None]:
            def edit(_: object) -> None:
                assert ex.response is not None
                ex.response.fields.set("X-Checked", "1")

            return later.addCallback(edit)

        self.install(Hooks(response=response))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(upstream.producerState, "paused")
        attempt.respond(b"world")
        self.assertEqual(self.client.value(), b"")
        later.callback(None)
        value = self.client.value()
        self.assertIn(b"X-Checked: 1\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\nhelloworld"), value)
        self.assertEqual(upstream.producerState, "producing")


class FailureTests(AddonTestCase):
    """A hook that raises costs its own request only."""

    def test_request_hook_raises(self) -> None:
        """500 with Proxy-Status naming the addon; logged with its name."""

        def request(ex: AddonExchange) -> None:
            raise KeyError("oops")

        self.install(Hooks(request=request))
        events = self.capture_log()
        self.proto.dataReceived(GET_A)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 500 "), value)
        self.assertIn(b"proxy_internal_error", value)
        self.assertIn(b'details="addon Hooks"', value)
        [logged] = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual((logged["addon"], logged["hook"]), ("Hooks", "request"))
        self.flushLoggedErrors(KeyError)
        # The next client is served.
        self.client, self.proto = self.connect_client()
        self.factory.runtime.addons.request = ()
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))

    def test_transformer_raises_mid_body(self) -> None:
        """After the response started, a transformer's failure cuts it short."""

        class Breaks:
            def feed(self, chunk: bytes) -> bytes:
                if b"bad" in chunk:
                    raise ValueError("bad chunk")
                return chunk

            def end(self) -> bytes:
                return b""

        self.install(Hooks(response_body=lambda ex: Breaks()))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ngood")
        self.assertIn(b"4\r\ngood\r\n", self.client.value())
        attempt.respond(b"bad!")
        self.assertTrue(self.client.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", self.client.value())
        self.flushLoggedErrors(ValueError)

    def test_transformer_returning_a_number_is_a_failure(self) -> None:
        """A transformer that returns an int is the addon's error, not zero bytes."""

        class Counts:
            def feed(self, chunk: bytes) -> Any:
                return len(chunk)

            def end(self) -> bytes:
                return b""

        self.install(Hooks(response_body=lambda ex: Counts()))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertNotIn(b"\x00", self.client.value())
        self.assertTrue(self.client.disconnecting)
        self.flushLoggedErrors(TypeError)

    def test_notification_hook_raises_is_logged_only(self) -> None:
        """A done hook that raises is logged; the response is unharmed."""

        def done(ex: AddonExchange) -> None:
            raise RuntimeError("done failed")

        self.install(Hooks(done=done))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ResponseHookTests(AddonTestCase):
    """The response and response_body hooks."""

    def test_edit_response_fields(self) -> None:
        """Response fields an addon changes are what the client gets."""

        def response(ex: AddonExchange) -> None:
            assert ex.response is not None
            self.assertEqual((ex.response.status, ex.response.from_cache), (200, False))
            ex.response.fields.remove("Server")
            ex.response.fields.add("X-Seen", "yes")

        self.install(Hooks(response=response))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n\r\nhello")
        value = self.client.value()
        self.assertNotIn(b"Server", value)
        self.assertIn(b"\r\nX-Seen: yes\r\n", value)
        self.assertIn(b"\r\nContent-Length: 5\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\nhello"), value)

    def test_edits_of_repeated_and_noted_fields(self) -> None:
        """Every line of a removed name goes; a set name has its one new line."""

        def response(ex: AddonExchange) -> None:
            assert ex.response is not None
            ex.response.fields.remove("Set-Cookie")
            ex.response.fields.set("Cache-Control", "no-store")

        self.install(Hooks(response=response))
        attempt, _ = self.forward(GET_A)
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nCache-Control: max-age=9\r\n"
            b"Set-Cookie: b=2\r\nContent-Length: 5\r\n\r\nhello"
        )
        value = self.client.value()
        self.assertNotIn(b"Set-Cookie", value)
        self.assertNotIn(b"max-age", value)
        self.assertEqual(value.count(b"Cache-Control: no-store\r\n"), 1)

    def test_set_replaces_a_field_in_another_case(self) -> None:
        """set() finds the origin's field whatever its case: one line, not two."""

        def response(ex: AddonExchange) -> None:
            assert ex.response is not None
            ex.response.fields.set("X-A", "new")
            ex.response.fields.set("X-Fresh", "1")

        self.install(Hooks(response=response))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nx-a: old\r\nContent-Length: 5\r\n\r\nhello")
        value = self.client.value()
        self.assertNotIn(b"old", value)
        self.assertEqual(value.lower().count(b"x-a:"), 1)
        self.assertIn(b"X-Fresh: 1\r\n", value)

    def test_replace_response(self) -> None:
        """A response hook's answer replaces the origin's; its connection is not reused."""

        def response(ex: AddonExchange) -> None:
            ex.answer(403, "no", [("Content-Type", "text/plain")])

        self.install(Hooks(response=response))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 403 "), value)
        self.assertTrue(value.endswith(b"\r\n\r\nno"), value)
        self.assertNotIn(b"hello", value)
        self.assertTrue(upstream.disconnecting)

    def test_transformer_on_content_length_body(self) -> None:
        """A length-changing transformer: chunked, no Content-Length, weak ETag."""
        upper = Upper(tail=b"!")
        self.install(Hooks(response_body=lambda ex: upper))
        attempt, _ = self.forward(GET_A)
        attempt.respond(
            b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nAccept-Ranges: bytes\r\n'
            b"Content-Length: 10\r\n\r\nhello"
        )
        attempt.respond(b"world")
        value = self.client.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", value)
        self.assertNotIn(b"Content-Length", value)
        self.assertNotIn(b"Accept-Ranges", value)
        self.assertIn(b'ETag: W/"v1"\r\n', value)
        self.assertTrue(value.endswith(b"5\r\nHELLO\r\n5\r\nWORLD\r\n1\r\n!\r\n0\r\n\r\n"), value)
        self.assertFalse(self.client.disconnecting)

    def test_transformer_on_chunked_body(self) -> None:
        """A chunked body is transformed chunk by chunk as well."""
        self.install(Hooks(response_body=lambda ex: Upper()))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        attempt.respond(b"2\r\nde\r\n0\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.endswith(b"3\r\nABC\r\n2\r\nDE\r\n0\r\n\r\n"), value)

    def test_http10_client_gets_close_delimited(self) -> None:
        """To an HTTP/1.0 client a transformed body ends with the close."""
        self.install(Hooks(response_body=lambda ex: Upper()))
        attempt, _ = self.forward(GET_A.replace(b"HTTP/1.1", b"HTTP/1.0"))
        attempt.respond(OK_5)
        value = self.client.value()
        self.assertTrue(value.endswith(b"\r\n\r\nHELLO"), value)
        self.assertNotIn(b"Content-Length", value)
        self.assertTrue(self.client.disconnecting)

    def test_replace_across_chunks(self) -> None:
        """A word cut by a chunk boundary is still replaced (bytes held back)."""
        self.install(Hooks(response_body=lambda ex: Replace({"cloud": "sky"})))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nthe clo")
        attempt.respond(b"ud is up")
        value = self.client.value()
        body = value.split(b"\r\n\r\n", 1)[1]
        self.assertIn(b"sky", body)
        self.assertNotIn(b"clo", body)

    def test_no_body_hooks_for_head_204_304(self) -> None:
        """HEAD, 204 and 304 responses have no body: the body hooks aren't called."""
        addon = Hooks(response=lambda ex: None, response_body=lambda ex: Upper())
        self.install(addon)
        for request, response in (
            (GET_A.replace(b"GET", b"HEAD"), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (GET_A, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (GET_A, b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\n'),
        ):
            attempt = self.connector.attempts[-1] if self.connector.attempts else None
            self.proto.dataReceived(request)
            if self.connector.attempts and self.connector.attempts[-1] is not attempt:
                self.connector.attempts[-1].succeed()
                self.connector.attempts[-1].respond(response)
            else:
                assert attempt is not None
                attempt.respond(response)
        self.assertEqual(addon.calls, ["response"] * 3)
        self.assertIn(b"HTTP/1.1 304 ", self.client.value())

    def test_slow_reader_pauses_origin_through_transformer(self) -> None:
        """With a transformer, a client that doesn't read still pauses the origin."""
        self.install(Hooks(response_body=lambda ex: Upper()))
        attempt, upstream = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        gate = self.client.producer
        assert gate is not None
        gate.pauseProducing()
        self.assertEqual(upstream.producerState, "paused")
        gate.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")

    def test_request_body_transformer_goes_chunked(self) -> None:
        """A transformed request body goes chunked."""
        self.install(Hooks(request_body=lambda ex: Upper()))
        attempt, upstream = self.forward(POST_A + b"ab")
        self.proto.dataReceived(b"cd")
        value = upstream.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", value)
        self.assertNotIn(b"Content-Length", value)
        self.assertTrue(value.endswith(b"2\r\nAB\r\n2\r\nCD\r\n0\r\n\r\n"), value)

    def test_request_body_transformer_with_length(self) -> None:
        """A transformer that gives its length up front keeps a Content-Length."""

        class Doubles:
            length = 8

            def feed(self, chunk: bytes) -> bytes:
                return chunk * 2

            def end(self) -> bytes:
                return b""

        self.install(Hooks(request_body=lambda ex: Doubles()))
        attempt, upstream = self.forward(POST_A + b"abcd")
        value = upstream.value()
        self.assertIn(b"Content-Length: 8\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\nabcdabcd"), value)

    def test_request_body_hook_not_called_without_body(self) -> None:
        """A GET has no body: request_body is not called."""
        addon = Hooks(request_body=lambda ex: Upper())
        self.install(addon)
        self.forward(GET_A)
        self.assertEqual(addon.calls, [])


class NotificationTests(AddonTestCase):
    """done, error, tunnel_open and tunnel_close."""

    def test_done_once_per_exchange(self) -> None:
        """done sees each exchange once, with its response."""
        statuses: list[int] = []

        def done(ex: AddonExchange) -> None:
            assert ex.response is not None
            statuses.append(ex.response.status)

        self.install(Hooks(response=lambda ex: None, done=done))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.proto.dataReceived(GET_A)
        attempt.respond(OK_5)
        self.assertEqual(statuses, [200, 200])

    def test_error_hook(self) -> None:
        """A failed exchange reaches the error hook with the proxy's reason, then done."""
        addon = Hooks(error=lambda ex, why: self.errors.append(why), done=lambda ex: None)
        self.errors: list[str] = []
        self.install(addon)
        self.proto.dataReceived(GET_A)
        self.connector.attempts[-1].deferred.errback(ConnectionRefusedError())
        self.assertEqual(addon.calls, ["error", "done"])
        self.assertIn("a.example", self.errors[0])

    def test_tunnel_hooks(self) -> None:
        """A CONNECT tunnel: tunnel_open, then tunnel_close with the byte counts."""
        counts: list[tuple[int, int]] = []
        addon = Hooks(
            tunnel_open=lambda ex: None,
            tunnel_close=lambda ex, up, down: counts.append((up, down)),
            done=lambda ex: None,
        )
        self.install(addon)
        attempt, upstream = self.forward(
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
        )
        self.assertEqual(addon.calls, ["tunnel_open"])
        self.proto.dataReceived(b"12345")
        attempt.respond(b"abc")
        self.proto.connectionLost()
        self.assertEqual(addon.calls, ["tunnel_open", "tunnel_close", "done"])
        self.assertEqual(counts, [(5, 3)])


class BigBodyTests(AddonTestCase):
    """A large body through a transformer stays out of memory."""

    def test_one_gib_through_a_transformer_rss_flat(self) -> None:
        """1 GiB rewritten as it streams: the process's RSS grows by less than 64 MiB."""
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to read the RSS")
        self.install(Hooks(response_body=lambda ex: Replace({"cloud": "sky!!"})))
        attempt, _ = self.forward(GET_A)
        total, piece = 1 << 30, (b"the cloud " * 26215)[: 256 * 1024]
        attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        start = peak = rss()
        got = 0
        for index in range(total // len(piece)):
            attempt.respond(piece)
            got += len(self.take(self.client))
            if index % 256 == 0:
                peak = max(peak, rss())
        self.assertTrue(self.take(self.client).endswith(b"0\r\n\r\n") or got > total)
        self.assertGreater(got, total)  # (each "cloud" became "sky!!": same length, + framing)
        self.assertLess(peak - start, 64 << 20)


def rss() -> int:
    """This process's resident set size in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


async def _done() -> None:
    """A coroutine that is over at once (a hook's result already there)."""


class ReviewFixTests(AddonTestCase):
    """What a review of the addon API found, each fixed and kept fixed."""

    def test_empty_body_through_a_transformer_is_framed(self) -> None:
        """A Content-Length: 0 response with a transformer ends its chunked body, so the
        next response on the connection is not read inside it."""
        self.install(Hooks(response_body=lambda ex: Upper(tail=b"!")))
        attempt, _ = self.forward(GET_A)
        attempt.respond(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n")
        first = self.take(self.client)
        self.assertTrue(first.endswith(b"\r\n\r\n1\r\n!\r\n0\r\n\r\n"), first)
        self.proto.dataReceived(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.take(self.client).startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_no_body_on_204_or_304(self) -> None:
        """answer() refuses a body for 204/304, and a stage's 204 never carries one."""
        view = RequestView("GET", "/", "http", "a", 80, "HTTP/1.1", Fields(()))
        request = AddonExchange("127.0.0.1", None, view)
        with self.assertRaises(ValueError):
            request.answer(204, b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(
            answer_bytes(Answer(204, b"No Content", (), b"smuggled"), None, 1, False),
            b"HTTP/1.1 204 No Content\r\n\r\n",
        )

    def test_connect_answered_2xx_is_a_failure(self) -> None:
        """A 2xx to a CONNECT would open a tunnel in the client's eyes: refused (500)."""
        self.install(Hooks(request=lambda ex: ex.answer(200, "xyz")))
        self.proto.dataReceived(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))

    def test_waiting_request_and_response_hooks_on_a_cache_hit(self) -> None:
        """Both hooks waiting, on a hit: the connection is already waiting (no 500)."""
        waits: list[Deferred[None]] = []

        def later(ex: AddonExchange) -> Deferred[None]:
            waits.append(Deferred())
            return waits[-1]

        self.install(Hooks(request=later, response=later), cache_memory="4MiB", pool_size=0)
        self.proto.dataReceived(GET_A)
        waits[0].callback(None)
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhello"
        )
        waits[1].callback(None)
        self.take(self.client)
        self.proto.dataReceived(GET_A)
        waits[2].callback(None)
        waits[3].callback(None)
        hit = self.take(self.client)
        self.assertTrue(hit.startswith(b"HTTP/1.1 200 OK\r\n"), hit)
        self.assertTrue(hit.endswith(b"hello"))
        self.assertEqual(len(self.connector.attempts), 1)

    def test_response_hook_wait_is_the_addons_timeout(self) -> None:
        """A response hook waiting longer than --read-timeout: the addon's 504."""
        self.install(Hooks(response=lambda ex: Deferred()), addon_timeout=8, read_timeout=5)
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.clock.advance(6)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(3)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 504 "), value)
        self.assertIn(b'details="addon Hooks"', value)

    def test_hook_that_cancels_itself_is_a_failure(self) -> None:
        """A hook's Deferred cancelled by the addon itself: 500, not a connection stuck."""
        waiting: Deferred[None] = Deferred()
        self.install(Hooks(request=lambda ex: waiting))
        self.proto.dataReceived(GET_A)
        waiting.cancel()
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))

    def test_done_returning_an_odd_awaitable_is_logged_only(self) -> None:
        """A notification hook's result that ensureDeferred refuses goes no further."""

        class Odd:
            def __await__(self) -> Any:
                return iter(())

        self.install(Hooks(done=lambda ex: Odd()))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))
        self.assertFalse(self.client.disconnecting)
        self.flushLoggedErrors()

    def test_response_transformer_length_is_not_a_promise(self) -> None:
        """A response transformer's own `length` attribute does not bind it."""

        class Counting(Upper):
            length = 0

        self.install(Hooks(response_body=lambda ex: Counting()))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"5\r\nHELLO\r\n0\r\n\r\n"))

    def test_transformer_failing_at_once_is_a_500(self) -> None:
        """A transformer that fails on the first piece: nothing was sent, so a 500."""

        class Fails:
            def feed(self, chunk: bytes) -> bytes:
                raise ValueError("no")

            def end(self) -> bytes:
                return b""

        self.install(Hooks(response_body=lambda ex: Fails()))
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 500 "))
        self.flushLoggedErrors(ValueError)
