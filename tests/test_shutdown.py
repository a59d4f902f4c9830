"""Graceful shutdown: stop accepting, close idle connections, let work in flight finish."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aproxy import ProxyConfig, makeService
from tests.processes import free_port, twistd, wait_for_line
from tests.support import GET_A, OK_5, ProxyTestCase


class DrainTests(ProxyTestCase):
    """ProxyFactory.drain closes idle connections and waits for the busy ones."""

    def lose(self, proto: object) -> None:
        """Deliver connectionLost to a protocol whose transport was closed."""
        proto.connectionLost(Failure(Exception("closed")))  # type: ignore[attr-defined]

    def test_nothing_open_fires_at_once(self) -> None:
        """With no connection left, drain fires immediately."""
        self.lose(self.proto)
        self.successResultOf(self.factory.drain(30))

    def test_idle_connection_closed_at_once(self) -> None:
        """An idle keep-alive client is closed at once, and drain fires when it is gone."""
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        d = self.factory.drain(30)
        self.assertTrue(self.client.disconnecting)
        self.assertNoResult(d)
        self.lose(self.proto)
        self.successResultOf(d)

    def test_request_in_flight_finishes(self) -> None:
        """A request in flight gets its whole response, with Connection: close, then a close."""
        attempt, _ = self.forward()
        d = self.factory.drain(30)
        self.assertFalse(self.client.disconnecting)
        attempt.respond(OK_5)
        value = self.client.value()
        self.assertIn(b"Connection: close\r\n", value)
        self.assertTrue(value.endswith(b"hello"))
        self.assertTrue(self.client.disconnecting)
        self.lose(self.proto)
        self.successResultOf(d)

    def test_timeout_aborts_what_is_left(self) -> None:
        """Whatever is still busy when the shutdown timeout ends is closed."""
        self.forward()
        d = self.factory.drain(5)
        self.clock.advance(4)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)
        self.lose(self.proto)
        self.successResultOf(d)

    def test_last_record_before_drain_completes(self) -> None:
        """A client leaving mid-request is reported before the drain completes (log close)."""
        self.forward()
        d = self.factory.drain(30)
        fired_before_record: list[bool] = []
        self.factory.observers.append(lambda record: fired_before_record.append(d.called))
        self.lose(self.proto)
        self.assertEqual(fired_before_record, [False])
        self.successResultOf(d)

    def test_pipelined_request_after_drain_not_started(self) -> None:
        """Once draining, a connection answers what is in flight and reads nothing more."""
        self.proto.dataReceived(GET_A + GET_A)
        attempt = self.connector.attempts[0]
        attempt.succeed()
        self.factory.drain(30)
        attempt.respond(OK_5)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 200 OK"), 1)
        self.assertTrue(self.client.disconnecting)


class ServiceStopTests(SynchronousTestCase):
    """Stopping the service stops listening first, then drains."""

    def test_stop_service_stops_listening_and_drains(self) -> None:
        """stopService closes the listening port and fires once connections are gone."""
        reactor = MemoryReactorClock()
        service = makeService(ProxyConfig(port=("tcp:8111:interface=127.0.0.1",)), reactor)
        service.startService()
        factory = service.factory  # type: ignore[attr-defined]
        d = service.stopService()
        self.successResultOf(d)
        self.assertEqual(len(factory.connections), 0)

    def test_stop_closes_the_disk_cache(self) -> None:
        """The disk store is closed at the end of a stop: its index left checkpointed."""
        reactor = MemoryReactorClock()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        config = ProxyConfig(port=("tcp:8111:interface=127.0.0.1",), cache_dir=directory)
        service = makeService(config, reactor)
        service.startService()
        cache = service.factory.cache  # type: ignore[attr-defined]
        cache.disk.remove(b"http://a.example/")  # (a write, so there is a log to fold in)
        self.successResultOf(service.stopService())
        self.assertFalse(os.path.exists(os.path.join(directory, "index.sqlite3-wal")))
        self.assertEqual(cache.figures()["disk_objects"], 0)  # (closed: no error either)


class SignalTests(SynchronousTestCase):
    """A real twistd process stops on SIGTERM, promptly, with exit status 0."""

    def test_sigterm_with_idle_client_exits_zero_promptly(self) -> None:
        """SIGTERM closes an idle keep-alive client at once and exits 0 well before the timeout."""
        port = free_port()
        args = ["--port", str(port), "--shutdown-timeout", "30"]
        with tempfile.TemporaryDirectory() as cwd, twistd(args, cwd) as proc:
            wait_for_line(proc, b"starting on")
            # An idle keep-alive client: one request answered (by the proxy itself, so the
            # reactor is surely running), the connection kept, nothing in flight.
            client = socket.create_connection(("127.0.0.1", port), timeout=20)
            self.addCleanup(client.close)
            client.sendall(b"OPTIONS http://x/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n\r\n")
            self.assertTrue(client.recv(65536).startswith(b"HTTP/1.1 200 OK"))
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(client.recv(1), b"")  # closed by the proxy
            self.assertEqual(proc.wait(timeout=20), 0)
