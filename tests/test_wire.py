"""Tests for L{aproxy.wire.write_now}: immediate sends that never reorder or lose bytes."""

from __future__ import annotations

from errno import EPIPE
from typing import Any

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from aproxy.wire import BULK_BUFFER, bulk_reads, write_now


class FakeSocket:
    """A socket whose send() takes at most C{accept} bytes and records them."""

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.sent: list[bytes] = []
        self.send_error: int | None = None

    def send(self, data: Any) -> int:
        """Take up to C{accept} bytes."""
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        taken = bytes(data[: self.accept])
        self.sent.append(taken)
        return len(taken)


def tcp_server(accept: int, kind: type = tcp.Server) -> tuple[Any, FakeSocket]:
    """A L{tcp.Server} (or C{kind}) transport around a L{FakeSocket}, without a real fd."""
    sock = FakeSocket(accept)
    transport: Any = object.__new__(kind)
    transport.socket = sock
    transport.reactor = MemoryReactor()
    transport.connected = 1
    transport.disconnecting = 0
    transport._writeDisconnected = False
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.producer = None
    return transport, sock


class WriteNowTests(SynchronousTestCase):
    """write_now sends at once only when nothing is queued, and queues the rest."""

    def test_empty_buffer_sends_immediately(self) -> None:
        """With nothing queued, the bytes go to the socket at once and nothing is queued."""
        transport, sock = tcp_server(accept=1000)
        write_now(transport, b"hello")
        self.assertEqual(sock.sent, [b"hello"])
        self.assertEqual(transport._tempDataBuffer, [])

    def test_partial_send_queues_remainder(self) -> None:
        """What the kernel does not take is queued for the reactor, in order."""
        transport, sock = tcp_server(accept=2)
        write_now(transport, b"hello")
        self.assertEqual(sock.sent, [b"he"])
        self.assertEqual(transport._tempDataBuffer, [b"llo"])

    def test_queued_data_keeps_order(self) -> None:
        """With bytes already queued, new bytes are queued behind them, not sent first."""
        transport, sock = tcp_server(accept=1000)
        transport.write(b"first")
        write_now(transport, b"second")
        self.assertEqual(sock.sent, [])
        self.assertEqual(transport._tempDataBuffer, [b"first", b"second"])

    def test_big_write_is_one_send(self) -> None:
        """A chunk above Twisted's 128 KiB SEND_LIMIT still goes in one send() call."""
        transport, sock = tcp_server(accept=1 << 30)
        data = bytes(range(256)) * (BULK_BUFFER // 256)
        self.assertGreater(len(data), tcp.Server.SEND_LIMIT)
        write_now(transport, data)
        self.assertEqual(sock.sent, [data])
        self.assertEqual(transport._tempDataBuffer, [])

    def test_send_error_queues_everything(self) -> None:
        """A failing send() loses nothing here: the bytes are queued, and doWrite reports it."""
        transport, sock = tcp_server(accept=1000)
        sock.send_error = EPIPE
        write_now(transport, b"hello")
        self.assertEqual(transport._tempDataBuffer, [b"hello"])

    def test_half_closing_transport_queues(self) -> None:
        """After loseWriteConnection, bytes are queued behind the pending shutdown."""
        transport, sock = tcp_server(accept=1000)
        transport._writeDisconnecting = True
        write_now(transport, b"hello")
        self.assertEqual(sock.sent, [])
        self.assertEqual(transport._tempDataBuffer, [b"hello"])

    def test_other_transports_use_write(self) -> None:
        """Transports that are not plain TCP connections get an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class BulkReadTests(SynchronousTestCase):
    """bulk_reads raises a TCP transport's read size and puts it back."""

    def test_raise_and_restore(self) -> None:
        """The read size goes to BULK_BUFFER and back to the class default."""
        transport, _ = tcp_server(accept=1)
        bulk_reads(transport)
        self.assertEqual(transport.bufferSize, BULK_BUFFER)
        bulk_reads(transport, False)
        self.assertEqual(transport.bufferSize, tcp.Server.bufferSize)

    def test_other_transports_untouched(self) -> None:
        """A transport without a read size is left alone."""
        transport = StringTransport()
        bulk_reads(transport)
        self.assertFalse(hasattr(transport, "bufferSize"))
