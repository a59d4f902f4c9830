"""--workers: shared listening sockets, restarted workers, signals passed on."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy.tap import Options
from aproxy.workers import listening_socket, worker_count
from tests.processes import free_port, status_of, stop, twistd, wait_for_line

ROOT = Path(__file__).resolve().parent.parent


class WorkerOptionTests(SynchronousTestCase):
    """Parsing --workers and making the shared sockets."""

    def test_worker_count(self) -> None:
        """A whole number, or auto for one per core; anything else is refused."""
        self.assertEqual(worker_count("3"), 3)
        self.assertEqual(worker_count("auto"), os.cpu_count() or 1)
        for bad in ("0", "-1", "x", ""):
            self.assertRaises(ValueError, worker_count, bad)

    def test_option(self) -> None:
        """--workers is parsed; --metrics with workers is refused for now."""
        options = Options()
        options.parseOptions(["--workers", "2"])
        self.assertEqual(options["worker-count"], 2)
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--workers", "2", "--metrics", "9108"]
        )
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--workers", "none"])

    def test_listening_socket(self) -> None:
        """tcp: descriptions become bound, listening, non-blocking sockets; others are refused."""
        sock = listening_socket("tcp:0:interface=127.0.0.1")
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertFalse(sock.getblocking())
        self.assertRaises(ValueError, listening_socket, "unix:/tmp/x.sock")


class WorkerProcessTests(SynchronousTestCase):
    """A real twistd with two workers serves, survives a worker's death and stops cleanly."""

    def test_two_workers(self) -> None:
        """Both workers serve; a killed one is restarted; SIGTERM stops everything with 0."""
        port = free_port()
        args = ["--port", str(port), "--workers", "2", "--deny-host", "blocked.invalid"]
        with tempfile.TemporaryDirectory() as tmp, twistd(args, tmp) as proc:
            out = wait_for_line(proc, b"worker 0 started")
            out += wait_for_line(proc, b"worker 1 started")
            pids = [
                int(line.rsplit(b"pid ", 1)[1])
                for line in out.splitlines()
                if b"started, pid" in line
            ]
            self.assertEqual(len(pids), 2)
            deadline = time.monotonic() + 20
            while True:
                try:
                    status = status_of(port, b"http://blocked.invalid/")
                    break
                except (OSError, IndexError):
                    # The workers adopt the socket a moment after they start.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
            os.kill(pids[0], signal.SIGKILL)
            wait_for_line(proc, b"restarting it")
            wait_for_line(proc, b"worker 0 started")
            for _ in range(10):
                self.assertEqual(
                    status_of(port, b"http://blocked.invalid/"), b"HTTP/1.1 403 Forbidden"
                )
            self.assertEqual(stop(proc, 30), 0)
