"""
Objects on their way into the cache, and the streamed bodies the cache answers with.

A L{Fill} is one response being stored as it arrives from the origin: its bytes go to a
temporary file of the disk store (or to memory without one) through a L{StoreFilter}, the
body filter of the exchange that fetches it. Other clients that ask for the same URL
meanwhile (collapsed misses) follow it with a L{FillReader}: they get the bytes already
received at their own pace, then the rest as it arrives, read back from the temporary
file (or the memory copy), so a slow follower makes the proxy hold nothing more.

L{BytesSource} and L{FileSource} stream a stored object (from memory or from its file)
in slices at the client's pace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from aproxy.cache.disk import DiskWriter
from aproxy.cache.store import Meta
from aproxy.client.stages import IAnswerBody, IAnswerSink, IBodyFilter

__all__ = [
    "CHUNK",
    "QUICK_ABORT_MIN",
    "QUICK_ABORT_PCT",
    "BytesSource",
    "FileSource",
    "Fill",
    "FillReader",
    "StoreFilter",
]

# How much of a stored body is read or sent at a time.
CHUNK = 256 * 1024
# Squid's quick_abort defaults: with nobody left to serve, a fetch is finished only when
# less than this is left, or more than this part of it was received.
QUICK_ABORT_MIN = 16 * 1024
QUICK_ABORT_PCT = 0.95


class Fill:
    """
    One response being stored as it arrives (see the module docstring).

    @ivar key: Its primary cache key.
    @ivar meta: What is stored of it besides the body, once its head arrived (its
        C{length} is the announced one, or -1 when the body's length is not known yet).
    @ivar received: Body bytes received so far.
    @ivar complete: The whole body arrived (and was committed, if it could be).
    @ivar failed: The fetch or the store failed: followers are cut short.
    @ivar readers: The followers reading it now.
    @ivar waiting: Followers that arrived before its head: a Deferred each, and the
        function that says whether a head fits them (their C{Vary} variant).
    """

    log = Logger()

    def __init__(self, key: bytes, on_over: Callable[[Fill], None]) -> None:
        self.key = key
        self._on_over = on_over
        self.meta: Meta | None = None
        self.received = 0
        self.complete = False
        self.failed = False
        self.writer: DiskWriter | None = None
        self.memory: list[bytes] | None = None
        self.readers: set[FillReader] = set()
        self.waiting: list[tuple[Deferred[Any], Callable[[Fill], Any]]] = []

    @property
    def over(self) -> bool:
        """Whether it ended (complete or failed)."""
        return self.complete or self.failed

    @property
    def followed(self) -> bool:
        """Whether any client follows it, or waits to."""
        return bool(self.readers or self.waiting)

    def wait(self, fits: Callable[[Fill], Any]) -> Deferred[Any]:
        """
        A follower that arrived before the head: its Deferred fires with what C{fits}
        makes of this fill once the head is known (an answer, or L{None}: go upstream),
        and is dropped from the list if cancelled (its client left).
        """

        def cancel(d: Deferred[Any]) -> None:
            self.waiting = [(w, f) for w, f in self.waiting if w is not d]

        d: Deferred[Any] = Deferred(cancel)
        self.waiting.append((d, fits))
        return d

    def begin(self, meta: Meta, writer: DiskWriter | None, keep_memory: bool) -> None:
        """The head arrived and the response will be stored: followers may start."""
        self.meta = meta
        self.writer = writer
        self.memory = [] if keep_memory else None
        self._wake()

    def give_up(self) -> None:
        """
        It won't be stored after all (the response is not storable, or the fetch ended
        before its head): followers waiting for the head go upstream themselves;
        followers already reading are cut short.
        """
        if self.over:
            return
        self.failed = True
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abort()
        self.memory = None
        self._wake()
        for reader in list(self.readers):
            reader.pump()
        self._on_over(self)

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, fits in waiting:
            d.callback(None if self.failed else fits(self))

    def append(self, data: bytes) -> None:
        """Body bytes: stored, and passed on to the followers."""
        if self.over or not data:
            return
        self.received += len(data)
        if self.writer is not None:
            self.writer.write(data)
            if self.writer.failed and self.memory is None:
                self.log.info("cache: could not write {key} to disk", key=self.key)
                self.give_up()
                return
        if self.memory is not None:
            self.memory.append(data)
        for reader in list(self.readers):
            reader.pump()

    def read(self, fd: int | None, pos: int, size: int) -> bytes:
        """Up to C{size} body bytes from C{pos} (from memory, else from C{fd})."""
        memory = self.memory
        if memory is not None:
            # Few chunks per object: a linear walk is fine.
            at = 0
            for piece in memory:
                if pos < at + len(piece):
                    return piece[pos - at : pos - at + size]
                at += len(piece)
            return b""
        if fd is None:
            return b""
        return os.pread(fd, size, pos)

    def finish(self) -> None:
        """The whole body arrived: the followers are served to the end."""
        if self.over:
            return
        self.complete = True
        for reader in list(self.readers):
            reader.pump()
        self._on_over(self)


@implementer(IBodyFilter)
class StoreFilter:
    """
    The body filter that stores a response: it only observes (the client gets the body
    unchanged, framing included) and commits the object when the body is complete.
    """

    observe_only = True
    log = Logger()

    def __init__(
        self,
        fill: Fill,
        max_object: int,
        commit: Callable[[Fill], None],
    ) -> None:
        self.fill = fill
        self.max_object = max_object
        self._commit = commit

    def data(self, chunk: bytes) -> bytes:
        """A body chunk: stored (until the object grows past the limit)."""
        fill = self.fill
        if not fill.over:
            if fill.received + len(chunk) > self.max_object:
                self.log.info("cache: {key} is larger than --cache-max-object", key=fill.key)
                fill.give_up()
            else:
                fill.append(chunk)
        return chunk

    def end(self) -> bytes:
        """The body is complete: commit it, and finish the followers."""
        fill = self.fill
        if not fill.over:
            self._commit(fill)
        return b""

    def abandoned(self, can_finish: bool) -> bool:
        """
        The client left (or the fetch failed): finish the object for the clients that
        follow it, or when little is left (Squid's quick_abort); otherwise give it up.
        """
        fill = self.fill
        if fill.over:
            return False
        if can_finish:
            if fill.followed:
                return True
            length = fill.meta.length if fill.meta is not None else -1
            if length >= 0 and (
                length - fill.received < QUICK_ABORT_MIN or fill.received > QUICK_ABORT_PCT * length
            ):
                return True
        fill.give_up()
        return False


class _Pump:
    """What the streamed sources share: pausing, stopping, and the sink."""

    sink: Any = None
    paused = False
    stopped = False

    def pauseProducing(self) -> None:
        """The client's buffer is full."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The client's buffer drained: send on."""
        self.paused = False
        if self.sink is not None:
            self.pump()

    def stopProducing(self) -> None:
        """The client is gone: release what is held."""
        if not self.stopped:
            self.stopped = True
            self.release()

    def start(self, sink: IAnswerSink) -> None:
        """Begin sending to C{sink}."""
        self.sink = sink
        self.pump()

    def pump(self) -> None:
        """Send while the client takes it."""
        raise NotImplementedError

    def release(self) -> None:
        """Release what the source holds (a file, a place among followers)."""

    def _done(self) -> None:
        self.stopped = True
        self.release()
        self.sink.answer_done()

    def _failed(self, why: str) -> None:
        self.stopped = True
        self.release()
        self.sink.answer_failed(why)


@implementer(IAnswerBody)
class BytesSource(_Pump):
    """A stored body in memory, sent in slices (so no copy of it waits per client)."""

    def __init__(self, body: bytes) -> None:
        self.view = memoryview(body)
        self.pos = 0

    def pump(self) -> None:
        """Send slices until the client's buffer is full, or the end."""
        view = self.view
        while not self.paused and not self.stopped:
            pos = self.pos
            if pos >= len(view):
                self._done()
                return
            self.pos = pos + CHUNK
            self.sink.answer_data(bytes(view[pos : pos + CHUNK]))


@implementer(IAnswerBody)
class FileSource(_Pump):
    """A stored body in its file, read a slice at a time as the client takes it."""

    def __init__(self, file: BinaryIO, length: int, start: int = 0, end: int | None = None):
        self.file = file
        self.left = (length if end is None else end + 1) - start
        if start:
            file.seek(start)

    def pump(self) -> None:
        """Read and send slices until the client's buffer is full, or the end."""
        while not self.paused and not self.stopped:
            if self.left <= 0:
                self._done()
                return
            try:
                data = self.file.read(min(CHUNK, self.left))
            except OSError as e:
                self._failed(f"the cached object could not be read: {e.strerror}")
                return
            if not data:
                self._failed("the cached object was cut short")
                return
            self.left -= len(data)
            self.sink.answer_data(data)

    def release(self) -> None:
        """Close the file."""
        self.file.close()


@implementer(IAnswerBody)
class FillReader(_Pump):
    """A follower of a L{Fill}: what was received so far, then the rest as it arrives."""

    def __init__(self, fill: Fill) -> None:
        self.fill = fill
        self.pos = 0
        self.fd: int | None = None
        writer = fill.writer
        if writer is not None and fill.memory is None:
            # Opened now, while the temporary file exists: it stays readable through
            # the rename of a commit (and an abort's unlink).
            try:
                self.fd = os.open(writer.path, os.O_RDONLY)
            except OSError:
                self.fd = None
        fill.readers.add(self)

    def pump(self) -> None:
        """Send what was received and not yet sent, while the client takes it."""
        fill = self.fill
        if self.sink is None:
            return
        while not self.paused and not self.stopped:
            if self.pos < fill.received and not fill.failed:
                try:
                    data = fill.read(self.fd, self.pos, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    self._failed("the object being fetched could not be read back")
                    return
                self.pos += len(data)
                self.sink.answer_data(data)
                continue
            if fill.failed:
                self._failed("the fetch this answer followed failed")
            elif fill.complete:
                self._done()
            return

    def release(self) -> None:
        """Leave the fill's followers, and close the file."""
        self.fill.readers.discard(self)
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
