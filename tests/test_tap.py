"""Tests for the command line (L{aproxy.run.tap}), the configuration and the twistd plugin."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, IServiceMaker
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy import ProxyConfig, makeService
from aproxy.config import listen_description
from aproxy.run.endpoints import public_listeners
from aproxy.run.tap import Options, freeze_startup_heap
from aproxy.run.tap import makeService as tap_make_service


def capture_logs(test: SynchronousTestCase) -> list[Any]:
    """Collect the log events emitted during C{test}."""
    events: list[Any] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def parse(*args: str) -> Options:
    """Parse C{args} as the aproxy command line."""
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """The command line becomes one validated L{ProxyConfig}."""

    def test_defaults(self) -> None:
        """With no options the proxy listens on 127.0.0.1:8080 with the documented values."""
        config = parse()["proxy-config"]
        self.assertEqual(config, ProxyConfig())
        self.assertEqual(config.port, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(
            (
                config.connect_timeout,
                config.read_timeout,
                config.idle_timeout,
                config.header_timeout,
            ),
            (10, 60, 60, 10),
        )
        self.assertEqual((config.via, config.max_head_size), ("aproxy", 65536))

    def test_bare_port_is_loopback(self) -> None:
        """A bare port number listens on the loopback interface only."""
        self.assertEqual(
            parse("--port", "9000")["proxy-config"].port, ("tcp:9000:interface=127.0.0.1",)
        )

    def test_port_repeatable_and_full_descriptions(self) -> None:
        """--port may be given several times, with any endpoint description."""
        config = parse(
            "--port", "9000", "-p", "tcp6:9001:interface=\\:\\:1", "--port", "unix:/tmp/x"
        )["proxy-config"]
        self.assertEqual(
            config.port,
            ("tcp:9000:interface=127.0.0.1", "tcp6:9001:interface=\\:\\:1", "unix:/tmp/x"),
        )

    def test_every_option_reaches_config(self) -> None:
        """Each option sets its ProxyConfig field."""
        config = parse(
            "--connect-timeout",
            "1.5",
            "--read-timeout",
            "2",
            "--idle-timeout",
            "3",
            "--header-timeout",
            "4",
            "--via",
            "edge",
            "--max-head-size",
            "2048",
            "--max-request-line",
            "9000",
            "--pool-size",
            "0",
            "--pool-idle-timeout",
            "5",
            "--connect-ports",
            "443, 8000-8100",
            "--tunnel-idle-timeout",
            "6",
        )["proxy-config"]
        self.assertEqual(
            config,
            ProxyConfig(
                connect_timeout=1.5,
                read_timeout=2,
                idle_timeout=3,
                header_timeout=4,
                via="edge",
                max_head_size=2048,
                max_request_line=9000,
                pool_size=0,
                pool_idle_timeout=5,
                connect_ports=((443, 443), (8000, 8100)),
                tunnel_idle_timeout=6,
            ),
        )

    def test_connect_ports_any(self) -> None:
        """--connect-ports * allows CONNECT to any port."""
        self.assertIsNone(parse("--connect-ports", "*")["proxy-config"].connect_ports)

    def test_http_ports(self) -> None:
        """
        --http-ports defaults to 80, 443 and the unprivileged ports, takes a list of ports
        and ranges, and * for any port.
        """
        self.assertEqual(parse()["proxy-config"].http_ports, ((80, 80), (443, 443), (1025, 65535)))
        self.assertEqual(
            parse("--http-ports", "80,8000-8100")["proxy-config"].http_ports,
            ((80, 80), (8000, 8100)),
        )
        self.assertIsNone(parse("--http-ports", "*")["proxy-config"].http_ports)

    def test_no_via(self) -> None:
        """--no-via turns the Via field off."""
        self.assertIsNone(parse("--no-via")["proxy-config"].via)

    def test_bad_values_are_usage_errors(self) -> None:
        """Bad values give a one-line usage error that names the option."""
        cases = [
            (["--connect-timeout", "-1"], "connect-timeout"),
            (["--read-timeout", "x"], "--read-timeout"),
            (["--max-head-size", "10"], "max-head-size"),
            (["--max-request-line", "100"], "max-request-line"),
            (["--via", "a b"], "via"),
            (["--connect-ports", "443,x"], "connect-ports"),
            (["--connect-ports", "0"], "connect-ports"),
            (["--http-ports", "80,smtp"], "http-ports: 'smtp'"),
            (["--http-ports", "80-70000"], "http-ports"),
            (["--http-ports", ""], "http-ports: empty list"),
            (["--port", "tcp:abc"], "--port: the port 'abc' is not a number in 'tcp:abc'"),
            (["--port", "70000"], "--port"),
            (["--port", "ssl:0:privateKey=/nonexistent/key.pem"], "--port ssl:0"),
        ]
        for args, expected in cases:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_bad_auth_file_is_one_line(self) -> None:
        """An htpasswd line in an unsupported format fails the start naming file and line."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = Path(tmp) / "htpasswd"
        path.write_text("erin:{SHA}ItvNMFPtjBMaa6UFiWT3tF4qy1Y=\nbob:plaintext\n")
        with self.assertRaises(usage.UsageError) as caught:
            parse("--auth", str(path))
        message = str(caught.exception)
        self.assertIn(f"{path}:2", message)
        self.assertNotIn("\n", message)
        with self.assertRaises(usage.UsageError):
            parse("--auth", str(Path(tmp) / "missing"))

    def test_help_documents_every_option(self) -> None:
        """--help text names every option."""
        text = str(Options())
        # Descriptions from opt_* docstrings are folded, not printed with their indentation.
        self.assertIn("With any --allow-host", " ".join(text.split("\n")).replace("  ", " "))
        self.assertNotIn("any         --allow-host", text)
        for name in (
            "--port",
            "--connect-timeout",
            "--read-timeout",
            "--idle-timeout",
            "--header-timeout",
            "--via",
            "--no-via",
            "--max-head-size",
        ):
            self.assertIn(name, text)


