"""
The options table (L{aproxy.options.OPTIONS}) drives the command line, the config file's
keys and L{ProxyConfig}; L{ProxyConfig} takes the command line's names and value forms,
the old field names still work (deprecated), and a factory alone writes the access log.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from pathlib import Path

from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client.factory import ProxyFactory
from aproxy.config import DEPRECATED_NAMES, ProxyConfig
from aproxy.options import OPTIONS, config_options, option, toml_kinds
from aproxy.run.tap import OPTION_KINDS, Options
from tests.fakes import HalfCloseTransport, RecordingConnector

# Options of the command line alone: no ProxyConfig field of their own.
COMMAND_LINE_ONLY = {"config", "workers", "no-via"}


def parse(*args: str) -> Options:
    """Parse C{args} as C{twistd aproxy} would, raising on a bad value."""
    options = Options()
    options.exit_on_config_error = False
    options.parseOptions(list(args))
    return options


class TableTests(SynchronousTestCase):
    """Every row of the table is an option, a config file key and a ProxyConfig field."""

    def test_rows_are_fields_in_order(self) -> None:
        """The ProxyConfig fields are the table's rows, in the table's order."""
        self.assertEqual(
            [f.name for f in dataclasses.fields(ProxyConfig)],
            [row.field for row in config_options()],
        )
        self.assertEqual({row.name for row in OPTIONS if row.field is None}, COMMAND_LINE_ONLY)
        for row in config_options():
            self.assertEqual(row.field, row.name.replace("-", "_"))

    def test_defaults_agree(self) -> None:
        """
        Each field's default is the row's, and what the command line holds before
        parsing (what --help shows) gives that same default.
        """
        config = ProxyConfig()
        for row in config_options():
            with self.subTest(option=row.name):
                self.assertEqual(getattr(config, row.field or ""), row.default)
                if not row.repeatable:
                    self.assertEqual(row.parse(row.command_line_default), row.default)
        self.assertEqual(parse()["proxy-config"], config)

    def test_every_row_is_an_option(self) -> None:
        """Each row is a long option of C{twistd aproxy}, listed by --help with its text."""
        options = Options()
        text = " ".join(str(options).split())
        for row in OPTIONS:
            with self.subTest(option=row.name):
                self.assertIn(row.name, options.synonyms)
                self.assertIn(f"--{row.name}", text)
                self.assertIn(" ".join(row.help.split()[:6]), text)
        self.assertEqual(options.synonyms["p"], "port")

    def test_every_row_is_a_toml_key(self) -> None:
        """Each row but --config is a config file key, of the row's kind."""
        self.assertEqual(set(toml_kinds()), {row.name for row in OPTIONS} - {"config"})
        self.assertEqual(OPTION_KINDS, toml_kinds())
        for row in OPTIONS:
            if row.kind is not None:
                self.assertEqual(toml_kinds()[row.name], row.kind)

    def test_repeatable_rows_collect(self) -> None:
        """A repeatable option given twice makes a list, which becomes the field."""
        config = parse("--deny-host", "a.example", "--deny-host", "b.example")["proxy-config"]
        self.assertEqual(config.deny_host, ("a.example", "b.example"))
        self.assertEqual(
            parse("-p", "3128")["proxy-config"].port, ("tcp:3128:interface=127.0.0.1",)
        )


