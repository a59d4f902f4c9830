"""
Tests for L{aproxy.client.wire}: immediate sends and tunnel relays that never reorder or lose bytes
and keep flow control.
"""

from __future__ import annotations

from errno import EAGAIN, ECONNRESET, EPIPE
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client import wire
from aproxy.client.tunnel import Tunnel
from aproxy.client.wire import (
    BULK_BUFFER,
    RELAY_READ,
    bulk_reads,
    relay_reads,
    shut_write,
    unrelay_reads,
    write_soon,
)
from aproxy.upstream.protocol import UpstreamProtocol


class FakeSocket:
    """
    A socket whose send() takes at most C{accept} bytes and records them, and whose
    recv_into() hands out the scripted C{incoming} chunks (bytes, or an errno to raise).
    """

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.sent: list[bytes] = []
        self.send_error: int | None = None
        self.incoming: list[bytes | int] = []
        self.asked: list[int] = []

    def send(self, data: Any) -> int:
        """Take up to C{accept} bytes."""
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        taken = bytes(data[: self.accept])
        self.sent.append(taken)
        return len(taken)

    def recv_into(self, buffer: bytearray, nbytes: int = 0) -> int:
        """Copy the next scripted chunk (at most C{nbytes}) into C{buffer}."""
        nbytes = nbytes or len(buffer)
        self.asked.append(nbytes)
        if not self.incoming:
            raise OSError(EAGAIN, "would block")
        item = self.incoming.pop(0)
        if isinstance(item, int):
            raise OSError(item, "recv failed")
        chunk, rest = item[:nbytes], item[nbytes:]
        if rest:
            self.incoming.insert(0, rest)
        buffer[: len(chunk)] = chunk
        return len(chunk)


def tcp_server(
    accept: int, kind: type = tcp.Server, reactor: MemoryReactorClock | None = None
) -> tuple[Any, FakeSocket]:
    """A L{tcp.Server} (or C{kind}) transport around a L{FakeSocket}, without a real fd."""
    sock = FakeSocket(accept)
    transport: Any = object.__new__(kind)
    transport.socket = sock
    transport.reactor = MemoryReactorClock() if reactor is None else reactor
    transport.connected = 1
    transport.disconnecting = 0
    transport._writeDisconnected = False
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.producer = None
    return transport, sock


