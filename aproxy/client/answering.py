"""
L{AnswerHalf}: how an exchange sends an answer a stage gives in place of the origin's (a
cache hit), at once or after waiting for it, with its body in memory or streamed from an
L{IAnswerBody} at the client's pace; and L{Drain}, which reads the rest of a response body
to a stage's filter after its client left (a cache finishing an object others wait for).

Like L{aproxy.client.response.ResponseHalf}, the state stays in the one exchange object;
this class holds the code of this part of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.addons.run import AddonFailure
from aproxy.client.connection import DEADLINE_READ, PAUSE_DIAL
from aproxy.client.guard import guarded
from aproxy.client.phases import Phase
from aproxy.client.runtime import Runtime
from aproxy.client.side import ClientSide
from aproxy.client.stages import Answer, IAnswerSink, IBodyFilter, StageRequest, answer_bytes
from aproxy.client.wire import write_soon
from aproxy.errors import BadGateway, ProxyError
from aproxy.http.answers import local_answer
from aproxy.http.body import UntilCloseDecoder
from aproxy.http.head import RequestHead
from aproxy.upstream.protocol import DISCARD, UpstreamProtocol, abandon

__all__ = ["AnswerHalf", "Drain"]


@implementer(IAnswerSink)
class AnswerHalf:
    """The code of an exchange's answers given by stages (its state is the exchange's)."""

    log = Logger()
    conn: ClientSide
    runtime: Runtime
    head: RequestHead
    connecting: Deferred[Any] | None
    to_client: int
    status: int
    response_started: bool
    answering: Any = None
    hooks: Any
    response_hooked: bool
    answer_filter: Any
    answer_error: str | None
    answer_closing = False
    answer_chunked = False
    view: StageRequest | None
    req_body: Any

    def emit(self, status: int, error: str | None) -> None:
        """Report the exchange (the exchange does it)."""
        raise NotImplementedError

    def internal_error(self, failure: Failure) -> None:
        """A bug in a callback: the connection handles it."""
        self.conn.internal_error(failure)

    def detach(self) -> UpstreamProtocol | None:
        """Unlink the upstream connection in flight (the exchange does it)."""
        raise NotImplementedError

    def _forward(self, rest: bytes) -> None:
        """Send the request upstream (the exchange does it)."""
        raise NotImplementedError

    if TYPE_CHECKING:

        def _hook_answer(self, answer: Answer, rest: bytes) -> None:
            """Run the addons' response hooks (see L{aproxy.client.hooks.HookHalf})."""
            ...

        def _addon_failed(self, e: AddonFailure) -> None:
            """An addon failed: 500 or a cut (see L{aproxy.client.hooks.HookHalf})."""
            ...

    def _wait_for_stage(self, later: Deferred[Any], rest: bytes) -> None:
        """
        A stage answers later: pause the client (its bytes are held) until it does, for
        at most the read timeout, and cancel the wait if the client leaves.
        """
        conn = self.conn
        if conn.phase is not Phase.STAGE:  # (it is, after an addon's hook waited)
            conn.move(Phase.STAGE)
        conn.pause_for(PAUSE_DIAL)
        conn.stash(rest)
        conn.set_deadline(DEADLINE_READ, self.runtime.config.read_timeout)
        self.connecting = later
        later.addCallbacks(self._stage_answered, self._stage_failed)

    def answer_instead(self, err: ProxyError) -> bool:
        """
        The origin could not be reached before its response started (C{err}, a 502 or a
        504): if a stage has an answer for that (L{StageRequest.fallback}), drop what
        went upstream (a dial, a connection) and send that answer instead.

        @return: Whether it did.
        """
        view = self.view
        fallback = view.fallback if view is not None else None
        if fallback is None or err.status not in (502, 504) or self.req_body is not None:
            return False
        view.fallback = None  # type: ignore[union-attr]
        answer = fallback()
        if answer is None:
            return False
        conn = self.conn
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        up = self.detach()
        if up is not None:
            abandon(up, abort=True)
        conn.unpause_for(PAUSE_DIAL)
        self.send_answer(answer, conn.take_pending())
        return True

    @guarded
    def _stage_answered(self, answer: Answer | None) -> None:
        self.connecting = None
        conn = self.conn
        if conn.phase is not Phase.STAGE:
            return
        conn.unpause_for(PAUSE_DIAL)
        rest = conn.take_pending()
        if answer is None:
            self._forward(rest)
        else:
            self.send_answer(answer, rest)

    @guarded
    def _stage_failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(CancelledError) or self.conn.phase is not Phase.STAGE:
            return
        self.internal_error(failure)

    def _answer_locally(self, rest: bytes) -> None:
        """Answer a request for the proxy itself (C{Max-Forwards: 0}): TRACE or OPTIONS."""
        head = self.head
        conn = self.conn
        closing = not head.keep_alive or head.codings is not None or bool(head.content_length)
        answer = local_answer(head, closing)
        self.to_client += len(answer)
        conn.transport.write(answer)
        self.emit(200, None)
        conn.stash(rest)
        conn.exchange_done(not closing)

    def send_answer(self, answer: Answer, rest: bytes) -> None:
        """
        Send C{answer} to the client: its head and in-memory body in one write, or its
        head then its streamed body (a C{HEAD} request gets the head alone).

        @param rest: Client bytes after the request (the next pipelined one).
        """
        if self.hooks is not None and not self.response_hooked:
            self._hook_answer(answer, rest)  # (it comes back here)
            return
        conn = self.conn
        head = self.head
        closing = not head.keep_alive or head.codings is not None or bool(head.content_length)
        # (A 204 or a 304 has no body whatever its source holds: RFC 9110 section 6.4.1.)
        head_only = head.method == b"HEAD" or answer.status in (204, 304)
        source = answer.source
        chunked = False
        if source is not None and answer.length is None and not head_only:
            # A streamed body of a length not known yet (a fetch in progress without
            # Content-Length): chunked to HTTP/1.1, delimited by the close to HTTP/1.0.
            chunked = head.minor >= 1
            closing = closing or not chunked
        data = answer_bytes(answer, self.runtime.via, head.minor, closing, head_only, chunked)
        self.to_client += len(data)
        self.status = answer.status
        self.response_started = True
        write_soon(conn.transport, data)
        conn.stash(rest)
        if source is None or head_only:
            if source is not None:
                source.stopProducing()
            self.emit(answer.status, self.answer_error)
            conn.exchange_done(not closing)
            return
        self.answering = source
        self.answer_closing = closing
        self.answer_chunked = chunked
        if conn.phase is not Phase.FORWARDING:
            # (A response a stage replaced is already forwarding.)
            conn.move(Phase.FORWARDING)
        conn.output.attach(source)
        conn.set_deadline(DEADLINE_READ, self.runtime.config.read_timeout)
        source.start(self)

    def answer_data(self, data: bytes) -> None:
        """The next bytes of a streamed answer: to the client."""
        conn = self.conn
        if self.answering is None or conn.phase is not Phase.FORWARDING:
            return
        conn.extend_deadline(self.runtime.config.read_timeout)
        if self.answer_filter is not None:
            data = self._answer_transformed(data, False)
            if not data:
                return
        if self.answer_chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.to_client += len(data)
        conn.transport.write(data)

    def answer_done(self) -> None:
        """A streamed answer is complete: the exchange is over."""
        if self.answering is None:
            return
        conn = self.conn
        if self.answer_filter is not None:
            tail = self._answer_transformed(b"", True)
            if self.answering is None:
                return
            if tail:
                tail = b"%x\r\n%s\r\n" % (len(tail), tail) if self.answer_chunked else tail
                self.to_client += len(tail)
                conn.transport.write(tail)
        self.answering = None
        if self.answer_chunked:
            self.to_client += 5
            conn.transport.write(b"0\r\n\r\n")
        conn.output.source = None
        self.emit(self.status, None)
        conn.exchange_done(not self.answer_closing)

    def answer_failed(self, why: str) -> None:
        """A streamed answer can't be completed: the client sees it cut short."""
        if self.answering is None:
            return
        self.answering = None
        self.conn.output.source = None
        self.conn.fail(BadGateway(why, "http_response_incomplete"))

    def _answer_transformed(self, data: bytes, end: bool) -> bytes:
        """A streamed answer's bytes through an addon's transformers (which may fail)."""
        try:
            out: bytes = self.answer_filter.end() if end else self.answer_filter.data(data)
            return out
        except AddonFailure as e:
            self.stop_answer()
            self._addon_failed(e)
            return b""

    def stop_answer(self) -> None:
        """The client left (or the exchange failed) while an answer streamed: stop it."""
        source, self.answering = self.answering, None
        if source is not None:
            self.conn.output.source = None
            source.stopProducing()


