"""--workers: shared listening sockets, restarted workers, signals passed on, summed metrics."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aproxy.config import ProxyConfig
from aproxy.observe.cluster import Family, Snapshot
from aproxy.run.tap import Options
from aproxy.run.worker import stop_once_on_signals
from aproxy.run.workers import WorkerPool, listening_socket, parse_worker_args, worker_count
from tests.processes import free_port, status_of, stop, twistd, wait_for_line
from tests.support import SpawningReactor

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
        """--workers is parsed, and may be combined with --metrics."""
        options = Options()
        options.parseOptions(["--workers", "2"])
        self.assertEqual(options["worker-count"], 2)
        options = Options()
        options.parseOptions(["--workers", "2", "--metrics", "9108"])
        self.assertEqual(options["proxy-config"].metrics, "tcp:9108:interface=127.0.0.1")
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--workers", "none"])

    def test_listening_socket(self) -> None:
        """tcp: descriptions become bound, listening, non-blocking sockets; others are refused."""
        sock = listening_socket("tcp:0:interface=127.0.0.1")
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertFalse(sock.getblocking())
        self.assertRaises(ValueError, listening_socket, "unix:/tmp/x.sock")


class WorkerArgsTests(SynchronousTestCase):
    """What the parent tells a worker on its command line."""

    def test_parse(self) -> None:
        """Sockets, the snapshot path and own addresses (IPv6 too) are told apart."""
        fds, snapshot, own = parse_worker_args(
            ["3:2", "4:10", "snapshot=/tmp/d/w0-1.sock", "own=127.0.0.1:9108", "own=::1:9109"]
        )
        self.assertEqual(fds, [(3, 2), (4, 10)])
        self.assertEqual(snapshot, "/tmp/d/w0-1.sock")
        self.assertEqual(
            [(a.host, a.port) for a in own],  # type: ignore[attr-defined]
            [("127.0.0.1", 9108), ("::1", 9109)],
        )

    def test_own_address_is_a_loop(self) -> None:
        """A worker told about the parent's metrics address refuses it as its own."""
        from aproxy.run.service import adopted_service

        _, _, own = parse_worker_args(["own=127.0.0.1:9108"])
        service = adopted_service(ProxyConfig(), [], Clock(), own=own)
        factory = service.factory  # type: ignore[attr-defined]
        self.assertTrue(factory.loops.is_own("127.0.0.1", 9108))
        self.assertFalse(factory.loops.is_own("127.0.0.1", 9109))


class WorkerPoolMetricsTests(SynchronousTestCase):
    """The parent's side of --metrics with --workers, without processes."""

    def test_wiring(self) -> None:
        """
        Workers are told their snapshot socket and the metrics address; a worker that
        ends is retired from the totals and its socket removed; stopping removes the
        private directory.
        """
        reactor = SpawningReactor()
        config = ProxyConfig(
            port=("tcp:0:interface=127.0.0.1",), metrics="tcp:9108:interface=127.0.0.1"
        )
        pool = WorkerPool(config, ["--metrics", "9108"], 2, reactor)
        pool.startService()
        assert pool.metrics is not None
        directory = Path(pool.metrics.directory)
        self.assertEqual(directory.stat().st_mode & 0o777, 0o700)
        [(first, args), (_, other)] = reactor.spawned
        self.assertIn(f"snapshot={directory}/worker0-1.sock", args)
        self.assertIn(f"snapshot={directory}/worker1-2.sock", other)
        # The memory reactor listens on 0.0.0.0 whatever it is asked.
        self.assertIn("own=0.0.0.0:9108", args)
        self.assertEqual(args[args.index("--") + 1 :], ["--metrics", "9108"])

        requests = Family("aproxy_requests", "counter", "", {("aproxy_requests_total", ()): 3.0})
        pool.metrics.totals.update(first, Snapshot(1, (requests,), ()))
        Path(first.snapshot_path).touch()
        first.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.assertFalse(Path(first.snapshot_path).exists())
        self.assertEqual(pool.metrics.totals.live, 0)
        self.assertEqual(pool.metrics.totals.value("aproxy_requests_total"), 3.0)
        reactor.advance(1)
        self.assertIn(f"snapshot={directory}/worker0-3.sock", reactor.spawned[-1][1])

        stopped = pool.stopService()
        for worker, _ in reactor.spawned[1:]:
            self.assertEqual(worker.transport.signals, [signal.SIGTERM])
            worker.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertFalse(directory.exists())
        self.assertEqual(pool.sockets, [])