class WriteSoonTests(SynchronousTestCase):
    """
    write_soon holds bytes for the end of the reactor iteration and then sends them in one
    send() per connection, only when nothing is queued, queuing what the kernel leaves.
    """

    def end_iteration(self, transport: Any) -> None:
        """Run what the reactor runs once the current iteration ends (callLater(0))."""
        transport.reactor.advance(0)

    def test_sent_when_the_iteration_ends(self) -> None:
        """With nothing queued, the bytes go to the socket at the end of the iteration."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"hello")
        self.assertEqual(sock.sent, [])
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"hello"])
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertEqual(transport._tempDataLen, 0)
        self.assertNotIn(transport, transport.reactor.getWriters())

    def test_writes_of_one_iteration_are_one_send(self) -> None:
        """Everything written to a connection in one iteration goes out in order, in one send."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"head ")
        write_soon(transport, b"body")
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"head body"])

    def test_each_connection_sent_once(self) -> None:
        """Two connections written in one iteration get one send each, with one flush call."""
        reactor = MemoryReactorClock()
        one, sock_one = tcp_server(accept=1000, reactor=reactor)
        two, sock_two = tcp_server(accept=1000, reactor=reactor)
        write_soon(one, b"a")
        write_soon(two, b"b")
        write_soon(one, b"c")
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(0)
        self.assertEqual((sock_one.sent, sock_two.sent), ([b"ac"], [b"b"]))
        write_soon(one, b"next")
        self.assertEqual(len(reactor.getDelayedCalls()), 1)

    def test_later_plain_write_keeps_order(self) -> None:
        """A transport.write after held bytes queues behind them; the flush sends both."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"first ")
        transport.write(b"second")
        self.assertEqual(sock.sent, [])
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"first second"])

    def test_partial_send_queues_remainder(self) -> None:
        """What the kernel does not take is queued for the reactor, in order."""
        transport, sock = tcp_server(accept=2)
        write_soon(transport, b"hel")
        write_soon(transport, b"lo")
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"he"])
        self.assertEqual(transport._tempDataBuffer, [b"llo"])
        self.assertIn(transport, transport.reactor.getWriters())

    def test_queued_data_keeps_order(self) -> None:
        """With bytes already queued by the reactor, new bytes are queued behind them."""
        transport, sock = tcp_server(accept=1000)
        transport.write(b"first")
        write_soon(transport, b"second")
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [])
        self.assertEqual(transport._tempDataBuffer, [b"first", b"second"])

    def test_big_write_is_one_send(self) -> None:
        """A chunk above Twisted's 128 KiB SEND_LIMIT still goes in one send() call."""
        transport, sock = tcp_server(accept=1 << 30)
        data = bytes(range(256)) * (BULK_BUFFER // 256)
        self.assertGreater(len(data), tcp.Server.SEND_LIMIT)
        write_soon(transport, data)
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [data])
        self.assertEqual(transport._tempDataBuffer, [])

    def test_send_error_queues_everything(self) -> None:
        """A failing send() loses nothing here: the bytes are queued, and doWrite reports it."""
        transport, sock = tcp_server(accept=1000)
        sock.send_error = EPIPE
        write_soon(transport, b"hello")
        self.end_iteration(transport)
        self.assertEqual(transport._tempDataBuffer, [b"hello"])
        self.assertIn(transport, transport.reactor.getWriters())

    def test_close_after_write(self) -> None:
        """loseConnection after held bytes: they are sent, and the reactor then closes."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"last words")
        transport.loseConnection()
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"last words"])
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertIn(transport, transport.reactor.getWriters())
        self.assertTrue(transport.disconnecting)

    def test_close_after_partial_send(self) -> None:
        """What the kernel leaves of a closing connection's bytes is queued before the close."""
        transport, sock = tcp_server(accept=4)
        write_soon(transport, b"last words")
        transport.loseConnection()
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"last"])
        self.assertEqual(transport._tempDataBuffer, [b" words"])
        self.assertIn(transport, transport.reactor.getWriters())

    def test_half_close_after_write(self) -> None:
        """loseWriteConnection after held bytes: they go out; the reactor then shuts down."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"last words")
        transport.loseWriteConnection()
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [b"last words"])
        self.assertIn(transport, transport.reactor.getWriters())

    def test_reactor_queue_first(self) -> None:
        """With bytes in the reactor's own queue, the flush leaves all to its doWrite, in order."""
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"held")
        transport.dataBuffer = b"older"
        self.end_iteration(transport)
        self.assertEqual(sock.sent, [])
        self.assertEqual(transport._tempDataBuffer, [b"held"])

    def test_half_closing_transport_queues(self) -> None:
        """After loseWriteConnection, bytes are queued behind the pending shutdown."""
        transport, sock = tcp_server(accept=1000)
        transport._writeDisconnecting = True
        write_soon(transport, b"hello")
        self.assertEqual(transport.reactor.getDelayedCalls(), [])
        self.assertEqual(sock.sent, [])
        self.assertEqual(transport._tempDataBuffer, [b"hello"])

    def test_gone_connection_sends_nothing(self) -> None:
        """
        Lost before the iteration ends, write side shut down, or aborted: nothing held is
        sent, and no error (abortConnection drops it as it drops Twisted's own buffer).
        """
        for attribute, value in (
            ("connected", 0),
            ("_writeDisconnected", True),
            ("_aborting", True),
        ):
            transport, sock = tcp_server(accept=1000)
            write_soon(transport, b"hello")
            setattr(transport, attribute, value)
            self.end_iteration(transport)
            self.assertEqual(sock.sent, [], attribute)

    def test_reactors_flush_separately(self) -> None:
        """Bytes held for one reactor never wait on another reactor's iteration."""
        one, sock_one = tcp_server(accept=1000)
        two, sock_two = tcp_server(accept=1000)
        write_soon(one, b"one")
        write_soon(two, b"two")
        two.reactor.advance(0)
        self.assertEqual((sock_one.sent, sock_two.sent), ([], [b"two"]))
        one.reactor.advance(0)
        self.assertEqual(sock_one.sent, [b"one"])

    def test_twisted_buffer_known(self) -> None:
        """This Twisted has the write buffer write_soon appends to (else CI should say so)."""
        self.assertTrue(wire._BUFFER_KNOWN)

    def test_unknown_buffer_writes_plainly(self) -> None:
        """Without the expected buffer attribute nothing is held: an ordinary write."""
        self.patch(wire, "_BUFFER_KNOWN", False)
        transport, sock = tcp_server(accept=1000)
        write_soon(transport, b"hello")
        self.assertEqual(transport.reactor.getDelayedCalls(), [])
        self.assertEqual(transport._tempDataBuffer, [b"hello"])
        self.assertIn(transport, transport.reactor.getWriters())

    def test_started_tls_uses_write(self) -> None:
        """A TCP connection switched to TLS by startTLS gets a write (its TLS layer encrypts)."""
        transport, sock = tcp_server(accept=1000)
        transport.TLS = True
        transport.protocol = tls_layer = StringTransport()  # stands in for TLSMemoryBIOProtocol
        write_soon(transport, b"hello")
        self.assertEqual(sock.sent, [])
        self.assertEqual(tls_layer.value(), b"hello")

    def test_other_transports_use_write(self) -> None:
        """Transports that are not plain TCP connections get an ordinary write."""
        transport = StringTransport()
        write_soon(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class RelayReadsTests(SynchronousTestCase):
    """relay_reads reads into a shared buffer and sends from it, keeping order and limits."""

    def setUp(self) -> None:
        self.source, self.source_sock = tcp_server(accept=1000, kind=tcp.Client)
        self.sink, self.sink_sock = tcp_server(accept=1 << 30)
        self.counts: list[int] = []
        self.assertTrue(relay_reads(self.source, self.sink, self.counts.append))

    def test_chunk_sent_from_buffer(self) -> None:
        """A chunk read goes to the sink's socket in full read size, counted, nothing queued."""
        self.source_sock.incoming.append(b"hello")
        self.assertIsNone(self.source.doRead())
        self.assertEqual(self.source_sock.asked, [RELAY_READ])
        self.assertEqual(self.sink_sock.sent, [b"hello"])
        self.assertEqual(self.sink._tempDataBuffer, [])
        self.assertEqual(self.counts, [5])

    def test_partial_send_remainder_queued_in_order(self) -> None:
        """What the sink's kernel does not take is queued; later chunks queue behind it."""
        self.sink_sock.accept = 2
        self.source_sock.incoming += [b"hello", b"world"]
        self.source.doRead()
        self.source.doRead()
        self.assertEqual(self.sink_sock.sent, [b"he"])
        self.assertEqual(self.sink._tempDataBuffer, [b"llo", b"world"])
        self.assertIsInstance(self.sink._tempDataBuffer[0], bytes)
        self.assertEqual(self.counts, [5, 5])
        self.assertIn(self.sink, self.sink.reactor.getWriters())

    def test_backlogged_sink_limits_read(self) -> None:
        """While the sink has bytes queued, a read takes at most the sink's bufferSize."""
        bulk_reads(self.sink)
        self.sink.write(b"queued")
        self.source_sock.incoming.append(b"x" * (RELAY_READ + 10))
        self.source.doRead()
        self.assertEqual(self.source_sock.asked, [BULK_BUFFER])
        self.assertEqual(self.sink._tempDataLen, len(b"queued") + BULK_BUFFER)
        self.assertEqual(self.sink_sock.sent, [])

    def test_full_sink_pauses_source(self) -> None:
        """Past the sink's bufferSize the source is paused and no longer read by the reactor."""
        bulk_reads(self.sink)
        self.sink_sock.accept = 0
        self.source.startReading()
        self.sink.registerProducer(self.source, True)
        self.source_sock.incoming.append(b"x" * RELAY_READ)
        self.source.doRead()
        self.assertEqual(self.sink._tempDataLen, RELAY_READ)
        self.assertTrue(self.sink.producerPaused)
        self.assertNotIn(self.source, self.source.reactor.getReaders())

    def test_eof_and_errors_as_twisted_reports_them(self) -> None:
        """Nothing to read, end of file and a reset give what tcp.Connection.doRead gives."""
        self.assertIsNone(self.source.doRead())
        self.source_sock.incoming += [b"", ECONNRESET]
        self.assertIs(self.source.doRead(), main.CONNECTION_DONE)
        self.assertIs(self.source.doRead(), main.CONNECTION_LOST)
        self.assertEqual(self.counts, [])

    def test_sink_send_error_queues(self) -> None:
        """A failing send() to the sink queues the chunk for the sink's own doWrite."""
        self.sink_sock.send_error = EPIPE
        self.source_sock.incoming.append(b"hello")
        self.source.doRead()
        self.assertEqual(self.sink._tempDataBuffer, [b"hello"])

    def test_unrelay_restores_do_read(self) -> None:
        """unrelay_reads gives the transport its class's doRead back."""
        unrelay_reads(self.source)
        self.assertNotIn("doRead", vars(self.source))
        self.assertEqual(self.source.doRead.__func__, tcp.Client.doRead)

    def test_other_transports_untouched(self) -> None:
        """With a non-TCP transport on either end (TLS, test doubles) nothing is replaced."""
        other = StringTransport()
        source, _ = tcp_server(accept=1)
        self.assertFalse(relay_reads(source, other, self.counts.append))
        self.assertFalse(relay_reads(other, source, self.counts.append))
        self.assertNotIn("doRead", vars(source))
        unrelay_reads(other)

    def test_started_tls_untouched(self) -> None:
        """A TCP connection switched to TLS by startTLS must not be read past its TLS layer."""
        source, _ = tcp_server(accept=1)
        sink, _ = tcp_server(accept=1)
        sink.TLS = True
        self.assertFalse(relay_reads(source, sink, self.counts.append))
        self.assertFalse(relay_reads(sink, source, self.counts.append))
        self.assertNotIn("doRead", vars(source))
        self.assertNotIn("doRead", vars(sink))


class TunnelRelayTests(SynchronousTestCase):
    """A tunnel between two TCP transports relays through relay_reads and undoes it."""

    def test_relay_installed_counted_and_removed(self) -> None:
        """Both directions relay and count; closing the tunnel restores both doReads."""
        client, client_sock = tcp_server(accept=1 << 30)
        origin, origin_sock = tcp_server(accept=1 << 30, kind=tcp.Client)
        upstream = UpstreamProtocol()
        upstream.transport = origin
        closed: list[Tunnel] = []
        tunnel = Tunnel(client, upstream, Clock(), 60.0, closed.append)
        tunnel.start(b"early", b"")
        origin.reactor.advance(0)  # early data is sent when the reactor iteration ends
        self.assertEqual(origin_sock.sent, [b"early"])
        client_sock.incoming.append(b"ping")
        origin_sock.incoming.append(b"pong!")
        client.doRead()
        origin.doRead()
        self.assertEqual(origin_sock.sent, [b"early", b"ping"])
        self.assertEqual(client_sock.sent, [b"pong!"])
        self.assertEqual((tunnel.to_origin, tunnel.to_client), (9, 5))
        tunnel.close()
        self.assertEqual(closed, [tunnel])
        self.assertNotIn("doRead", vars(client))
        self.assertNotIn("doRead", vars(origin))


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


class _ShutRecorder:
    """Records which way a transport was asked to stop writing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")

    def loseWriteConnection(self) -> None:
        self.calls.append("loseWriteConnection")


class _TLSShutRecorder(TLSMemoryBIOProtocol, _ShutRecorder):
    """A TLS transport (by class) that only records; never connected."""

    def __init__(self) -> None:
        _ShutRecorder.__init__(self)

    def loseConnection(self) -> None:
        _ShutRecorder.loseConnection(self)


class ShutWriteTests(SynchronousTestCase):
    """A half-close passed on: TCP's write shutdown, or TLS's close_notify."""

    def test_tcp_half_close(self) -> None:
        """A plain transport gets loseWriteConnection (a FIN; reading goes on)."""
        transport = _ShutRecorder()
        shut_write(transport)
        self.assertEqual(transport.calls, ["loseWriteConnection"])

    def test_tls_close_notify(self) -> None:
        """
        A TLS transport gets loseConnection (close_notify): a bare FIN under TLS would look
        like a truncation to the peer.
        """
        transport = _TLSShutRecorder()
        shut_write(transport)
        self.assertEqual(transport.calls, ["loseConnection"])
