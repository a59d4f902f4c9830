"""
Bounded, fairly shared work off the reactor: name lookups and password hashes.

Both used to go to Twisted's one reactor thread pool (10 threads, an unbounded queue that
nothing ever empties early), so one client asking for names whose DNS server drops
queries, or sending a burst of wrong bcrypt passwords, held every thread and made every
other client wait. Now each kind of work has its own L{ThreadRunner} and its own
L{FairQueue} in front of it:

  - a job is admitted only while its client (and, for lookups, its host name) is under
    a bound of jobs running and jobs waiting; past a bound it is refused at once with
    L{WorkRefused}, which the caller turns into a clear answer (503 or 429);
  - free threads go to the waiting clients in turn (round robin), so a client with a
    long queue does not delay one that asks for a single job;
  - a waiting job whose caller gave up (its L{Deferred} was cancelled: the client left,
    or its request timed out) is dropped and never runs;
  - a running job can't be stopped (C{getaddrinfo} and the hash functions have no way to
    be interrupted), so it keeps its thread and its place in the counts until it ends;
    the bound on running jobs per client and per name is what keeps such jobs from
    taking every thread.

The client a job is for is read from L{current_client}, set by the client connection
around the calls that may start one (see L{as_client}); the interfaces between (the
upstream connector, the authenticator) need not carry it.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = [
    "FairQueue",
    "ThreadRunner",
    "WorkRefused",
    "as_client",
    "current_client",
    "shared_runner",
]

_T = TypeVar("_T")

#: The address of the client the work started now is for (L{None}: unknown or local).
current_client: ContextVar[str | None] = ContextVar("aproxy_current_client", default=None)


def as_client(client: str | None, f: Callable[..., _T], *args: Any) -> _T:
    """
    Call C{f(*args)} with L{current_client} set to C{client}, so that the jobs it submits
    are counted against that client.
    """
    token = current_client.set(client)
    try:
        return f(*args)
    finally:
        current_client.reset(token)


class WorkRefused(Exception):
    """
    A job was refused because a bound is reached; nothing was started.

    @ivar scope: Which bound: C{"client"} (this client's jobs), C{"name"} (jobs for this
        host name) or C{"queue"} (all waiting jobs).
    """

    def __init__(self, reason: str, scope: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scope = scope


class _Job:
    """One submitted job: how to start it, whom it is for, and the caller's Deferred."""

    __slots__ = ("cancel_hook", "client", "name", "result", "running", "start")

    def __init__(
        self, start: Callable[[], Deferred[Any]], client: str | None, name: str | None
    ) -> None:
        self.start = start
        self.client = client
        self.name = name
        self.running = False
        self.result: Deferred[Any] = Deferred(self._cancel)
        self.cancel_hook: Callable[[_Job], None] | None = None

    def _cancel(self, d: Deferred[Any]) -> None:
        if self.cancel_hook is not None:
            self.cancel_hook(self)


