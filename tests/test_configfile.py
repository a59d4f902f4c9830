"""The --config TOML file and SIGHUP reloads (L{aproxy.run.configfile}, L{aproxy.run.tap})."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy.errors import Forbidden
from aproxy.run.configfile import ConfigFileError, load_config_file
from aproxy.run.tap import OPTION_KINDS, Options, _CommandLineService, _exit
from aproxy.run.tap import makeService as tap_make_service
from aproxy.run.workers import WorkerPool


class ConfigFileTests(SynchronousTestCase):
    """Keys are the long option names; every mistake is one line naming file and key."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, text: str) -> str:
        """Write C{text} to a config file and return its path."""
        path = self.dir / "aproxy.toml"
        path.write_text(text)
        return str(path)

    def parse(self, *args: str) -> Options:
        """Parse a command line that may name a config file, raising instead of exiting."""
        options = Options()
        options.exit_on_config_error = False
        options.parseOptions(list(args))
        return options

    def test_every_option_has_a_kind(self) -> None:
        """Each long option (except --config itself) can be set in the file."""
        options = Options()
        names = {p[0] for p in options.optParameters} | {f[0] for f in options.optFlags}
        names |= {"port", "allow", "deny-host", "allow-host", "route", "insecure-host"}
        names |= {"proxy-protocol-from", "cache-purge-from", "intercept", "no-intercept"}
        names |= {"pac-direct", "addon", "socks-port"}
        self.assertEqual(names - {"config"}, set(OPTION_KINDS))

    def test_cache_sizes_from_file(self) -> None:
        """A size key takes bytes or text with a unit; anything else is one clear line."""
        path = self.write('cache-memory = "64MiB"\ncache-size = 1048576\ncache-dir = "/tmp/c"\n')
        config = Options()
        config.parseOptions(["--config", path])
        proxy = config["proxy-config"]
        self.assertEqual((proxy.cache_memory, proxy.cache_size), (64 << 20, 1 << 20))
        bad = self.write("cache-size = true\n")
        with self.assertRaises(ConfigFileError) as caught:
            Options().parseOptions(["--config", bad])
        self.assertIn("'cache-size' must be a size", str(caught.exception))
        unit = self.write('cache-size = "1GB"\n')
        with self.assertRaises(usage.UsageError) as refused:
            Options().parseOptions(["--config", unit])
        self.assertIn("cache-size must be a size", str(refused.exception))

    def test_values_from_file(self) -> None:
        """Values of every kind come from the file into ProxyConfig."""
        path = self.write(
            'port = ["tcp:9001:interface=127.0.0.1", 9002]\n'
            'connect-ports = [443, 8443, "9000-9010"]\n'
            'http-ports = [80, "8000-8100"]\n'
            'allow = ["10.0.0.0/8"]\n'
            "read-timeout = 5\n"
            "max-head-size = 4096\n"
            "block-private = true\n"
            'via = "edge"\n'
        )
        config = self.parse("--config", path)["proxy-config"]
        self.assertEqual(
            config.port, ("tcp:9001:interface=127.0.0.1", "tcp:9002:interface=127.0.0.1")
        )
        self.assertEqual(config.connect_ports, ((443, 443), (8443, 8443), (9000, 9010)))
        self.assertEqual(config.http_ports, ((80, 80), (8000, 8100)))
        self.assertEqual(config.allow, ("10.0.0.0/8",))
        self.assertEqual((config.read_timeout, config.max_head_size), (5, 4096))
        self.assertTrue(config.block_private)
        self.assertEqual(config.via, "edge")

    def test_command_line_overrides_file(self) -> None:
        """A command-line value wins; a repeatable option replaces the file's whole list."""
        path = self.write('read-timeout = 5\nallow = ["10.0.0.0/8", "192.168.0.0/16"]\n')
        config = self.parse("--config", path, "--read-timeout", "7", "--allow", "172.16.0.0/12")[
            "proxy-config"
        ]
        self.assertEqual(config.read_timeout, 7)
        self.assertEqual(config.allow, ("172.16.0.0/12",))

    def test_errors_are_one_line(self) -> None:
        """Unknown keys, wrong types, syntax errors and unreadable files name file and key."""
        cases = [
            ("bogus = 1\n", "unknown key 'bogus'"),
            ('read-timeout = "soon"\n', "'read-timeout' must be a number"),
            ("max-head-size = 1.5\n", "'max-head-size' must be a whole number"),
            ('block-private = "yes"\n', "'block-private' must be true or false"),
            ("allow = [1.5]\n", "'allow' must be a list of strings"),
            ("read-timeout = \n", "TOML syntax error"),
            ("[section]\nx = 1\n", "unknown table [section]"),
        ]
        for text, expected in cases:
            path = self.write(text)
            with self.assertRaises(ConfigFileError) as caught:
                self.parse("--config", path)
            message = str(caught.exception)
            self.assertIn(path, message)
            self.assertIn(expected, message)
            self.assertNotIn("\n", message)
        with self.assertRaises(ConfigFileError) as caught:
            load_config_file(str(self.dir / "missing.toml"), OPTION_KINDS)
        self.assertIn("cannot read config file", str(caught.exception))

    def test_syntax_error_names_line(self) -> None:
        """A TOML syntax error says which line."""
        path = self.write('via = "a"\nread-timeout = = 3\n')
        with self.assertRaises(ConfigFileError) as caught:
            self.parse("--config", path)
        self.assertIn("line 2", str(caught.exception))

    def test_bad_file_exits_2(self) -> None:
        """Under twistd a bad config file is one line on stderr and exit status 2."""
        from twisted.application.app import ServerOptions

        path = self.write("bogus = 1\n")
        with self.assertRaises(SystemExit) as caught:
            ServerOptions().parseOptions(["aproxy", "--config", path])
        self.assertEqual(caught.exception.code, 2)

    def test_invalid_value_is_usage_error(self) -> None:
        """A well-typed but invalid value (a negative timeout) fails like the option would."""
        from twisted.python import usage

        path = self.write("read-timeout = -1\n")
        self.assertRaises(usage.UsageError, self.parse, "--config", path)


