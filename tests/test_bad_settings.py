"""
Every bad setting is reported the same way, wherever it comes from: one line naming the
option (and the config file, for a file's value) with "see --help", exit status 2, no
usage text and no traceback; a reload gets the same line as an exception to log.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.application.app import ServerOptions
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy.config import ProxyConfig
from aproxy.run.configfile import ConfigFileError
from aproxy.run.tap import Options
from tests.processes import ROOT, TWISTD

# Command-line mistakes and a text each one-line report must contain.
COMMAND_LINE_CASES = [
    (["--connect-ports", "443,abc"], "--connect-ports"),
    (["--read-timeout", "abc"], "--read-timeout"),
    (["--read-timeout", "-1"], "--read-timeout"),
    (["--read-timeout", "inf"], "--read-timeout"),
    (["--idle-timeout", "nan"], "--idle-timeout"),
    (["--pool-max-age", "0"], "--pool-max-age"),
    (["--auth", "/nonexistent/htpasswd"], "--auth /nonexistent/htpasswd"),
    (["--prot"], "--prot"),
    (["--metrics", "tcp:99999"], "--metrics tcp:99999"),
    (["--port", "tcp:99999"], "--port"),
    (["--metrics", "tcp:abc"], "not a number"),
    (["--workers", "none"], "--workers"),
    (["--via", "a b"], "--via"),
]

# Config file mistakes (values, then types and syntax) and the key each names.
FILE_CASES = [
    ("read-timeout = -1\n", "read-timeout"),
    ("read-timeout = inf\n", "read-timeout"),
    ("shutdown-timeout = nan\n", "shutdown-timeout"),
    ('metrics = "tcp:99999"\n', "metrics"),
    ('connect-ports = "443,abc"\n', "connect-ports"),
    ('auth = "/nonexistent/htpasswd"\n', "auth"),
    ('port = ["tcp:99999"]\n', "port"),
    ('deny-host = ["a b"]\n', "deny-host"),
    ("workers = 0\n", "workers"),
    ('read-timeout = "soon"\n', "read-timeout"),
    ("bogus = 1\n", "bogus"),
    ("read-timeout = = 1\n", "TOML syntax error"),
]


class TwistdParsingTests(SynchronousTestCase):
    """Parsed as twistd parses its subcommand: one line on stderr, then exit 2."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def twistd(self, *args: str) -> str:
        """Parse C{twistd aproxy ARGS}; assert exit status 2 and return the stderr text."""
        with self.assertRaises(SystemExit) as caught:
            ServerOptions().parseOptions(["aproxy", *args])
        self.assertEqual(caught.exception.code, 2)
        return self.stderr.getvalue()

    def assert_one_line(self, text: str, expected: str) -> None:
        """C{text} is one line that names C{expected} and points to --help."""
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("aproxy: "), text)
        self.assertIn(expected, text)
        self.assertTrue(text.endswith(" (see --help)\n"), text)

    def test_command_line_values(self) -> None:
        """Each bad command-line value is one line naming its option, exit status 2."""
        for args, expected in COMMAND_LINE_CASES:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.assert_one_line(self.twistd(*args), expected)

    def test_file_values(self) -> None:
        """Each bad config file value, type or syntax is one line naming file and key."""
        path = self.dir / "aproxy.toml"
        for text, key in FILE_CASES:
            path.write_text(text)
            self.stderr.seek(0)
            self.stderr.truncate()
            report = self.twistd("--config", str(path))
            self.assert_one_line(report, key)
            self.assertTrue(report.startswith(f"aproxy: {path}: "), report)

    def test_command_line_value_not_blamed_on_file(self) -> None:
        """A bad command-line value is not reported as the file's, even with a file."""
        path = self.dir / "aproxy.toml"
        path.write_text("read-timeout = 5\n")
        report = self.twistd("--config", str(path), "--idle-timeout", "-1")
        self.assert_one_line(report, "--idle-timeout")
        self.assertNotIn(str(path), report)

    def test_short_file_name(self) -> None:
        """A file whose name starts an option's name is still named (C{c}: connect-ports)."""
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.dir)
        Path("c").write_text('connect-ports = "443,abc"\n')
        report = self.twistd("--config", "c")
        self.assert_one_line(report, "connect-ports")
        self.assertTrue(report.startswith("aproxy: c: connect-ports: "), report)

    def test_good_options_parse(self) -> None:
        """Good options still parse under twistd (nothing written, no exit)."""
        options = ServerOptions()
        options.parseOptions(["aproxy", "--read-timeout", "5"])
        self.assertEqual(options.subOptions["proxy-config"].read_timeout, 5)
        self.assertEqual(self.stderr.getvalue(), "")


