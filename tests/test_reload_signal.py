"""SIGHUP on a real twistd process re-reads the config file without dropping connections."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def wait_for_line(proc: subprocess.Popen[bytes], text: bytes, seconds: float = 20) -> bytes:
    """Read the process's output until a line contains C{text} (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen in output:\n{seen.decode(errors='replace')}")


def status_of(port: int, target: bytes, sock: socket.socket | None = None) -> bytes:
    """Send one GET for C{target} (on C{sock} if given, kept open) and return its status line."""
    own = sock is None
    conn = sock or socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        conn.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += conn.recv(65536)
        return head.split(b"\r\n")[0]
    finally:
        if own:
            conn.close()


class ReloadSignalTests(SynchronousTestCase):
    """A real SIGHUP applies the new file to new requests, even on a kept-alive connection."""

    def test_sighup_reloads_rules(self) -> None:
        """A deny rule removed from the file stops applying after SIGHUP; connections stay."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "aproxy.toml"
            config.write_text(f'port = ["{port}"]\ndeny-host = ["blocked.invalid"]\n')
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("twistd")),
                    "-n",
                    "--pidfile=",
                    "aproxy",
                    "--config",
                    str(config),
                ],
                cwd=tmp,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
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
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    if proc.stdout:
                        proc.stdout.close()


class AccessLogSignalTests(SynchronousTestCase):
    """The access log of a real twistd process: JSON lines, reopened on SIGUSR1."""

    def test_access_log_rotation(self) -> None:
        """Lines go to the file; after a rename and SIGUSR1 new lines go to a new file."""
        import json

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "access.log"
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("twistd")),
                    "-n",
                    "--pidfile=",
                    "aproxy",
                    "--port",
                    str(port),
                    "--deny-host",
                    "blocked.invalid",
                    "--access-log",
                    str(log),
                    "--access-log-format",
                    "json",
                ],
                cwd=tmp,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
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
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    if proc.stdout:
                        proc.stdout.close()
            self.assertEqual(proc.returncode, 0)
            [old] = (Path(tmp) / "access.log.1").read_text().splitlines()
            [new] = log.read_text().splitlines()
        first, second = json.loads(old), json.loads(new)
        self.assertEqual(
            (first["target"], first["status"], first["error"], first["client"]),
            ("http://blocked.invalid/one", 403, "http_request_denied", "127.0.0.1"),
        )
        self.assertEqual(second["target"], "http://blocked.invalid/two")