class ConfigTests(SynchronousTestCase):
    """L{ProxyConfig} validates itself for embedders too."""

    def test_listen_description(self) -> None:
        """Bare numbers become loopback TCP descriptions; others pass through."""
        self.assertEqual(listen_description(" 80 "), "tcp:80:interface=127.0.0.1")
        self.assertEqual(listen_description("tcp:80"), "tcp:80")
        self.assertRaises(ValueError, listen_description, "")

    def test_invalid_values_raise(self) -> None:
        """Invalid fields raise ValueError at construction."""
        for kwargs in (
            {"read_timeout": 0},
            {"port": ()},
            {"via": "bad via"},
            {"pool_size": -1},
            {"auth_max_failures": -1},
            {"auth_failure_window": 0},
        ):
            self.assertRaises(ValueError, ProxyConfig, **kwargs)

    def test_frozen(self) -> None:
        """A configuration can't be changed after it is built."""
        config = ProxyConfig()
        self.assertRaises(AttributeError, setattr, config, "via", "x")


class ServiceTests(SynchronousTestCase):
    """L{makeService} gives an IService listening on every configured endpoint."""

    def test_one_listener_per_port(self) -> None:
        """Starting the service listens on each port with one shared factory."""
        reactor = MemoryReactor()
        service = makeService(
            ProxyConfig(port=("tcp:8111:interface=127.0.0.1", "tcp:8112:interface=127.0.0.1")),
            reactor,
        )
        self.assertTrue(IService.providedBy(service))
        service.privilegedStartService()
        service.startService()
        self.assertEqual(
            [(p[0], p[3]) for p in reactor.tcpServers], [(8111, "127.0.0.1"), (8112, "127.0.0.1")]
        )
        self.assertIs(reactor.tcpServers[0][1], reactor.tcpServers[1][1])

    def test_listening_addresses_noted_for_loop_checks(self) -> None:
        """The factory learns each address it listens on (for loop detection)."""
        reactor = MemoryReactor()
        service = makeService(ProxyConfig(port=("tcp:8111:interface=127.0.0.1",)), reactor)
        service.privilegedStartService()
        factory = service.factory  # type: ignore[attr-defined]
        self.assertEqual(len(factory.loops.own_addresses), 1)

    def test_public_listeners(self) -> None:
        """Descriptions reachable from other machines are told apart from loopback ones."""
        config = ProxyConfig(
            port=(
                "tcp:1:interface=127.0.0.1",
                "tcp:2",
                "tcp:3:interface=0.0.0.0",
                "tcp6:4:interface=\\:\\:1",
                "unix:/tmp/aproxy.sock",
                "tcp6:5:interface=\\:\\:",
            )
        )
        self.assertEqual(
            public_listeners(config),
            ["tcp:2", "tcp:3:interface=0.0.0.0", "tcp6:5:interface=\\:\\:"],
        )

    def test_warns_when_listening_publicly(self) -> None:
        """Listening beyond loopback without --allow logs a warning at start."""
        events = capture_logs(self)
        makeService(ProxyConfig(port=("tcp:0",)), MemoryReactor())
        self.assertTrue(any("without --allow" in e.get("log_format", "") for e in events))

    def test_warns_about_open_proxy(self) -> None:
        """Allowing every address on a public listener is called an open proxy."""
        events = capture_logs(self)
        makeService(ProxyConfig(port=("tcp:0",), allow=("0.0.0.0/0",)), MemoryReactor())
        self.assertTrue(any("open proxy" in e.get("log_format", "") for e in events))

    def test_no_warning_on_loopback(self) -> None:
        """The default loopback listener logs no exposure warning."""
        events = capture_logs(self)
        makeService(ProxyConfig(port=("tcp:0:interface=127.0.0.1",)), MemoryReactor())
        self.assertFalse(any(e.get("log_level") == LogLevel.warn for e in events))

    def test_warns_about_proxy_protocol_from_without_a_haproxy_port(self) -> None:
        """--proxy-protocol-from with no haproxy: listener has no effect: a warning says so."""
        events = capture_logs(self)
        makeService(
            ProxyConfig(port=("tcp:0:interface=127.0.0.1",), proxy_protocol_from=("10.0.0.0/8",)),
            MemoryReactor(),
        )
        self.assertTrue(
            any("--proxy-protocol-from is set" in e.get("log_format", "") for e in events)
        )

    def test_worker_snapshot_listener_named_for_people(self) -> None:
        """A worker's figures socket logs under a name a person reads, not a class name."""
        from aproxy.observe.cluster import SnapshotFactory

        factory = SnapshotFactory.__new__(SnapshotFactory)
        self.assertNotIn("SnapshotFactory", factory.logPrefix())

    def test_tap_reports_port_in_use_in_one_line(self) -> None:
        """A port that can't be bound ends the start with one line and exit status 1."""
        import socket

        from twisted.internet import reactor  # the real one: bind a real port twice

        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        messages: list[str] = []

        def record(message: str) -> None:
            messages.append(message)
            raise SystemExit(1)

        from aproxy.run.tap import _CommandLineService

        inner = makeService(ProxyConfig(port=(str(port),)), reactor)
        service = _CommandLineService(inner, record)
        with self.assertRaises(SystemExit):
            service.privilegedStartService()
        [message] = messages
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", message)
        self.assertNotIn("\n", message)

    def test_tap_make_service(self) -> None:
        """The twistd entry point builds a service from parsed options."""
        self.assertTrue(IService.providedBy(tap_make_service(parse("--port", "0"))))