class WorkerSocketTests(SynchronousTestCase):
    """Each worker gets its own SO_REUSEPORT socket on the shared port."""

    def test_one_socket_per_worker(self) -> None:
        """
        Two workers get two different listening sockets bound to the same port (an
        ephemeral one here), so the kernel spreads connections evenly; stopping closes
        them.
        """
        if not hasattr(socket, "SO_REUSEPORT"):
            self.skipTest("no SO_REUSEPORT here")
        reactor = SpawningReactor()
        config = ProxyConfig(port=("tcp:0:interface=127.0.0.1",))
        pool = WorkerPool(config, [], 2, reactor)
        pool.startService()
        fds = [child[3] for child in reactor.child_fds]
        self.assertEqual(len(set(fds)), 2)
        by_fd = {sock.fileno(): sock for sock in pool.sockets}
        names = {by_fd[fd].getsockname() for fd in fds}
        self.assertEqual(len(names), 1)
        [(host, port)] = names
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        for fd in fds:
            self.assertEqual(by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        stopped = pool.stopService()
        for worker, _ in reactor.spawned:
            worker.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertEqual(pool.sockets, [])
        self.assertTrue(all(sock.fileno() == -1 for sock in by_fd.values()))

    def test_restarted_worker_gets_the_same_socket(self) -> None:
        """A worker started again after a death adopts the socket its predecessor had."""
        if not hasattr(socket, "SO_REUSEPORT"):
            self.skipTest("no SO_REUSEPORT here")
        reactor = SpawningReactor()
        pool = WorkerPool(ProxyConfig(port=("tcp:0:interface=127.0.0.1",)), [], 2, reactor)
        pool.startService()
        for sock in pool.sockets:
            self.addCleanup(sock.close)
        first = reactor.spawned[0][0]
        first.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        reactor.advance(1)
        self.assertEqual(reactor.child_fds[-1][3], reactor.child_fds[0][3])


class WorkerProcessTests(SynchronousTestCase):
    """A real twistd with two workers serves, survives a worker's death and stops cleanly."""

    def test_two_workers(self) -> None:
        """Both workers serve; a killed one is restarted; SIGTERM stops everything with 0."""
        port = free_port()
        args = ["--port", str(port), "--workers", "2", "--deny-host", "blocked.invalid"]
        with tempfile.TemporaryDirectory() as tmp, twistd(args, tmp) as proc:
            out = wait_for_line(proc, b"worker 0 started")
            out += wait_for_line(proc, b"worker 1 started")
            pids = pids_in(out, b"started, pid")
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

    def test_group_signal(self) -> None:
        """
        SIGTERM to the parent and to each worker at once (as when the process group is
        signalled) stops everything with status 0 and no traceback: a worker stops on
        the first signal and ignores the one the parent passes on.
        """
        port = free_port()
        args = ["--port", str(port), "--workers", "2"]
        with tempfile.TemporaryDirectory() as tmp, twistd(args, tmp) as proc:
            out = wait_for_line(proc, b"worker running")
            out += wait_for_line(proc, b"worker running")
            pids = pids_in(out, b"worker running, pid")
            self.assertEqual(len(pids), 2)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout is not None
            rest, _ = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 0)
            self.assertNotIn(b"Traceback", rest)
            self.assertIn(b"worker stopping (SIGTERM)", rest)


def pids_in(out: bytes, marker: bytes) -> list[int]:
    """The process ids at the end of the output lines that contain C{marker}."""
    return [int(line.rsplit(b"pid ", 1)[1]) for line in out.splitlines() if marker in line]