class ValueFormTests(SynchronousTestCase):
    """ProxyConfig takes the command line's and the config file's value forms."""

    def test_text_forms(self) -> None:
        """Values written as on the command line coerce like the command line's."""
        config = ProxyConfig(
            connect_ports="443,8443",
            http_ports="80, 8000-8100",
            read_timeout="5",
            max_connections="10",
            port="3128",
            metrics="9108",
            allow="10.0.0.0/8",
        )
        self.assertEqual(config.connect_ports, ((443, 443), (8443, 8443)))
        self.assertEqual(config.http_ports, ((80, 80), (8000, 8100)))
        self.assertEqual(config.read_timeout, 5.0)
        self.assertEqual(config.max_connections, 10)
        self.assertEqual(config.port, ("tcp:3128:interface=127.0.0.1",))
        self.assertEqual(config.metrics, "tcp:9108:interface=127.0.0.1")
        self.assertEqual(config.allow, ("10.0.0.0/8",))
        self.assertIsNone(ProxyConfig(connect_ports="*").connect_ports)

    def test_file_forms(self) -> None:
        """Values written as in the config file (lists, numbers) work too."""
        config = ProxyConfig(
            connect_ports=[443, "8000-8100"],
            allow=["10.0.0.0/8", "192.0.2.1"],
            port=[9001],
            idle_timeout=3,
        )
        self.assertEqual(config.connect_ports, ((443, 443), (8000, 8100)))
        self.assertEqual(config.allow, ("10.0.0.0/8", "192.0.2.1"))
        self.assertEqual(config.port, ("tcp:9001:interface=127.0.0.1",))
        self.assertEqual(config.idle_timeout, 3.0)

    def test_same_config_from_every_source(self) -> None:
        """The same settings give equal configurations from each of the three sources."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        path = directory / "aproxy.toml"
        path.write_text(
            'connect-ports = [443, 8443]\nallow = ["10.0.0.0/8"]\nread-timeout = 5\nno-via = true\n'
        )
        from_file = parse("--config", str(path))["proxy-config"]
        from_command_line = parse(
            "--connect-ports",
            "443,8443",
            "--allow",
            "10.0.0.0/8",
            "--read-timeout",
            "5",
            "--no-via",
        )["proxy-config"]
        embedded = ProxyConfig(
            connect_ports="443,8443", allow="10.0.0.0/8", read_timeout="5", via=None
        )
        self.assertEqual(from_file, embedded)
        self.assertEqual(from_command_line, embedded)

    def test_wrong_values(self) -> None:
        """A wrong value is one ValueError line that names the option and the value."""
        cases: list[tuple[dict[str, object], str, str]] = [
            ({"connect_ports": "443,abc"}, "connect-ports", "abc"),
            ({"connect_ports": ((443, 70000),)}, "connect-ports", "70000"),
            ({"read_timeout": "soon"}, "read-timeout", "soon"),
            ({"read_timeout": True}, "read-timeout", "True"),
            ({"max_connections": 0}, "max-connections", "0"),
            ({"max_head_size": "10"}, "max-head-size", "10"),
            ({"block_private": "yes"}, "block-private", "yes"),
            ({"allow": ["nonsense"]}, "allow", "nonsense"),
            ({"allow": 10}, "allow", "10"),
            ({"via": "a b"}, "via", "a b"),
            ({"x_forwarded_for": "maybe"}, "x-forwarded-for", "maybe"),
            ({"access_log_format": "xml"}, "access-log-format", "xml"),
            ({"port": "tcp:99999"}, "port", "99999"),
            ({"route": "nonsense"}, "route", "nonsense"),
            ({"insecure_host": "*"}, "insecure-host", "*"),
            ({"auth_realm": ""}, "auth-realm", "''"),
        ]
        for kwargs, name, value in cases:
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(ValueError) as caught:
                    ProxyConfig(**kwargs)
                message = str(caught.exception)
                self.assertTrue(message.startswith(name), message)
                self.assertIn(value, message)
                self.assertNotIn("\n", message)

    def test_unknown_field(self) -> None:
        """An unknown field name is a TypeError, as for any function."""
        self.assertRaises(TypeError, ProxyConfig, read_timout=5)


class DeprecatedNameTests(SynchronousTestCase):
    """The field names before the table still work for one release, with a warning."""

    def test_old_keywords_warn(self) -> None:
        """Each old keyword sets the new field and warns, naming the new name."""
        values = {
            "ports": ("tcp:3128",),
            "deny_hosts": ("a.example",),
            "allow_hosts": ("b.example",),
            "auth_file": "/etc/aproxy/htpasswd",
            "routes": ("a.example=direct",),
            "insecure_hosts": ("self-signed.example",),
        }
        self.assertEqual(set(values), set(DEPRECATED_NAMES))
        for old, value in values.items():
            new = DEPRECATED_NAMES[old]
            with self.subTest(old=old), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = ProxyConfig(**{old: value})
                self.assertEqual(getattr(config, new), ProxyConfig(**{new: value}).__dict__[new])
                [warning] = caught
                self.assertIs(warning.category, DeprecationWarning)
                self.assertIn(repr(new), str(warning.message))
                self.assertEqual(warning.filename, __file__)

    def test_old_attributes_warn(self) -> None:
        """Reading an old name gives the new field's value, with a warning."""
        config = ProxyConfig(deny_host=("a.example",))
        for old, new in DEPRECATED_NAMES.items():
            with self.subTest(old=old), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.assertEqual(getattr(config, old), getattr(config, new))
                [warning] = caught
                self.assertIs(warning.category, DeprecationWarning)
                self.assertIn(repr(new), str(warning.message))

    def test_both_names(self) -> None:
        """A field given under both names is a TypeError, not a silent choice."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.assertRaises(TypeError, ProxyConfig, ports=("tcp:1",), port=("tcp:2",))

    def test_new_names_do_not_warn(self) -> None:
        """The new names and the command line give no warning."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ProxyConfig(port=("tcp:3128",), deny_host=("a.example",))
            parse("--deny-host", "a.example")