class ReloadTests(SynchronousTestCase):
    """SIGHUP re-reads the file and applies it to new requests, keeping connections."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = self.dir / "aproxy.toml"

    def service(self, text: str) -> tuple[_CommandLineService, Any]:
        """A command-line service built from a config file with C{text}."""
        self.path.write_text(text)
        options = Options()
        options.parseOptions(["--config", str(self.path), "--port", "tcp:0:interface=127.0.0.1"])
        service = cast(_CommandLineService, tap_make_service(options))
        [inner] = list(service)
        return service, inner.factory

    def test_reload_with_workers_updates_the_parent(self) -> None:
        """
        With --workers, SIGHUP's reload gives the parent the new configuration (for
        /status and the shutdown timeout) with its bound ports kept, and is passed on.
        """
        self.path.write_text('shutdown-timeout = 5\ndeny-host = ["a.example"]\n')
        options = Options()
        options.parseOptions(["--config", str(self.path), "--workers", "2"])
        pool = WorkerPool(options["proxy-config"], options.argv, 2, MemoryReactorClock())
        signalled: list[int] = []
        pool.signal_workers = signalled.append  # type: ignore[method-assign,assignment]
        service = _CommandLineService(pool, _exit, options)
        self.path.write_text(
            "shutdown-timeout = 7\n"
            'deny-host = ["b.example"]\n'
            'port = ["tcp:1:interface=127.0.0.2"]\n'
        )
        service.reload()
        self.assertEqual(pool.config.shutdown_timeout, 7)
        self.assertEqual(pool.config.deny_host, ("b.example",))
        self.assertEqual(pool.config.port, options["proxy-config"].port)
        self.assertEqual(signalled, [signal.SIGHUP])
        self.path.write_text("shutdown-timeout = -1\n")
        service.reload()
        self.assertEqual(pool.config.shutdown_timeout, 7)
        self.assertEqual(signalled, [signal.SIGHUP, signal.SIGHUP])

    def test_reload_applies_new_rules(self) -> None:
        """A changed deny rule applies after reload; the factory and its connections stay."""
        service, factory = self.service('deny-host = ["a.example"]\n')
        self.assertRaises(Forbidden, factory.check_destination, "a.example", 80)
        self.path.write_text('deny-host = ["b.example"]\n')
        service.reload()
        factory.check_destination("a.example", 80)
        self.assertRaises(Forbidden, factory.check_destination, "b.example", 80)
        self.assertEqual(factory.config.deny_host, ("b.example",))

    def test_failed_reload_keeps_running_config(self) -> None:
        """A reload that fails validation keeps the running configuration."""
        service, factory = self.service("read-timeout = 5\n")
        self.path.write_text("read-timeout = -5\n")
        service.reload()
        self.assertEqual(factory.config.read_timeout, 5)
        self.path.write_text("bogus = 1\n")
        service.reload()
        self.assertEqual(factory.config.read_timeout, 5)

    def test_ports_do_not_change_on_reload(self) -> None:
        """Listening ports in a reloaded file are ignored until a restart."""
        service, factory = self.service("read-timeout = 5\n")
        ports = factory.config.port
        self.path.write_text('port = ["tcp:1:interface=127.0.0.1"]\nread-timeout = 6\n')
        service.reload()
        self.assertEqual(factory.config.port, ports)
        self.assertEqual(factory.config.read_timeout, 6)

    def test_service_interfaces(self) -> None:
        """The command-line service is an IService wrapping the proxy service."""
        service, _ = self.service("")
        self.assertTrue(IService.providedBy(service))
        self.assertIs(_exit, service._exit)