class FairQueue:
    """
    Runs jobs (callables returning a L{Deferred}) at most C{slots} at a time, with bounds
    per client and per name, handing free slots to the waiting clients in turn.

    @param slots: How many jobs run at once (the size of the thread pool behind).
    @param max_queued: How many jobs may wait in all.
    @param client_running: How many jobs of one client may run at once.
    @param client_jobs: How many jobs (running and waiting) one client may have.
    @param name_running: How many jobs for one name may run at once.
    @param name_jobs: How many jobs (running and waiting) one name may have.
    @param what: What a job is, for the refusal messages (e.g. C{"name lookups"}).

    @ivar started: How many jobs were started so far.
    @ivar dropped: How many waiting jobs were dropped because their caller gave up.
    """

    def __init__(
        self,
        slots: int,
        max_queued: int,
        client_running: int,
        client_jobs: int,
        name_running: int | None = None,
        name_jobs: int | None = None,
        what: str = "jobs",
    ) -> None:
        self.slots = slots
        self.max_queued = max_queued
        self.client_running = client_running
        self.client_jobs = client_jobs
        self.name_running = name_running if name_running is not None else slots
        self.name_jobs = name_jobs if name_jobs is not None else max_queued + slots
        self.what = what
        # Waiting jobs per client; the dict's order is the turn order.
        self._waiting: dict[str | None, deque[_Job]] = {}
        self._queued = 0
        self._running = 0
        self._client_running: Counter[str | None] = Counter()
        self._client_jobs: Counter[str | None] = Counter()
        self._name_running: Counter[str] = Counter()
        self._name_jobs: Counter[str] = Counter()
        # When each client with jobs was last served (the value of started then).
        self._turns: dict[str | None, int] = {}
        self.started = 0
        self.dropped = 0

    @property
    def running(self) -> int:
        """How many jobs run now (including those whose caller gave up)."""
        return self._running

    @property
    def queued(self) -> int:
        """How many jobs wait for a slot."""
        return self._queued

    def submit(
        self,
        start: Callable[[], Deferred[_T]],
        client: str | None = None,
        name: str | None = None,
    ) -> Deferred[_T]:
        """
        Run C{start()} when a slot is free and the bounds allow, or refuse it now.

        @param start: Starts the job (on the reactor thread) and returns its L{Deferred};
            the job holds its slot until that fires, even if the caller gave up.
        @param client: The client address the job is for.
        @param name: The host name a lookup is for (L{None} for other work).
        @return: A L{Deferred} with the job's result, failing with L{WorkRefused} when a
            bound is reached. Cancelling it drops the job if it has not started.
        """
        if self._client_jobs[client] >= self.client_jobs:
            who = client or "this client"
            return defer.fail(WorkRefused(f"too many {self.what} pending for {who}", "client"))
        if name is not None and self._name_jobs[name] >= self.name_jobs:
            return defer.fail(WorkRefused(f"too many {self.what} pending for {name}", "name"))
        if self._queued >= self.max_queued:
            return defer.fail(WorkRefused(f"too many {self.what} pending", "queue"))
        job = _Job(start, client, name)
        job.cancel_hook = self._cancel
        self._client_jobs[client] += 1
        if name is not None:
            self._name_jobs[name] += 1
        self._queued += 1
        self._waiting.setdefault(client, deque()).append(job)
        self._dispatch()
        return job.result

    def _dispatch(self) -> None:
        while self._running < self.slots and self._queued:
            job = self._next()
            if job is None:
                return
            self._start(job)

    def _next(self) -> _Job | None:
        """
        Take the first startable job of the client served longest ago (or never): that
        is whose turn it is.
        """
        best: tuple[str | None, _Job] | None = None
        best_turn = 0
        for client, jobs in self._waiting.items():
            if self._client_running[client] >= self.client_running:
                continue
            turn = self._turns.get(client, -1)
            if best is not None and turn >= best_turn:
                continue
            for job in jobs:
                if job.name is None or self._name_running[job.name] < self.name_running:
                    best, best_turn = (client, job), turn
                    break
        if best is None:
            return None
        client, job = best
        jobs = self._waiting[client]
        jobs.remove(job)
        if not jobs:
            del self._waiting[client]
        self._turns[client] = self.started
        return job

    def _start(self, job: _Job) -> None:
        self._queued -= 1
        self._running += 1
        self._client_running[job.client] += 1
        if job.name is not None:
            self._name_running[job.name] += 1
        job.running = True
        self.started += 1
        try:
            d = job.start()
        except Exception:
            d = defer.fail(Failure())
        d.addBoth(self._finished, job)

    def _finished(self, result: object, job: _Job) -> None:
        self._running -= 1
        self._uncount(self._client_running, job.client)
        self._client_done(job.client)
        if job.name is not None:
            self._uncount(self._name_running, job.name)
            self._uncount(self._name_jobs, job.name)
        if not job.result.called:
            if isinstance(result, Failure):
                job.result.errback(result)
            else:
                job.result.callback(result)
        # Otherwise the caller gave up: the result (or failure) is dropped here.
        self._dispatch()

    def _cancel(self, job: _Job) -> None:
        """The caller gave up: drop the job if it waits; a running one runs out."""
        if job.running:
            return
        jobs = self._waiting.get(job.client)
        if jobs is None or job not in jobs:
            return
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.client]
        self._queued -= 1
        self.dropped += 1
        self._client_done(job.client)
        if job.name is not None:
            self._uncount(self._name_jobs, job.name)

    def _client_done(self, client: str | None) -> None:
        """One job of C{client} is gone; forget its turn when it has none left."""
        self._uncount(self._client_jobs, client)
        if client not in self._client_jobs:
            self._turns.pop(client, None)

    @staticmethod
    def _uncount(counter: Counter[Any], key: Any) -> None:
        left = counter[key] - 1
        if left > 0:
            counter[key] = left
        else:
            del counter[key]


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A lookup stuck in getaddrinfo must not keep the process from exiting.
    return threading.Thread(*args, daemon=True, **kwargs)


class ThreadRunner:
    """
    A dedicated thread pool of a fixed size, started on first use and stopped when the
    reactor shuts down. Its threads are daemon threads: a lookup stuck in
    C{getaddrinfo} must not hold up the process's exit.

    @param reactor: Delivers results on the reactor thread.
    @param threads: The most threads the pool runs.
    @param name: The pool's name (shown in thread names).
    """

    def __init__(self, reactor: Any, threads: int, name: str) -> None:
        self._reactor = reactor
        self.threads = threads
        self.name = name
        self._pool: ThreadPool | None = None

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run C{f(*args)} in the pool; the L{Deferred} fires on the reactor thread."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(0, self.threads, self.name)
            pool.threadFactory = _daemon_thread  # type: ignore[assignment]
            pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, pool, f, *args)

    def stop(self) -> None:
        """
        Stop the pool when nothing runs in it. A job still running (a lookup stuck in
        C{getaddrinfo}) is left alone: stopping would wait for it, and its daemon thread
        ends with the process anyway.
        """
        pool, self._pool = self._pool, None
        if pool is not None and not pool.working:
            pool.stop()


_runners: dict[tuple[int, str], tuple[Any, ThreadRunner]] = {}


def shared_runner(reactor: Any, name: str, threads: int) -> ThreadRunner:
    """
    The L{ThreadRunner} called C{name} for C{reactor}, made on first use: one per process
    and reactor, so a reload or a second factory doesn't add threads.
    """
    key = (id(reactor), name)
    entry = _runners.get(key)
    if entry is None or entry[0] is not reactor:
        entry = _runners[key] = (reactor, ThreadRunner(reactor, threads, name))
    return entry[1]