class RaisedErrorTests(SynchronousTestCase):
    """Outside twistd (a reload, an embedder) the same line is raised, not printed."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def test_file_value_error_names_file(self) -> None:
        """A bad value in the file raises a usage error naming the file and the key."""
        path = self.dir / "aproxy.toml"
        path.write_text("read-timeout = -1\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", str(path)])
        self.assertTrue(str(caught.exception).startswith(f"{path}: read-timeout "))

    def test_file_type_error_raised(self) -> None:
        """A type error in the file raises L{ConfigFileError} instead of exiting."""
        path = self.dir / "aproxy.toml"
        path.write_text('read-timeout = "x"\n')
        self.assertRaises(ConfigFileError, Options().parseOptions, ["--config", str(path)])

    def test_unknown_option_raised(self) -> None:
        """An unknown option raises a usage error instead of exiting."""
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--prot"])


class ValidationTests(SynchronousTestCase):
    """L{ProxyConfig} refuses values that used to fail only later, or never."""

    def test_timeouts_must_be_finite(self) -> None:
        """Infinite, nan and negative timeouts are refused, naming the option."""
        for value in (math.inf, math.nan, -1.0, 0):
            with self.assertRaisesRegex(ValueError, "^read-timeout must be a positive, finite"):
                ProxyConfig(read_timeout=value)
            with self.assertRaisesRegex(ValueError, "^tunnel-idle-timeout must be"):
                ProxyConfig(tunnel_idle_timeout=value)

    def test_metrics_port_in_range(self) -> None:
        """A metrics endpoint on a port over 65535 is refused at once."""
        for description in ("tcp:99999", "tcp:port=70000:interface=127.0.0.1"):
            with self.assertRaisesRegex(ValueError, "^metrics: port \\d+ is out of range"):
                ProxyConfig(metrics=description)
        self.assertEqual(ProxyConfig(metrics="tcp:9108").metrics, "tcp:9108")

    def test_port_that_is_not_a_number(self) -> None:
        """A port that is not a number is named, not reported as Python's int() error."""
        with self.assertRaisesRegex(ValueError, "the port 'abc' is not a number"):
            ProxyConfig(metrics="tcp:abc")

    def test_listening_port_in_range(self) -> None:
        """Listening descriptions (TCP, TLS, PROXY protocol) with a port over 65535 fail."""
        for description in (
            "tcp:99999",
            "tcp6:65536",
            "ssl:70000:privateKey=k.pem",
            "haproxy:tcp:99999",
        ):
            with self.assertRaisesRegex(ValueError, "^port: port \\d+ is out of range"):
                ProxyConfig(port=(description,))
        self.assertEqual(ProxyConfig(port=("unix:/tmp/99999",)).port, ("unix:/tmp/99999",))


class ProcessTests(SynchronousTestCase):
    """A real C{twistd aproxy} with a bad setting: one line on stderr, exit status 2."""

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run C{twistd -n aproxy ARGS} from a temporary directory (bounded in time)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with tempfile.TemporaryDirectory() as cwd:
            return subprocess.run(
                [TWISTD, "-n", "--pidfile=", "aproxy", *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

    def assert_reported(self, result: subprocess.CompletedProcess[str], expected: str) -> None:
        """Exit status 2, nothing on stdout, one stderr line naming C{expected}."""
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertEqual(result.stdout, "")
        [line] = result.stderr.splitlines()
        self.assertIn(expected, line)
        self.assertTrue(line.endswith("(see --help)"), line)

    def test_bad_command_line_value(self) -> None:
        """C{--connect-ports 443,abc} and C{--prot}: one line each, exit status 2."""
        self.assert_reported(self.run_twistd("--connect-ports", "443,abc"), "--connect-ports")
        self.assert_reported(self.run_twistd("--prot"), "--prot")

    def test_bad_file_value(self) -> None:
        """C{read-timeout = -1} in the file: one line naming the file and key, status 2."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "aproxy.toml"
            path.write_text("read-timeout = -1\n")
            result = self.run_twistd("--config", str(path))
        self.assert_reported(result, f"{path}: read-timeout")

    def test_metrics_port_out_of_range(self) -> None:
        """C{--metrics tcp:99999} is refused before start, not with a traceback."""
        self.assert_reported(self.run_twistd("--metrics", "tcp:99999"), "--metrics")

    def test_unopenable_access_log(self) -> None:
        """An access log that can't be opened is a bad setting too: one line, status 2."""
        self.assert_reported(
            self.run_twistd("--access-log", "/nonexistent/dir/access.log"), "--access-log"
        )
