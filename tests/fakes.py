"""
Test doubles shared by the protocol tests: a transport with TCP-like write buffering. The
recording connector and its transports are public in L{aproxy.testing} (re-exported here
for older imports).
"""

from __future__ import annotations

from aproxy.testing import Attempt, HalfCloseTransport, RecordingConnector

__all__ = ["Attempt", "BufferingTransport", "HalfCloseTransport", "RecordingConnector"]


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
