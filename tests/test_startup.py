"""
What a user sees when starting aproxy: C{--version}, the start-up log's names for the
listeners, and a checkout that the README's set-up leaves clean.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import aproxy
import twisted
from aproxy import ProxyConfig, makeService
from aproxy.run.tap import Options
from tests.processes import ROOT, TWISTD
from tests.tracking import ConnectionTracking


class VersionTests(SynchronousTestCase):
    """C{twistd aproxy --version} names aproxy's version, not only Twisted's."""

    def test_option_prints_versions_and_exits_0(self) -> None:
        """--version prints aproxy's and Twisted's versions and exits with status 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--version"])
        self.assertEqual(caught.exception.code, 0)
        lines = out.getvalue().splitlines()
        self.assertIn(f"aproxy {aproxy.__version__}", lines)
        self.assertIn(f"Twisted {twisted.__version__}", lines)

    def test_twistd_aproxy_version(self) -> None:
        """A real C{twistd aproxy --version} prints both versions and exits 0."""
        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [TWISTD, "aproxy", "--version"],
                cwd=cwd,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                capture_output=True,
                text=True,
                timeout=60,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"aproxy {aproxy.__version__}\n", result.stdout)
        self.assertIn(f"Twisted {twisted.__version__}\n", result.stdout)


class ListenerLogTests(ConnectionTracking, TestCase):
    """The start-up log names each listener in words a user understands."""

    timeout = 30

    @inlineCallbacks
    def test_metrics_listener_named(self) -> Generator[Any, Any, None]:
        """The metrics port is logged as "metrics and status", not an internal class."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = ProxyConfig(
            port=("tcp:0:interface=127.0.0.1",), metrics="tcp:0:interface=127.0.0.1"
        )
        service = makeService(config, reactor)
        self.track(service.factory)  # type: ignore[attr-defined]
        service.startService()
        yield service.stopService()
        messages = [formatEvent(event) for event in log]
        self.assertTrue(
            any(re.fullmatch(r"metrics and status starting on \d+", m) for m in messages),
            messages,
        )
        self.assertFalse(any("_QuietSite" in m for m in messages), messages)


class CheckoutTests(SynchronousTestCase):
    """The README's set-up commands leave nothing for git to list."""

    def test_readme_virtualenvs_ignored(self) -> None:
        """Every virtualenv directory the README creates is in .gitignore."""
        readme = (ROOT / "README.rst").read_text()
        ignored = (ROOT / ".gitignore").read_text().splitlines()
        made = set(re.findall(r"python3 -m venv (\S+)", readme))
        self.assertTrue(made)
        for name in made:
            self.assertIn(name.rstrip("/") + "/", ignored)