def get(port: int, path: bytes) -> bytes:
    """GET C{path} from 127.0.0.1:C{port}; the whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def requests_total(metrics_port: int) -> float | None:
    """The sum of aproxy_requests_total on the metrics endpoint, or None if it has none."""
    head, _, body = get(metrics_port, b"/metrics").partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        return None
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "aproxy_requests_total"
    )


def wait_for_total(metrics_port: int, expected: float, seconds: float = 20) -> None:
    """Scrape until the requests total is C{expected} (bounded in time)."""
    deadline = time.monotonic() + seconds
    total = None
    while time.monotonic() < deadline:
        total = requests_total(metrics_port)
        if total == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"requests total {total}, not {expected}")


class WorkerMetricsTests(SynchronousTestCase):
    """--metrics with --workers: the parent serves the totals over the workers."""

    def test_totals(self) -> None:
        """
        /metrics counts the requests of both workers; a killed worker's counts stay;
        asking the proxy for the metrics port is a loop; /status renders; the private
        socket directory is 0700 and removed at exit.
        """
        port, metrics = free_port(), free_port()
        args = [
            "--port",
            str(port),
            "--workers",
            "2",
            "--metrics",
            str(metrics),
            "--deny-host",
            "blocked.invalid",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            with twistd(args, tmp, env={"TMPDIR": tmp}) as proc:
                out = wait_for_line(proc, b"worker 0 started")
                out += wait_for_line(proc, b"worker 1 started")
                pids = [
                    int(line.rsplit(b"pid ", 1)[1])
                    for line in out.splitlines()
                    if b"started, pid" in line
                ]
                deadline = time.monotonic() + 20
                while len(list(Path(tmp).glob("aproxy-*/*.sock"))) < 2:
                    # Each worker serves its figures once it has started.
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.05)
                [private] = [p for p in Path(tmp).iterdir() if p.name.startswith("aproxy-")]
                self.assertEqual(private.stat().st_mode & 0o777, 0o700)
                # Separate connections, which the kernel spreads over the workers.
                sent = 20
                for _ in range(sent):
                    self.assertEqual(
                        status_of(port, b"http://blocked.invalid/"), b"HTTP/1.1 403 Forbidden"
                    )
                looped = get(port, b"http://127.0.0.1:%d/metrics" % metrics)
                self.assertTrue(looped.startswith(b"HTTP/1.1 403 "), looped)
                self.assertIn(b"proxy_loop_detected", looped)
                sent += 1
                wait_for_total(metrics, sent)

                status = get(metrics, b"/status")
                self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status[:200])
                self.assertIn(b"<svg", status)
                self.assertIn(b"workers<b>2</b>", status)
                self.assertIn(b"requests<b>%d</b>" % sent, status)

                # A killed worker's counts stay in the totals: they never go down.
                os.kill(pids[0], signal.SIGKILL)
                wait_for_line(proc, b"restarting it")
                self.assertEqual(requests_total(metrics), sent)
                wait_for_line(proc, b"worker 0 started")
                self.assertEqual(
                    status_of(port, b"http://blocked.invalid/"), b"HTTP/1.1 403 Forbidden"
                )
                wait_for_total(metrics, sent + 1)
                self.assertEqual(stop(proc, 30), 0)
            self.assertFalse([p for p in Path(tmp).iterdir() if p.name.startswith("aproxy-")])


class _StoppingReactor:
    """Just enough reactor for stop_once_on_signals: stop works once, calls run at once."""

    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        if self.stops:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops += 1

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        f(*args)


class WorkerSignalTests(SynchronousTestCase):
    """A worker signalled twice (by its parent and by its process group) stops once."""

    def test_second_signal_and_twisted_stop_are_harmless(self) -> None:
        """Repeats are ignored; a stop Twisted queued first does not make ours raise."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        reactor = _StoppingReactor()
        reactor.stop()  # (Twisted's own handler got there first)
        stop_once_on_signals(reactor)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)
        self.assertEqual(reactor.stops, 1)
