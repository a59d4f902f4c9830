"""Test doubles shared by the protocol tests: a connector that records dial attempts."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from aproxy.upstream.connector import IUpstreamConnector
from aproxy.upstream.protocol import UpstreamProtocol


class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that records a shutdown of its write side."""

    write_closed = False
    bufferSize = 65536  # noqa: N815 (a TCP transport's read size, named by Twisted)

    def loseWriteConnection(self) -> None:
        """Record that the write side was shut down."""
        self.write_closed = True


@dataclass
class Attempt:
    """One recorded dial: where to, with which factory, and the Deferred to fire."""

    host: str
    port: int
    factory: Factory
    deferred: Deferred[Protocol] = field(default_factory=Deferred)
    transport: HalfCloseTransport | None = None
    protocol: UpstreamProtocol | None = None

    def succeed(self) -> HalfCloseTransport:
        """Complete the connection on a L{StringTransport} and return that transport."""
        proto = self.factory.buildProtocol(None)
        assert isinstance(proto, UpstreamProtocol)
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        self.transport = transport
        self.protocol = proto
        self.deferred.callback(proto)
        return transport

    def respond(self, data: bytes) -> None:
        """Deliver bytes from the origin on the completed connection."""
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def close(self) -> None:
        """The origin closes the connection."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IUpstreamConnector)
class RecordingConnector:
    """An L{IUpstreamConnector} that records each attempt for the test to complete."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, host: str, port: int, factory: Factory) -> Deferred[Protocol]:
        """Record the attempt; the test decides how it ends."""
        attempt = Attempt(host, port, factory)
        self.attempts.append(attempt)
        return attempt.deferred


class BufferingTransport(HalfCloseTransport):
    """
    A L{HalfCloseTransport} whose written bytes count as unsent until L{drain}, pausing a
    registered streaming producer once more than C{bufferSize} of them wait, as a TCP
    transport does with a peer that doesn't read.
    """

    paused_producer = False

    def write(self, data: bytes) -> None:
        """Buffer C{data}; pause the streaming producer once the buffer is over its size."""
        super().write(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.paused_producer
            and len(self.value()) > self.bufferSize
        ):
            self.paused_producer = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer read everything: return it and resume a producer paused for it."""
        data: bytes = self.value()
        self.clear()
        if self.paused_producer:
            self.paused_producer = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data
