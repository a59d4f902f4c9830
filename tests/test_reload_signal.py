"""Signals on a real twistd process: SIGHUP reloads the config file, SIGUSR1 reopens logs."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.loopback import origin
from tests.processes import free_port, status_of, stop, twistd, wait_for_line


class ReloadSignalTests(SynchronousTestCase):
    """A real SIGHUP applies the new file to new requests, even on a kept-alive connection."""

    def test_sighup_reloads_rules(self) -> None:
        """A deny rule removed from the file stops applying after SIGHUP; connections stay."""
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "aproxy.toml"
            config.write_text(f'port = ["{port}"]\ndeny-host = ["blocked.invalid"]\n')
            with twistd(["--config", str(config)], tmp) as proc:
                wait_for_line(proc, b"starting on")
                kept = socket.create_connection(("127.0.0.1", port), timeout=20)
                self.addCleanup(kept.close)
                target = b"http://blocked.invalid/"
                self.assertEqual(status_of(port, target), b"HTTP/1.1 403 Forbidden")
                config.write_text(f'port = ["{port}"]\ndeny-host = ["other.invalid"]\n')
                proc.send_signal(signal.SIGHUP)
                wait_for_line(proc, b"configuration reloaded")
                # A connection opened before the reload was kept, and gets past the rule now
                # (to a DNS failure).
                self.assertEqual(status_of(port, target, kept), b"HTTP/1.1 502 Bad Gateway")
                config.write_text("deny-host = 5\n")
                proc.send_signal(signal.SIGHUP)
                wait_for_line(proc, b"reload failed")
                self.assertEqual(
                    status_of(port, b"http://other.invalid/"), b"HTTP/1.1 403 Forbidden"
                )

    def test_sighup_tightened_rules_reach_pooled_connections(self) -> None:
        """
        After a SIGHUP adds C{block-private} and C{deny-host 127.0.0.0/8}, a request to a
        loopback origin gets 403 although an idle pooled connection to it is open.
        """
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp, origin() as origin_port:
            config = Path(tmp) / "aproxy.toml"
            config.write_text(f'port = ["{port}"]\npool-idle-timeout = 5\n')
            target = f"http://localhost:{origin_port}/".encode()
            with twistd(["--config", str(config)], tmp) as proc:
                wait_for_line(proc, b"starting on")
                self.assertEqual(status_of(port, target), b"HTTP/1.1 200 OK")
                config.write_text(
                    f'port = ["{port}"]\npool-idle-timeout = 5\n'
                    'block-private = true\ndeny-host = ["127.0.0.0/8"]\n'
                )
                proc.send_signal(signal.SIGHUP)
                wait_for_line(proc, b"configuration reloaded")
                self.assertEqual(status_of(port, target), b"HTTP/1.1 403 Forbidden")

    def test_sighup_applies_access_log_and_names_restart_settings(self) -> None:
        """
        A SIGHUP that changes the access log path and format writes the next lines to the
        new file in the new format, and names a changed metrics endpoint in one line as
        needing a restart.
        """
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "aproxy.toml"
            old, new = Path(tmp) / "old.log", Path(tmp) / "new.log"
            base = f'port = ["{port}"]\ndeny-host = ["blocked.invalid"]\n'
            config.write_text(base + f'access-log = "{old}"\n')
            with twistd(["--config", str(config)], tmp) as proc:
                # (Logged once running, after the signal handlers were installed.)
                wait_for_line(proc, b"heap frozen")
                config.write_text(
                    base + f'access-log = "{new}"\naccess-log-format = "json"\n'
                    f'metrics = "{free_port()}"\n'
                )
                proc.send_signal(signal.SIGHUP)
                seen = wait_for_line(proc, b"configuration reloaded")
                self.assertIn(b"need a restart, kept as they run: metrics\n", seen)
                target = b"http://blocked.invalid/after"
                self.assertEqual(status_of(port, target), b"HTTP/1.1 403 Forbidden")
                self.assertEqual(stop(proc), 0)
            self.assertEqual(old.read_text(), "")
            [line] = new.read_text().splitlines()
        self.assertEqual(json.loads(line)["target"], "http://blocked.invalid/after")


class AccessLogSignalTests(SynchronousTestCase):
    """The access log of a real twistd process: JSON lines, reopened on SIGUSR1."""

    def test_access_log_rotation(self) -> None:
        """Lines go to the file; after a rename and SIGUSR1 new lines go to a new file."""
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "access.log"
            args = ["--port", str(port), "--deny-host", "blocked.invalid"]
            args += ["--access-log", str(log), "--access-log-format", "json"]
            with twistd(args, tmp) as proc:
                wait_for_line(proc, b"starting on")
                self.assertEqual(
                    status_of(port, b"http://blocked.invalid/one"), b"HTTP/1.1 403 Forbidden"
                )
                log.rename(Path(tmp) / "access.log.1")
                proc.send_signal(signal.SIGUSR1)
                wait_for_line(proc, b"access log reopened")
                self.assertEqual(
                    status_of(port, b"http://blocked.invalid/two"), b"HTTP/1.1 403 Forbidden"
                )
                self.assertEqual(stop(proc), 0)
            [old] = (Path(tmp) / "access.log.1").read_text().splitlines()
            [new] = log.read_text().splitlines()
        first, second = json.loads(old), json.loads(new)
        self.assertEqual(
            (first["target"], first["status"], first["error"], first["client"]),
            ("http://blocked.invalid/one", 403, "http_request_denied", "127.0.0.1"),
        )
        self.assertEqual(second["target"], "http://blocked.invalid/two")
