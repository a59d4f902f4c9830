"""
C{--workers N}: use every core. The parent process creates the listening sockets once and
starts N worker processes that adopt them (C{adoptStreamPort}); the kernel spreads new
connections over the workers. Where the system has C{SO_REUSEPORT} (Linux), each port
gets one socket per worker, all bound to that port, and the kernel hashes each new
connection to one of them: an even spread. With one shared socket the first worker to wake
takes the connection, and a burst of long keep-alive connections can all land on one
worker while the other idles (measured: all 50 of a benchmark's connections, half the
throughput, in two runs of four). The parent restarts a worker that dies and passes SIGTERM,
SIGHUP and SIGUSR1 on. Each worker is a complete aproxy with its own reactor, factory and
connection pool, started as C{python -m aproxy.run.worker FD:FAMILY ... -- ARGS}
(L{aproxy.run.worker}).

With C{--metrics}, the parent serves the endpoint itself, with the totals over the workers
(L{aproxy.observe.cluster}): each worker is also given C{snapshot=PATH}, the unix socket
where it serves its own figures to the parent, and C{own=HOST:PORT}, the metrics address,
which it refuses as a destination like its own ports (a loop).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.config import ProxyConfig, proxy_protocol_inner
from aproxy.observe.cluster import WorkerTotals
from aproxy.run.endpoints import parse_endpoint

__all__ = ["WorkerPool", "listening_socket", "parse_worker_args", "worker_count"]

log = Logger()

# A worker that dies sooner than this after its start is restarted only after a pause,
# so a worker that can't start doesn't spin.
_QUICK_DEATH = 5.0
_RESTART_PAUSE = 1.0


def worker_count(text: str) -> int:
    """Parse C{--workers}: a whole number of at least 1, or C{auto} (one per core)."""
    if text == "auto":
        return max(os.cpu_count() or 1, 1)
    if not text.isdigit() or int(text) < 1:
        raise ValueError("--workers must be a whole number of at least 1, or auto")
    return int(text)


def listening_socket(
    description: str, reuse_port: bool = False, port: int | None = None
) -> socket.socket:
    """
    Create the listening socket for a C{tcp:} or C{tcp6:} endpoint description.

    @param reuse_port: Set C{SO_REUSEPORT}, so that more sockets can listen on the port.
    @param port: Bind this port instead of the description's (the port the first of a
        group of C{SO_REUSEPORT} sockets got, when the description asks for port 0).
    @raise ValueError: For another kind of endpoint (only TCP sockets can be shared).
    @raise OSError: If the address can't be bound.
    """
    endpoint = parse_endpoint(description)
    kind, first = endpoint.kind, endpoint.first or ""
    if endpoint.proxy_protocol or kind not in ("tcp", "tcp6") or not first.isdigit():
        raise ValueError(f"--workers can share tcp: and tcp6: ports only, not {description!r}")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = endpoint.option("interface", "::" if kind == "tcp6" else "")
    backlog = int(endpoint.option("backlog", "50"))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, int(first) if port is None else port))
        sock.listen(max(backlog, 1024))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Worker(ProcessProtocol):
    """One worker process (its output is the parent's own); its end is reported."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()
        # Where it serves its figures to the parent (with --metrics).
        self.snapshot_path: str | None = None

    def processEnded(self, reason: Failure) -> None:
        """Tell the pool, which restarts the worker unless it is stopping."""
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    """
    The parent's service: the shared sockets and N worker processes.

    @param argv: The C{aproxy} command-line arguments, passed on to every worker.
    """

    def __init__(self, config: ProxyConfig, argv: list[str], count: int, reactor: Any) -> None:
        self.config = config
        self.argv = argv
        self.count = count
        self.reactor = reactor
        self.sockets: list[socket.socket] = []
        # For each listening port, the socket of each worker (the same one for every
        # worker without SO_REUSEPORT).
        self._port_sockets: list[list[socket.socket]] = []
        self.workers: dict[int, _Worker] = {}
        self.metrics: WorkerTotals | None = None
        self._metrics_port: IListeningPort | None = None
        # The metrics endpoint's address, for the workers' loop check.
        self._own: list[str] = []
        self._spawned = 0
        self._stopping = False

    def reconfigure(self, config: ProxyConfig) -> None:
        """
        Take a reloaded configuration (SIGHUP): the ports and the metrics endpoint stay as
        they were bound; the rest (the shutdown timeout, what /status shows) is the new one.
        """
        config = replace(
            config,
            port=self.config.port,
            socks_port=self.config.socks_port,
            metrics=self.config.metrics,
        )
        self.config = config
        if self.metrics is not None:
            self.metrics.config = config

    def privilegedStartService(self) -> None:
        """
        Create the listening sockets and the metrics endpoint (here, so that a port in
        use stops the start).
        """
        super().privilegedStartService()
        if not self.sockets:
            # The SOCKS5 ports after the HTTP ones: the workers tell them apart by place.
            for description in (*self.config.port, *self.config.socks_port):
                self._port_sockets.append(self._sockets_for(description))
                self.sockets.extend({id(sock): sock for sock in self._port_sockets[-1]}.values())
        if self.config.metrics is not None and self.metrics is None:
            self._listen_metrics(self.config.metrics)

    def _sockets_for(self, description: str) -> list[socket.socket]:
        """One socket per worker with SO_REUSEPORT, else one socket for all."""
        # A haproxy: port's socket is a plain TCP one; the workers read the PROXY headers.
        description = proxy_protocol_inner(description) or description
        if not hasattr(socket, "SO_REUSEPORT") or self.count == 1:
            sock = listening_socket(description)
            return [sock] * self.count
        first = listening_socket(description, reuse_port=True)
        group = [first]
        try:
            port = first.getsockname()[1]
            for _ in range(self.count - 1):
                group.append(listening_socket(description, reuse_port=True, port=port))
        except OSError:
            for sock in group:
                sock.close()
            raise
        return group

    def _listen_metrics(self, description: str) -> None:
        """Serve the workers' totals on C{description}; raise if it can't listen."""
        totals = WorkerTotals(self.config, self.reactor, self._live_workers)
        ports: list[IListeningPort] = []
        failures: list[Failure] = []
        d = serverFromString(self.reactor, description).listen(totals.site())
        d.addCallbacks(ports.append, failures.append)
        if not ports:
            totals.close()
            if failures:
                failures[0].raiseException()
            raise ValueError(f"--metrics {description} did not listen at once")
        self.metrics, self._metrics_port = totals, ports[0]
        address = ports[0].getHost()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if host is not None and port is not None:
            self._own = [f"{host}:{port}"]

    def _live_workers(self) -> dict[Hashable, str]:
        return {
            worker: worker.snapshot_path
            for worker in self.workers.values()
            if worker.snapshot_path is not None
        }

    def startService(self) -> None:
        """Start the workers."""
        if not self.sockets:
            self.privilegedStartService()
        super().startService()
        for number in range(self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        worker = _Worker(self, number)
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        specs = []
        for index, group in enumerate(self._port_sockets):
            sock = group[number]
            fds[3 + index] = sock.fileno()
            specs.append(f"{3 + index}:{int(sock.family)}")
        if self.metrics is not None:
            # A new path for every process, so that an answer is never taken for another's.
            self._spawned += 1
            worker.snapshot_path = self.metrics.socket_path(f"worker{number}-{self._spawned}")
            specs.append(f"snapshot={worker.snapshot_path}")
        specs.extend(f"own={address}" for address in self._own)
        args = [sys.executable, "-m", "aproxy.run.worker", *specs, "--", *self.argv]
        worker.started = self.reactor.seconds()
        transport = self.reactor.spawnProcess(
            worker, sys.executable, args, os.environ, childFDs=fds
        )
        self.workers[number] = worker
        log.info("worker {number} started, pid {pid}", number=number, pid=transport.pid)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        """Restart a worker that ended while the pool is running."""
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self.metrics is not None:
            self.metrics.totals.retire(worker)
        if worker.snapshot_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(worker.snapshot_path)
        if self._stopping:
            return
        log.warn(
            "worker {number} ended ({why}); restarting it",
            number=worker.number,
            why=reason.getErrorMessage(),
        )
        quick = self.reactor.seconds() - worker.started < _QUICK_DEATH
        self.reactor.callLater(_RESTART_PAUSE if quick else 0, self._spawn, worker.number)

    def signal_workers(self, signum: int) -> None:
        """Pass a signal on to every worker."""
        for worker in list(self.workers.values()):
            if worker.transport is not None:
                try:
                    worker.transport.signalProcess(signum)
                except Exception:
                    log.failure("signalling worker {number}", number=worker.number)

    def stopService(self) -> Deferred[Any]:
        """
        Stop the workers gracefully (each drains), then close the shared sockets and the
        metrics endpoint, and remove the workers' socket directory.
        """
        super().stopService()
        self._stopping = True
        ended = [w.ended for w in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        # A worker drains for up to shutdown_timeout; after that and a margin, kill it.
        killer = self.reactor.callLater(
            self.config.shutdown_timeout + 10, self.signal_workers, signal.SIGKILL
        )

        def done(result: object) -> Deferred[None] | None:
            if killer.active():
                killer.cancel()
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            self._port_sockets = []
            if self.metrics is not None:
                self.metrics.close()
            port, self._metrics_port = self._metrics_port, None
            return port.stopListening() if port is not None else None

        d: Deferred[Any] = DeferredList(ended)
        d.addCallback(done)
        return d


def parse_worker_args(
    specs: list[str],
) -> tuple[list[tuple[int, int]], str | None, list[IAddress]]:
    """
    Parse what the parent tells a worker (the arguments before C{--}): C{FD:FAMILY} for
    each inherited socket, C{snapshot=PATH} where to serve figures to the parent, and
    C{own=HOST:PORT} for each address of the parent's to refuse as a loop.

    @return: The (descriptor, family) pairs, the snapshot path, and the own addresses.
    """
    fds: list[tuple[int, int]] = []
    snapshot: str | None = None
    own: list[IAddress] = []
    for spec in specs:
        key, sep, value = spec.partition("=")
        if sep and key == "snapshot":
            snapshot = value
        elif sep and key == "own":
            host, _, port = value.rpartition(":")
            kind = IPv6Address if ":" in host else IPv4Address
            own.append(kind("TCP", host, int(port)))
        else:
            fd, _, family = spec.partition(":")
            fds.append((int(fd), int(family)))
    return fds, snapshot, own
