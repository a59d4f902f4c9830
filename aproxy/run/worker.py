"""
One C{--workers} worker process: started by the parent's L{aproxy.run.workers.WorkerPool}
as C{python -m aproxy.run.worker FD:FAMILY ... -- ARGS}, it adopts the inherited sockets
and runs a whole proxy from the same command line as the parent. (The parent's side and
this one are two modules, so that the command line, which starts the parent, and the
worker, which parses the command line, import each other in one direction only.)
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from aproxy.run.tap import worker_service
from aproxy.run.workers import parse_worker_args

__all__ = ["run_worker", "stop_once_on_signals"]

log = Logger()


def run_worker(argv: list[str]) -> None:
    """A worker process: adopt the inherited sockets and serve until told to stop."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    split = argv.index("--")
    specs, rest = argv[:split], argv[split + 1 :]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    fds, snapshot, own = parse_worker_args(specs)
    service = worker_service(rest, fds, snapshot, own)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(stop_once_on_signals, reactor)
    reactor.run()


def stop_once_on_signals(reactor: Any) -> None:
    """
    Stop on the first SIGTERM or SIGINT and ignore repeats. A worker usually gets the
    signal twice: from the parent, which passes it on, and directly when the whole
    process group is signalled (Ctrl-C, systemd, a supervisor); Twisted's own handler
    would try to stop the stopped reactor again and log a ReactorNotRunning traceback.
    (Installed once running: Twisted installs its handlers as the reactor starts.)
    """
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("worker stopping ({name})", name=signal.Signals(signum).name)
        reactor.callFromThread(stop_reactor)

    def stop_reactor() -> None:
        # Twisted's own handler may have queued a stop already (a signal that came as
        # the reactor started, before this handler replaced it): stop once.
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker running, pid {pid}", pid=os.getpid())


if __name__ == "__main__":
    run_worker(sys.argv[1:])