class Drain:
    """
    Reads the rest of a response body to a stage's filter once its client is gone (the
    filter asked for it, see L{IBodyFilter.abandoned}), then closes the origin
    connection; gives up after the read timeout without a byte.
    """

    log = Logger()

    def __init__(
        self,
        up: UpstreamProtocol,
        decoder: Any,
        body_filter: IBodyFilter,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self.up = up
        self.decoder = decoder
        self.filter = body_filter
        self.clock = clock
        self.timeout = timeout
        self.timer: IDelayedCall | None = None
        self.over = False

    def start(self) -> None:
        """Take the connection over and read on, whatever the client's pace was."""
        self.up.hand_to(self)
        self.timer = self.clock.callLater(self.timeout, self._timed_out)
        self.up.transport.resumeProducing()

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Body bytes: decoded and given to the filter."""
        if self.over:
            return
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.timeout)
        try:
            pieces, _ = self.decoder.feed(data)
            for piece in pieces:
                self.filter.data(piece)
        except ProxyError:
            self._give_up()
            return
        except Exception:
            self.log.failure("a stage's body filter failed while draining")
            self._give_up()
            return
        if self.decoder.done:
            self._finish()

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin half-closed: close (its end follows)."""
        up.transport.loseConnection()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """The origin closed: the end of a close-delimited body, otherwise a failure."""
        if self.over:
            return
        if isinstance(self.decoder, UntilCloseDecoder):
            self.decoder.done = True
            self._finish()
        else:
            self._give_up()

    def _finish(self) -> None:
        self._end()
        try:
            self.filter.end()
        except Exception:
            self.log.failure("a stage's body filter failed at the end of a drained body")

    def _give_up(self) -> None:
        self._end()
        try:
            self.filter.abandoned(False)
        except Exception:
            self.log.failure("a stage's body filter failed when abandoned")

    def _timed_out(self) -> None:
        self.timer = None
        if not self.over:
            self._give_up()

    def _end(self) -> None:
        self.over = True
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        up = self.up
        up.hand_to(DISCARD)
        if not up.lost:
            up.transport.loseConnection()
