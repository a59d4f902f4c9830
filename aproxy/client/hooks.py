"""
L{HookHalf}: where an exchange runs the hooks of the loaded addons (L{aproxy.addons}) and
applies what they did: edited header fields, a chosen parent, a refusal or an answer of
their own, body transformers. Hooks that answer later (a L{Deferred} or a coroutine) keep
the exchange waiting, bounded by C{--addon-timeout}; while a response hook waits, the
origin's bytes are held and its connection is paused.

With no addon loaded none of this runs: the exchange tests C{runtime.addons} once per
request and once per response. Like L{aproxy.client.response.ResponseHalf}, the state
stays in the one exchange object; this class holds the code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.addons.api import (
    REQUEST_LOCKED,
    RESPONSE_LOCKED,
    AddonExchange,
    Fields,
    RequestView,
    ResponseView,
    text_fields,
)
from aproxy.addons.run import AddonFailure, TransformFilter
from aproxy.client.connection import DEADLINE_READ, PAUSE_DIAL
from aproxy.client.guard import guarded
from aproxy.client.phases import Phase
from aproxy.client.runtime import Runtime
from aproxy.client.side import ClientSide
from aproxy.client.stages import Answer, IBodyFilter, chain_filters
from aproxy.errors import GatewayTimeout, InternalError, ProxyError
from aproxy.http.head import (
    BODY_NONE,
    RequestHead,
    ResponseHead,
    Target,
    response_body_kind,
    with_fields,
)
from aproxy.upstream.protocol import UpstreamProtocol

__all__ = ["HookHalf"]

log = Logger()

# A Range or If-Range field line (looked for before the fields are read one by one).
_RANGES = re.compile(rb"(?im)^(?:if-)?range[ \t]*:")

# Statuses whose bodies no transformer sees: none (204, 304), or a part of one (206).
_NO_BODY_HOOKS = frozenset((204, 206, 304))


class _Held:
    """
    The owner of the origin connection while a response hook waits: its bytes are kept
    (the connection paused after each read), its end noted, for the exchange to take up.
    """

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost: Failure | None = None

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        self.data += data
        up.transport.pauseProducing()

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        self.eof = True

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        self.lost = reason


def _answer_fields(answer: Answer) -> list[tuple[bytes, bytes]]:
    """The field lines of C{answer}: its written-out block, then its pairs."""
    pairs = []
    for line in answer.block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        pairs.append((name, value.strip(b" \t")))
    return pairs + list(answer.fields)


def _weaken(fields: Fields) -> None:
    """
    A transformed body is not the one the origin's validators and ranges describe: a
    strong C{ETag} becomes weak (it no longer matches byte for byte) and
    C{Accept-Ranges} goes.
    """
    etag = fields.get("ETag")
    if etag is not None and not etag.startswith("W/"):
        fields.set("ETag", "W/" + etag)
    fields.remove("Accept-Ranges")


def _request_view(head: RequestHead, target: Target) -> RequestView:
    """The request as addons see it (made when a hook first looks at it)."""
    return RequestView(
        head.method.decode("ascii"),
        head.target.decode("ascii", "replace"),
        target.scheme.decode("ascii"),
        target.host,
        target.port,
        f"HTTP/1.{head.minor}",
        Fields.of_head(head, REQUEST_LOCKED),
    )


class HookHalf:
    """The code of an exchange's addon hooks (its state is the exchange's)."""

    conn: ClientSide
    runtime: Runtime
    head: RequestHead
    target: Target | None
    up: UpstreamProtocol | None
    connecting: Deferred[Any] | None
    req_filter: IBodyFilter | None
    resp_filter: IBodyFilter | None
    status: int
    # The exchange as hooks see it (L{None}: no addon, or a request no hook saw).
    hooks: AddonExchange | None = None
    addon_parent: str | None = None
    response_hooked = False
    answer_filter: Any = None
    answer_error: str | None = None
    tunnel_opened = False
    failed_reason: str | None = None
    # (Names dropped from the response head, and the lines added for them.)
    resp_edit: tuple[tuple[bytes, ...], bytes] = ((), b"")
    _hook_timer: IDelayedCall | None = None

    def send_answer(self, answer: Answer, rest: bytes) -> None:
        raise NotImplementedError

    def internal_error(self, failure: Failure) -> None:
        raise NotImplementedError

    def _replaced(self, resp: ResponseHead, answer: Answer, rest: bytes) -> None:
        raise NotImplementedError

    def _relay_response(self, resp: ResponseHead, rest: bytes) -> None:
        raise NotImplementedError

    # -- waiting ----------------------------------------------------------------------

    def _hook_wait(
        self, later: Deferred[Any], resume: Callable[[], None], rest: bytes | None
    ) -> None:
        """
        Wait for hooks that answer later, then C{resume}; at most C{--addon-timeout}.

        @param rest: Client bytes after the request head, held meanwhile (the client is
            paused); L{None} while the response is waited for (the request body, if
            any, goes on).
        """
        conn = self.conn
        # (The hook timer bounds the wait: the read deadline would blame the origin.)
        conn.cancel_timer()
        if rest is not None:
            if conn.phase not in (Phase.FORWARDING, Phase.STAGE):
                conn.move(Phase.STAGE)
            conn.pause_for(PAUSE_DIAL)
            conn.stash(rest)
        self.connecting = later
        addons = self.runtime.addons
        self._hook_timer = conn.clock.callLater(addons.timeout, self._hook_timed_out)
        later.addCallbacks(self._hook_fired, self._hook_failed, callbackArgs=(resume, rest))

    def _hook_stop_timer(self) -> None:
        timer, self._hook_timer = self._hook_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    @guarded
    def _hook_fired(self, _: object, resume: Callable[[], None], rest: bytes | None) -> None:
        self._hook_stop_timer()
        self.connecting = None
        conn = self.conn
        if conn.phase is Phase.CLOSING:
            return
        if rest is not None:
            conn.unpause_for(PAUSE_DIAL)
        else:
            conn.set_deadline(DEADLINE_READ, self.runtime.config.read_timeout)
        resume()

    @guarded
    def _hook_failed(self, failure: Failure) -> None:
        self._hook_stop_timer()
        # (The proxy forgets the wait before it cancels it: when the client left, or at
        # the timeout. A wait still known here was cancelled by the addon itself.)
        ours = self.connecting is None
        self.connecting = None
        if self.conn.phase is Phase.CLOSING or (ours and failure.check(CancelledError)):
            return
        if isinstance(failure.value, AddonFailure):
            self._addon_failed(failure.value)
            return
        if failure.check(CancelledError):
            name = self.hooks.addon if self.hooks is not None else "?"
            log.warn("addon {name}: its hook's Deferred was cancelled by the addon", name=name)
            self._addon_failed(AddonFailure(name, "hook"))
            return
        self.internal_error(failure)

    @guarded
    def _hook_timed_out(self) -> None:
        self._hook_timer = None
        later, self.connecting = self.connecting, None
        name = self.hooks.addon if self.hooks is not None else "?"
        timeout = self.runtime.addons.timeout
        self.conn.fail(
            GatewayTimeout(
                f"addon {name} did not answer within {timeout:g} s",
                "http_response_timeout",
                details=f"addon {name}",
            )
        )
        if later is not None:
            later.cancel()

    def _addon_failed(self, e: AddonFailure) -> None:
        """A hook raised (its traceback is logged): 500, or a response cut short."""
        self.conn.fail(
            InternalError(
                f"internal error in the proxy: addon {e.addon} failed (it was logged)",
                details=f"addon {e.addon}",
            )
        )

    def _edit_failed(self, what: str, e: Exception) -> None:
        """An addon's edit can't be applied: logged, and answered as its failure."""
        name = self.hooks.addon if self.hooks is not None else "?"
        log.warn("addon {name}: {what} can't be applied: {why}", name=name, what=what, why=e)
        self._addon_failed(AddonFailure(name, what))

    # -- the request ------------------------------------------------------------------

    def _hook_request(self, rest: bytes, then: Callable[[bytes], None]) -> None:
        """
        Run the C{request} hooks (then the C{request_body} hooks, for a request with a
        body) before the stages and any upstream connection; then C{then(rest)}, unless
        an addon refused or answered the request.
        """
        head = self.head
        conn = self.conn
        intercepted = getattr(conn, "session", None) is not None
        assert self.target is not None
        # (The view is made from the head and target alone: a reference back to this
        # exchange would make a cycle, left to the garbage collector, every request.)
        view = functools.partial(_request_view, head, self.target)
        self.hooks = AddonExchange(conn.client_ip or "unix", conn.user, view, intercepted)
        addons = self.runtime.addons
        if not (addons.response or addons.response_body):
            self.response_hooked = True  # (no hook for responses: none to run)
        if not (addons.request or addons.request_body or addons.ranges_whole):
            then(rest)  # (no hook for requests: nothing to run or apply)
            return
        body = head.codings is not None or bool(head.content_length)
        self._phase(
            "request", body, lambda collect, rest: self._request_hooked(collect, rest, then), rest
        )

    def _phase(
        self,
        first: str,
        body: bool,
        done: Callable[[list[Any], bytes], None],
        rest: bytes,
        hold: Callable[[], Callable[[list[Any], bytes], None]] | None = None,
    ) -> None:
        """
        Run the C{first} hooks (C{request} or C{response}) and, for a message with a
        C{body}, the body hooks; then C{done(transformers, rest)}, at once or once the
        hooks that answer later have. Without C{hold} the client waits meanwhile (its
        bytes after the head are held); C{hold} holds the origin instead and returns
        what to call in place of C{done}.
        """
        collect: list[Any] = []
        try:
            later = self.runtime.addons.phase(
                first, f"{first}_body" if body else None, self.hooks, collect
            )
        except AddonFailure as e:
            self._addon_failed(e)
            return
        if later is None:
            done(collect, rest)
        elif hold is None:
            self._hook_wait(later, lambda: done(collect, self.conn.take_pending()), rest)
        else:
            resume = hold()
            self._hook_wait(later, lambda: resume(collect, rest), None)

    def _request_hooked(
        self, collect: list[Any], rest: bytes, then: Callable[[bytes], None]
    ) -> None:
        ex = self.hooks
        assert ex is not None
        reply = ex.reply
        if reply is not None and reply.status < 300 and self.head.method == b"CONNECT":
            # A 2xx to a CONNECT means "tunnel open" to the client, whatever follows.
            err = ValueError("a CONNECT can be refused, not answered with a 2xx")
            self._edit_failed("its answer", err)
            return
        if reply is not None:
            # (An addon's own answer goes out as it made it: no response hooks.)
            self.response_hooked = True
            if reply.denied:
                self.answer_error = "http_request_denied"
            self.send_answer(Answer(reply.status, reply.reason, reply.fields, reply.body), rest)
            return
        if self.runtime.addons.ranges_whole and _RANGES.search(self.head.block):
            # A transformer sees whole bodies, never parts: ranges are answered in full.
            ex.request.fields.remove("Range")
            ex.request.fields.remove("If-Range")
        try:
            if ex.request_seen and ex.request.fields.changed:
                self.head = with_fields(self.head, ex.request.fields.to_bytes())
            if ex.parent is not None:
                self.runtime.dialer.router.exit_named(ex.parent)
        except (ValueError, TypeError, AttributeError, ProxyError) as e:
            self._edit_failed("its request", e)
            return
        self.addon_parent = ex.parent
        if collect:
            self.req_filter = TransformFilter(collect, "request_body")
        then(rest)

    # -- the response -----------------------------------------------------------------

    def _hook_response(self, resp: ResponseHead, rest: bytes) -> None:
        """
        Run the C{response} hooks (then the C{response_body} hooks, for a response with
        a body) on the origin's final response head, before anything of it is sent.
        """
        ex = self.hooks
        assert ex is not None
        self.response_hooked = True
        reason = resp.reason.decode("latin-1")
        ex.response = ResponseView(resp.status, reason, Fields.of_head(resp, RESPONSE_LOCKED))
        body = (
            resp.status not in _NO_BODY_HOOKS
            and response_body_kind(resp, self.head.method) != BODY_NONE
        )

        def hold() -> Callable[[list[Any], bytes], None]:
            up = self.up
            assert up is not None
            held = _Held()
            up.hand_to(held)
            up.transport.pauseProducing()
            return lambda collect, rest: self._resume_held(resp, rest, collect, held)

        self._phase(
            "response",
            body,
            lambda collect, rest: self._response_hooked(resp, rest, collect),
            rest,
            hold,
        )

    def _resume_held(
        self, resp: ResponseHead, rest: bytes, collect: list[Any], held: _Held
    ) -> None:
        up = self.up
        if up is None:
            return
        up.hand_to(self)  # type: ignore[arg-type]
        up.transport.resumeProducing()
        self._response_hooked(resp, rest + held.data, collect)
        if held.lost is not None:
            up.owner.upstream_lost(up, held.lost)
        elif held.eof:
            up.owner.upstream_eof(up)

    def _response_hooked(self, resp: ResponseHead, rest: bytes, collect: list[Any]) -> None:
        ex = self.hooks
        assert ex is not None and ex.response is not None
        reply = ex.reply
        if reply is not None:
            self._replaced(resp, Answer(reply.status, reply.reason, reply.fields, reply.body), rest)
            return
        fields = ex.response.fields
        if collect:
            self.resp_filter = chain_filters(
                self.resp_filter, TransformFilter(collect, "response_body")
            )
            _weaken(fields)
        if fields.changed:
            # The lines of the names changed go in place of the origin's (a checked edit
            # can't change the framing: the head need not be parsed again).
            self.resp_edit = fields.edit()
        self._relay_response(resp, rest)

    # -- answers (the cache's, a stage's) ---------------------------------------------

    def _hook_answer(self, answer: Answer, rest: bytes) -> None:
        """Run the response hooks on an answer a stage gives (a cache hit)."""
        ex = self.hooks
        assert ex is not None
        self.response_hooked = True
        fields = text_fields(_answer_fields(answer), RESPONSE_LOCKED)
        ex.response = ResponseView(answer.status, answer.reason.decode("latin-1"), fields, True)
        body = (
            answer.status not in _NO_BODY_HOOKS
            and self.head.method != b"HEAD"
            and (answer.source is not None or bool(answer.body))
        )
        self._phase(
            "response",
            body,
            lambda collect, rest: self._answer_hooked(answer, rest, collect),
            rest,
        )

    def _answer_hooked(self, answer: Answer, rest: bytes, collect: list[Any]) -> None:
        ex = self.hooks
        assert ex is not None and ex.response is not None
        reply = ex.reply
        if reply is not None:
            source = answer.source
            if source is not None:
                source.stopProducing()
            self.send_answer(Answer(reply.status, reply.reason, reply.fields, reply.body), rest)
            return
        fields = ex.response.fields
        transform = TransformFilter(collect, "response_body") if collect else None
        if transform is not None:
            _weaken(fields)
        if fields.changed or transform is not None:
            body = answer.body
            length = answer.length
            if transform is not None:
                length = None
                if answer.source is None:
                    try:
                        body = transform.data(body) + transform.end()
                    except AddonFailure as e:
                        self._addon_failed(e)
                        return
                else:
                    self.answer_filter = transform
            pairs = fields.to_bytes()
            answer = Answer(answer.status, answer.reason, pairs, body, answer.source, length)
        self.send_answer(answer, rest)

    # -- notifications ----------------------------------------------------------------

    def hooks_tunnel(self) -> None:
        """This exchange became a tunnel: the C{tunnel_open} hooks are told."""
        ex = self.hooks
        if ex is not None:
            self.tunnel_opened = True
            addons = self.runtime.addons
            addons.notify("tunnel_open", addons.tunnel_open, ex)

    def _hooks_end(self, error: str | None, to_client: int, to_origin: int) -> None:
        """The exchange is over: C{tunnel_close}, C{error} and C{done} hooks, once."""
        ex = self.hooks
        assert ex is not None
        addons = self.runtime.addons
        if self.tunnel_opened and addons.tunnel_close:
            addons.notify("tunnel_close", addons.tunnel_close, ex, to_origin, to_client)
        if error is not None and error != self.answer_error and addons.error:
            addons.notify("error", addons.error, ex, self.failed_reason or error)
        if addons.done:
            addons.notify("done", addons.done, ex)
