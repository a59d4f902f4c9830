"""
What a reload (SIGHUP) applies and what it keeps: pool limits, the response head limit and
the access log take effect; ports, the metrics endpoint and C{--workers} need a restart,
are named in one log line and keep their running values, so that C{/status} (which shows
the factory's configuration) shows what is in force.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.run.service import ProxyService, makeService, restart_settings
from aproxy.run.tap import Options, _CommandLineService
from aproxy.run.tap import makeService as tap_make_service
from aproxy.testing import HalfCloseTransport, RecordingConnector

DENIED = b"GET http://denied.example/ HTTP/1.1\r\nHost: denied.example\r\n\r\n"
GET_A = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"


def capture_logs(test: SynchronousTestCase) -> list[dict[str, Any]]:
    """Collect the log events emitted during C{test}."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def messages(events: list[dict[str, Any]]) -> list[str]:
    """The formatted text of C{events}."""
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


def close_access_log(service: Any) -> None:
    """Close the access log C{service} has at the end of a test, if any."""
    if service.access_log is not None:
        service.access_log.close()


def client_request(factory: ProxyFactory, data: bytes) -> HalfCloseTransport:
    """A new client connection to C{factory} that sends C{data}."""
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    proto.makeConnection(client)
    proto.dataReceived(data)
    return client


class ServiceReconfigureTests(SynchronousTestCase):
    """L{ProxyService.reconfigure} applies what a running proxy can change."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.clock = MemoryReactorClock()

    def service(self, **kwargs: Any) -> ProxyService:
        """A proxy service (not started) on the fake clock, with a deny rule for logs."""
        config = ProxyConfig(port=("tcp:0:interface=127.0.0.1",), **kwargs)
        service = cast(ProxyService, makeService(config, self.clock))
        self.addCleanup(close_access_log, service)
        return service

    def test_access_log_replaced(self) -> None:
        """A new access log path and format take effect; the old file is closed."""
        old, new = self.dir / "old.log", self.dir / "new.log"
        service = self.service(access_log=str(old), deny_host=("denied.example",))
        first = service.access_log
        assert first is not None
        config = replace_config(
            service, access_log=str(new), access_log_format="json", deny_host=("denied.example",)
        )
        service.reconfigure(config)
        self.assertIsNot(service.access_log, first)
        self.assertNotIn(first, service.factory.observers)
        client_request(service.factory, DENIED)
        self.clock.advance(1)
        self.assertEqual(old.read_text(), "")
        [line] = new.read_text().splitlines()
        self.assertEqual(json.loads(line)["status"], 403)
        self.assertEqual(service.factory.config.access_log_format, "json")

    def test_access_log_added_and_removed(self) -> None:
        """A reload can turn the access log on, and off again."""
        path = self.dir / "access.log"
        service = self.service(deny_host=("denied.example",))
        service.reconfigure(
            replace_config(service, access_log=str(path), deny_host=("denied.example",))
        )
        client_request(service.factory, DENIED)
        self.clock.advance(1)
        self.assertEqual(len(path.read_text().splitlines()), 1)
        log = service.access_log
        service.reconfigure(replace_config(service, deny_host=("denied.example",)))
        self.assertIsNone(service.access_log)
        self.assertNotIn(log, service.factory.observers)
        client_request(service.factory, DENIED)
        self.clock.advance(1)
        self.assertEqual(len(path.read_text().splitlines()), 1)

    def test_unusable_access_log_changes_nothing(self) -> None:
        """An access log that can't be opened fails the reload; everything stays."""
        path = self.dir / "access.log"
        service = self.service(access_log=str(path), read_timeout=5)
        log = service.access_log
        bad = replace_config(service, access_log=str(self.dir / "no" / "such.log"), read_timeout=6)
        self.assertRaises(ValueError, service.reconfigure, bad)
        self.assertIs(service.access_log, log)
        self.assertEqual(service.factory.config.read_timeout, 5)
        self.assertEqual(service.factory.observers, [log])

    def test_restart_settings_keep_running_values(self) -> None:
        """Ports and the metrics endpoint keep their running values in the config shown."""
        service = self.service(metrics="tcp:9108:interface=127.0.0.1")
        running = service.factory.config
        new = ProxyConfig(
            port=("tcp:1:interface=127.0.0.1",), metrics="tcp:9109:interface=127.0.0.1"
        )
        self.assertEqual(restart_settings(running, new), ["port", "metrics"])
        in_force = service.reconfigure(new)
        self.assertEqual((in_force.port, in_force.metrics), (running.port, running.metrics))
        self.assertEqual(service.factory.config, in_force)

    def test_cache_settings_need_a_restart(self) -> None:
        """The cache's settings are named as needing a restart and keep their running values."""
        service = self.service()
        running = service.factory.config
        new = replace_config(service, cache_memory="1MiB", cache_size="2MiB", cache_dir="/x")
        self.assertEqual(
            restart_settings(running, new), ["cache-memory", "cache-dir", "cache-size"]
        )
        in_force = service.reconfigure(new)
        self.assertEqual((in_force.cache_memory, in_force.cache_dir), (None, None))
        self.assertEqual(in_force.cache_size, running.cache_size)


