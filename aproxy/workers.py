"""
C{--workers N}: use every core. The parent process creates each listening socket once and
starts N worker processes that adopt them (C{adoptStreamPort}); the kernel spreads new
connections over the workers. The parent restarts a worker that dies and passes SIGTERM,
SIGHUP and SIGUSR1 on. Each worker is a complete aproxy with its own reactor, factory and
connection pool, started as C{python -m aproxy.workers FD:FAMILY ... -- ARGS}.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.config import ProxyConfig

__all__ = ["WorkerPool", "listening_socket", "worker_count"]

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


def listening_socket(description: str) -> socket.socket:
    """
    Create the listening socket for a C{tcp:} or C{tcp6:} endpoint description.

    @raise ValueError: For another kind of endpoint (only TCP sockets can be shared).
    @raise OSError: If the address can't be bound.
    """
    parts = description.replace("\\:", "\x00").split(":")
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6") or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"--workers can share tcp: and tcp6: ports only, not {description!r}")
    options = dict(p.partition("=")[::2] for p in parts[2:])
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = options.get("interface", "::" if kind == "tcp6" else "").replace("\x00", ":")
    backlog = int(options.get("backlog", "50"))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, int(parts[1])))
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
        self.workers: dict[int, _Worker] = {}
        self._stopping = False

    def privilegedStartService(self) -> None:
        """Create the listening sockets (here, so that a port in use stops the start)."""
        super().privilegedStartService()
        if not self.sockets:
            self.sockets = [listening_socket(d) for d in self.config.ports]

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
        for index, sock in enumerate(self.sockets):
            fds[3 + index] = sock.fileno()
            specs.append(f"{3 + index}:{int(sock.family)}")
        args = [sys.executable, "-m", "aproxy.workers", *specs, "--", *self.argv]
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
        """Stop the workers gracefully (each drains), then close the shared sockets."""
        super().stopService()
        self._stopping = True
        ended = [w.ended for w in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        # A worker drains for up to shutdown_timeout; after that and a margin, kill it.
        killer = self.reactor.callLater(
            self.config.shutdown_timeout + 10, self.signal_workers, signal.SIGKILL
        )

        def done(result: object) -> None:
            if killer.active():
                killer.cancel()
            for sock in self.sockets:
                sock.close()
            self.sockets = []

        d: Deferred[Any] = DeferredList(ended)
        d.addCallback(done)
        return d


def _run_worker(argv: list[str]) -> None:
    """A worker process: adopt the inherited sockets and serve until told to stop."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from aproxy.tap import worker_service

    split = argv.index("--")
    specs, rest = argv[:split], argv[split + 1 :]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    fds = [(int(fd), int(family)) for fd, family in (s.split(":") for s in specs)]
    service = worker_service(rest, fds)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    _run_worker(sys.argv[1:])