class PluginTests(SynchronousTestCase):
    """The twistd plugin is found, in the checkout and after C{pip install .}."""

    def test_plugin_registered(self) -> None:
        """getPlugins(IServiceMaker) offers a maker with tapname aproxy."""
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertIn("aproxy", names)

    def test_port_in_use_exits_with_one_line(self) -> None:
        """twistd aproxy on a port already in use exits non-zero with no traceback."""
        import socket

        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        twistd = Path(sys.executable).with_name("twistd")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [str(twistd), "-n", "--pidfile=", "aproxy", "--port", str(port)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn(f"aproxy: cannot listen on 127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)

    def test_installed_twistd_finds_plugin(self) -> None:
        """A subprocess C{twistd aproxy --help}, run outside the checkout, exits 0."""
        try:
            importlib.metadata.version("aproxy")
        except importlib.metadata.PackageNotFoundError:
            self.fail("aproxy is not installed: run pip install . first (see README)")
        twistd = Path(sys.executable).with_name("twistd")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [str(twistd), "aproxy", "--help"],
                cwd=cwd,
                env=env,
                capture_output=True,
                timeout=60,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"--connect-timeout", result.stdout)


class FreezeTests(SynchronousTestCase):
    """The start-up heap is frozen so full collections don't walk it again."""

    def test_freeze(self) -> None:
        """Everything alive is moved to the permanent generation (and counted)."""
        self.addCleanup(gc.unfreeze)
        count = freeze_startup_heap()
        self.assertGreater(count, 1000)
        # (Frozen objects that die later leave the count, so it can only shrink.)
        self.assertGreater(gc.get_freeze_count(), count // 2)