class FactoryAloneTests(SynchronousTestCase):
    """A ProxyFactory used without makeService honours the per-request fields."""

    def test_access_log_written(self) -> None:
        """ProxyFactory(ProxyConfig(access_log=PATH)) alone logs each request."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        path = directory / "access.log"
        clock = MemoryReactorClock()
        factory = ProxyFactory(
            ProxyConfig(access_log=str(path), access_log_format="squid"),
            clock,
            RecordingConnector(),
        )
        assert factory.access_log is not None
        self.addCleanup(factory.access_log.close)
        self.assertIn(factory.access_log, factory.observers)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        # Port 25 is outside --http-ports: answered (403) and logged without any origin.
        proto.dataReceived(b"GET http://a.example:25/ HTTP/1.1\r\nHost: a.example:25\r\n\r\n")
        self.assertIn(b" 403 ", client.value())
        clock.advance(1)
        [line] = path.read_text().splitlines()
        self.assertIn("http://a.example:25/", line)
        self.assertIn("/403 ", line)

    def test_reconfigure_swaps_access_log(self) -> None:
        """A factory's reload opens a changed access log and closes the old one."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        factory = ProxyFactory(
            ProxyConfig(access_log=str(directory / "a.log")), MemoryReactorClock()
        )
        first = factory.access_log
        factory.reconfigure(ProxyConfig(access_log=str(directory / "b.log")))
        assert factory.access_log is not None
        self.addCleanup(factory.access_log.close)
        self.assertIsNot(factory.access_log, first)
        self.assertEqual(factory.observers, [factory.access_log])
        factory.reconfigure(ProxyConfig())
        self.assertIsNone(factory.access_log)
        self.assertEqual(factory.observers, [])

    def test_option_lookup(self) -> None:
        """L{option} finds a row by its long name."""
        self.assertEqual(option("deny-host").field, "deny_host")


class ReadmeExampleTests(SynchronousTestCase):
    """The README's embedding example runs as written, with no deprecation warning."""

    def test_embedding_example(self) -> None:
        """
        The example (its access log moved to a temporary directory, its endpoint a
        recording stand-in) builds a service and a factory with the settings it names.
        """
        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
        section = readme.split("\nEmbedding\n---------\n", 1)[1]
        block = section.split("::\n\n", 1)[1].split("\n\n``ProxyConfig``", 1)[0]
        code = "\n".join(line.removeprefix("    ") for line in block.splitlines())
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        code = code.replace("/var/log/aproxy/access.log", str(directory / "access.log"))
        listened: list[ProxyFactory] = []

        class Endpoint:
            def listen(self, factory: ProxyFactory) -> None:
                listened.append(factory)

        namespace: dict[str, object] = {"endpoint": Endpoint()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            exec(compile(code, "README.rst", "exec"), namespace)
        [factory] = listened
        assert factory.access_log is not None
        self.addCleanup(factory.access_log.close)
        config = namespace["config"]
        assert isinstance(config, ProxyConfig)
        self.assertEqual(config.connect_ports, ((443, 443), (8443, 8443)))
        self.assertEqual(config.port, ("tcp:3128:interface=127.0.0.1",))
        [proxy] = list(IService(namespace["application"]))  # type: ignore[call-overload]
        self.addCleanup(proxy.factory.access_log.close)
        self.assertEqual(proxy.factory.config, config)