def replace_config(service: ProxyService, **kwargs: Any) -> ProxyConfig:
    """A config with the service's ports and the given fields (others default)."""
    return ProxyConfig(port=service.factory.config.port, **kwargs)


class FactoryReconfigureTests(SynchronousTestCase):
    """Pool limits and the response head limit apply to new work after a reload."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(ProxyConfig(), self.clock, self.connector)

    def pooled(self, count: int) -> list[HalfCloseTransport]:
        """Serve C{count} requests to a.example at once, then return each connection."""
        clients = [client_request(self.factory, GET_A) for _ in range(count)]
        transports = []
        for attempt in self.connector.attempts[-count:]:
            transports.append(attempt.succeed())
        for attempt in self.connector.attempts[-count:]:
            attempt.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        for client in clients:
            self.assertTrue(client.value().startswith(b"HTTP/1.1 200 "))
        return transports

    def test_pool_size_applies(self) -> None:
        """A smaller pool size from a reload closes the connections over it."""
        first = self.pooled(3)
        self.assertEqual(len(self.factory.pool), 3)
        self.factory.reconfigure(ProxyConfig(pool_size=1))
        self.assertEqual(len(self.factory.pool), 1)
        self.assertEqual([t.disconnecting for t in first], [True, True, False])

    def test_pool_idle_timeout_applies(self) -> None:
        """A shorter idle timeout from a reload closes idle connections that much sooner."""
        [transport] = self.pooled(1)
        self.factory.reconfigure(ProxyConfig(pool_idle_timeout=2))
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.factory.pool), 0)

    def test_response_head_limit_applies_to_new_connections(self) -> None:
        """A smaller C{max-head-size} from a reload limits responses on new connections."""
        self.factory.reconfigure(ProxyConfig(max_head_size=2048))
        client = client_request(self.factory, GET_A)
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 3000 + b"\r\nContent-Length: 0\r\n\r\n"
        attempt.respond(head)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "), client.value())


class CommandLineReloadTests(SynchronousTestCase):
    """The SIGHUP handler: one line for the settings that need a restart."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = self.dir / "aproxy.toml"

    def service(self, text: str) -> tuple[_CommandLineService, ProxyFactory]:
        """A command-line service (not started) from a config file with C{text}."""
        self.path.write_text(text)
        options = Options()
        options.parseOptions(["--config", str(self.path)])
        service = cast(_CommandLineService, tap_make_service(options))
        [inner] = list(service)
        self.addCleanup(close_access_log, inner)
        return service, inner.factory

    def test_restart_settings_named_in_one_line(self) -> None:
        """
        Changed ports, metrics endpoint and worker count are named in one warning and
        keep their running values; the rest of the file is applied.
        """
        service, factory = self.service(
            'port = ["tcp:0:interface=127.0.0.1"]\nmetrics = "tcp:0:interface=127.0.0.1"\n'
        )
        running = factory.config
        self.path.write_text(
            'port = ["tcp:1:interface=127.0.0.1"]\nmetrics = "tcp:2:interface=127.0.0.1"\n'
            "workers = 2\npool-size = 7\n"
        )
        events = capture_logs(self)
        service.reload()
        text = messages(events)
        restart = [m for m in text if "need a restart" in m]
        self.assertEqual(
            restart,
            ["changed settings that need a restart, kept as they run: port, metrics, workers"],
        )
        self.assertIn("configuration reloaded", text)
        self.assertEqual(
            (factory.config.port, factory.config.metrics), (running.port, running.metrics)
        )
        self.assertEqual(factory.config.pool_size, 7)

    def test_no_restart_line_when_nothing_fixed_changed(self) -> None:
        """A reload that changes only reloadable settings logs no restart line."""
        service, factory = self.service('port = ["tcp:0:interface=127.0.0.1"]\n')
        self.path.write_text('port = ["tcp:0:interface=127.0.0.1"]\npool-idle-timeout = 3\n')
        events = capture_logs(self)
        service.reload()
        self.assertFalse([m for m in messages(events) if "restart" in m])
        self.assertEqual(factory.config.pool_idle_timeout, 3)

    def test_access_log_reloaded(self) -> None:
        """A reload through the command line opens the new access log."""
        log = self.dir / "access.log"
        service, factory = self.service('port = ["tcp:0:interface=127.0.0.1"]\n')
        self.path.write_text(
            f'port = ["tcp:0:interface=127.0.0.1"]\naccess-log = "{log}"\n'
            'access-log-format = "squid"\n'
        )
        service.reload()
        [inner] = list(service)
        self.assertEqual(inner.access_log.path, str(log))
        self.assertEqual(inner.access_log.fmt, "squid")
        self.assertIn(inner.access_log, factory.observers)
        self.assertTrue(log.exists())

    def test_failed_reload_names_file_and_key(self) -> None:
        """A bad value in the reloaded file is logged in one line naming file and key."""
        service, factory = self.service('port = ["tcp:0:interface=127.0.0.1"]\n')
        self.path.write_text('port = ["tcp:0:interface=127.0.0.1"]\nread-timeout = -1\n')
        events = capture_logs(self)
        service.reload()
        [failed] = [m for m in messages(events) if "reload failed" in m]
        self.assertIn(f"configuration: {self.path}: read-timeout must be", failed)
        self.assertNotIn("\n", failed)
        self.assertEqual(factory.config.read_timeout, 60)
