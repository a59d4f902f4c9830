"""
C{--metrics} with C{--workers}: one endpoint, served by the parent, with the totals over
all workers.

Each worker counts its own traffic in a L{Metrics} and hands a snapshot of it (JSON: the
registry's samples and the C{/status} history) to whoever connects to a unix socket in a
directory the parent created for this (mode 0700) and removes at exit; nothing of it is
reachable from the network. On every request for C{/metrics} or C{/status} the parent
fetches a fresh snapshot from each live worker (L{WorkerTotals}) and sums them
(L{Totals}): counters and histograms are added up, gauges too (open connections of all
workers together).

When a worker ends, the last snapshot the parent got from it stays in the totals for its
counters, histograms and history, so a total never goes down (Prometheus would read that
as a counter reset); its gauges are dropped at once. What the worker counted after that
last snapshot (since the previous scrape) is lost. Its replacement starts from zero and
adds to the totals.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from aproxy.access.pac import pac_body, read_pac
from aproxy.config import ProxyConfig
from aproxy.observe.metrics import Metrics, pages_site
from aproxy.observe.status import Bucket, History, render_status

__all__ = [
    "ANY_WORKER",
    "SNAPSHOT_TIMEOUT",
    "Family",
    "NoFigures",
    "Snapshot",
    "SnapshotFactory",
    "Totals",
    "WorkerTotals",
    "decode_snapshot",
    "encode_snapshot",
    "fetch_snapshot",
]

log = Logger()

SNAPSHOT_TIMEOUT = 5.0
"""Seconds the parent waits for a worker's snapshot; a worker that takes longer is
counted with the snapshot it gave before."""

# A snapshot is a few kilobytes (a history full of distinct hosts: a few megabytes).
_MAX_SNAPSHOT = 64 * 1024 * 1024
# Families of these types only grow: a dead worker's last values stay in the totals.
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})
_SEQUENCE = itertools.count(1)

SHARED_LABEL = "tier"
"""Gauge samples labelled C{tier="disk"} describe the one disk cache all workers share:
the totals take them once (the largest), not once per worker."""

ANY_WORKER = frozenset({"aproxy_parent_up"})
"""Gauges that say whether something is up, as each worker sees it: the totals take the
largest (1 when any worker has it up), not the sum."""

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its labels, sorted."""


@dataclass
class Family:
    """
    One metric family of a snapshot, or of a sum of snapshots.

    @ivar samples: Each sample's value by name and sorted labels (C{_created} samples,
        timestamps that can't be summed, are left out).
    """

    name: str
    type: str
    help: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """
    One worker's figures at one moment.

    @ivar seq: Increases with every snapshot a process gives, so that of two answers
        arriving out of order the older one is not taken for the newer.
    @ivar families: The worker's metric families.
    @ivar buckets: The worker's status history.
    """

    seq: int
    families: tuple[Family, ...]
    buckets: tuple[Bucket, ...]


class NoFigures(Exception):
    """No worker has given a snapshot yet (they are starting): nothing to report."""


def encode_snapshot(metrics: Metrics, now: float) -> bytes:
    """A worker's snapshot as JSON (see L{decode_snapshot}); samples the gauges first."""
    metrics.sample(now)
    families = [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                [sample.name, sample.labels, sample.value]
                for sample in family.samples
                if not sample.name.endswith("_created")
            ],
        }
        for family in metrics.registry.collect()
    ]
    history = [
        [
            b.index,
            b.requests,
            b.to_client,
            b.to_origin,
            dict(b.errors),
            dict(b.hosts),
            b.connections,
            b.tunnels,
            b.cache_requests,
            b.cache_hits,
            b.saved,
        ]
        for b in metrics.history.buckets()
    ]
    document = {"seq": next(_SEQUENCE), "families": families, "history": history}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def decode_snapshot(data: bytes) -> Snapshot:
    """
    Parse what L{encode_snapshot} wrote.

    @raise ValueError: If C{data} is not such a snapshot.
    """
    try:
        document = json.loads(data)
        families = tuple(
            Family(
                str(f["name"]),
                str(f["type"]),
                str(f["help"]),
                {
                    (str(name), tuple(sorted((str(k), str(v)) for k, v in labels.items()))): float(
                        value
                    )
                    for name, labels, value in f["samples"]
                },
            )
            for f in document["families"]
        )
        buckets = []
        for row in document["history"]:
            index, requests, to_client, to_origin, errors, hosts, conns, tunnels = row[:8]
            cache_requests, cache_hits, saved = row[8:11] if len(row) >= 11 else (0, 0, 0.0)
            bucket = Bucket(int(index))
            bucket.cache_requests = int(cache_requests)
            bucket.cache_hits = int(cache_hits)
            bucket.saved = float(saved)
            bucket.requests = int(requests)
            bucket.to_client = float(to_client)
            bucket.to_origin = float(to_origin)
            bucket.errors = Counter({str(k): int(v) for k, v in errors.items()})
            bucket.hosts = Counter({str(k): int(v) for k, v in hosts.items()})
            bucket.connections = None if conns is None else int(conns)
            bucket.tunnels = None if tunnels is None else int(tunnels)
            buckets.append(bucket)
        return Snapshot(int(document["seq"]), families, tuple(buckets))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"not a worker snapshot: {e}") from None


def _add(into: dict[str, Family], families: Iterable[Family], zero_gauges: bool = False) -> None:
    """Add C{families} into the sums C{into}; with C{zero_gauges}, gauges add 0."""
    for family in families:
        total = into.get(family.name)
        if total is None:
            total = into[family.name] = Family(family.name, family.type, family.help)
        keep = not zero_gauges or family.type in _CUMULATIVE
        for key, value in family.samples.items():
            if (SHARED_LABEL, "disk") in key[1] or family.name in ANY_WORKER:
                # One store for every worker: each reports the same figure, taken once
                # (and a member is up when any worker has it up).
                total.samples[key] = max(total.samples.get(key, 0.0), value if keep else 0.0)
                continue
            total.samples[key] = total.samples.get(key, 0.0) + (value if keep else 0.0)


class Totals:
    """
    The sums over the workers' snapshots, by worker (any hashable key, one per
    process). A worker's counters, histograms and history stay in the totals after it
    ends (L{retire}), its gauges don't.
    """

    def __init__(self) -> None:
        self._live: dict[Hashable, Snapshot] = {}
        # The ended workers' last figures; their gauges kept at 0, so that a gauge is
        # still reported (as 0) when no worker is left.
        self._retired: dict[str, Family] = {}
        self._retired_history = History(0.0)

    @property
    def live(self) -> int:
        """How many workers the totals hold a snapshot of."""
        return len(self._live)

    def answered(self, key: Hashable) -> bool:
        """Whether the totals hold a snapshot of the live worker C{key}."""
        return key in self._live

    def update(self, key: Hashable, snapshot: Snapshot) -> None:
        """Take a live worker's snapshot, unless one taken later is already held."""
        held = self._live.get(key)
        if held is None or snapshot.seq > held.seq:
            self._live[key] = snapshot

    def retire(self, key: Hashable) -> None:
        """A worker ended: keep its last counters and history, drop its gauges."""
        snapshot = self._live.pop(key, None)
        if snapshot is None:
            return
        _add(self._retired, snapshot.families, zero_gauges=True)
        self._retired_history.merge(snapshot.buckets)

    def families(self) -> list[Family]:
        """
        The summed families, in the order the workers give them.

        @raise NoFigures: If no worker has given a snapshot yet.
        """
        if not self._live and not self._retired:
            raise NoFigures("no worker has reported yet")
        sums: dict[str, Family] = {}
        _add(sums, self._retired.values())
        for snapshot in self._live.values():
            _add(sums, snapshot.families)
        return list(sums.values())

    def collect(self) -> list[Metric]:
        """The sums as Prometheus metric families (the C{Collector} interface)."""
        metrics = []
        for family in self.families():
            metric = Metric(family.name, family.help, family.type)
            for (name, labels), value in family.samples.items():
                metric.add_sample(name, dict(labels), value)
            metrics.append(metric)
        return metrics

    def value(self, name: str) -> float:
        """The total of every sample called C{name}, whatever its labels (0 if none)."""
        return sum(
            value
            for family in self.families()
            for (sample, _), value in family.samples.items()
            if sample == name
        )

    def history(self, start: float) -> History:
        """The workers' histories summed, as one history that started at C{start}."""
        history = History(start)
        history.merge(self._retired_history.buckets())
        for snapshot in self._live.values():
            history.merge(snapshot.buckets)
        return history


class _SendSnapshot(Protocol):
    """Write one snapshot to whoever connected, then close."""

    def connectionMade(self) -> None:
        """Send the snapshot."""
        assert self.transport is not None
        self.transport.write(cast(SnapshotFactory, self.factory).snapshot())
        self.transport.loseConnection()


class SnapshotFactory(ServerFactory):
    """A worker's side: each connection gets the current snapshot of C{metrics}."""

    protocol = _SendSnapshot
    noisy = False

    def __init__(self, metrics: Metrics, clock: IReactorTime) -> None:
        self.metrics = metrics
        self.clock = clock

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """How the start-up log names this listener (not by its class)."""
        return "worker figures for the parent's metrics"

    def snapshot(self) -> bytes:
        """The current snapshot (L{encode_snapshot})."""
        return encode_snapshot(self.metrics, self.clock.seconds())


class _Receive(Protocol):
    """Read until the worker closes; C{done} fires with everything it sent."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _abort(self) -> None:
        # Twisted's unix transports are TCP-like connections: they can be aborted.
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._abort()

    def dataReceived(self, data: bytes) -> None:
        """Keep the bytes, up to a limit."""
        self.size += len(data)
        if self.size > _MAX_SNAPSHOT:
            self._abort()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Fire C{done}: the whole snapshot on a clean close, else the failure."""
        if self.done.called:
            return
        if self.size > _MAX_SNAPSHOT:
            self.done.errback(ValueError("worker snapshot too large"))
        elif reason.check(ConnectionDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def fetch_snapshot(
    reactor: Any, path: str, timeout: float = SNAPSHOT_TIMEOUT
) -> Deferred[Snapshot]:
    """The parent's side: get a worker's snapshot from its unix socket C{path}."""
    receiver = _Receive()
    factory = Factory.forProtocol(lambda: receiver)
    factory.noisy = False  # one scrape would log two lines per worker
    d: Deferred[Any] = UNIXClientEndpoint(reactor, path, timeout=timeout).connect(factory)
    d.addCallback(lambda _: receiver.done)
    d.addCallback(decode_snapshot)
    d.addTimeout(timeout, reactor)
    return d


class WorkerTotals:
    """
    The parent's C{--metrics} endpoint with C{--workers}: fetches every live worker's
    snapshot for each page and renders the totals.

    @ivar directory: The private directory (mode 0700) for the workers' sockets.
    @ivar totals: The sums.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        workers: Callable[[], dict[Hashable, str]],
        directory: str | None = None,
    ) -> None:
        """
        @param config: The configuration shown on C{/status}.
        @param reactor: Connects to the workers and reads the time.
        @param workers: The live workers now: each one's key and socket path.
        @param directory: Where the workers' sockets go (a new private temporary
            directory by default, removed by L{close}).
        """
        self.config = config
        self.reactor = reactor
        self.start = reactor.seconds()
        self.directory = directory if directory is not None else tempfile.mkdtemp(prefix="aproxy-")
        self.totals = Totals()
        self._workers = workers

    def socket_path(self, name: str) -> str:
        """Where a worker called C{name} serves its snapshots."""
        return os.path.join(self.directory, name + ".sock")

    def close(self) -> None:
        """Remove the directory and whatever is left in it."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def refresh(self) -> Deferred[None]:
        """Fetch a snapshot from every live worker (bounded in time); fires when done."""
        fetches = []
        for key, path in self._workers().items():
            d = fetch_snapshot(self.reactor, path)
            d.addCallbacks(self._got, self._failed, callbackArgs=(key,), errbackArgs=(key, path))
            fetches.append(d)
        done: Deferred[Any] = DeferredList(fetches)
        done.addCallback(lambda _: None)
        return done

    def _got(self, snapshot: Snapshot, key: Hashable) -> None:
        # A worker that ended meanwhile was retired already: its late answer is dropped.
        if key in self._workers():
            self.totals.update(key, snapshot)

    def _failed(self, failure: Failure, key: Hashable, path: str) -> None:
        # A worker that never answered is starting (its figures are all 0): not news.
        if self.totals.answered(key):
            log.warn(
                "no metrics from the worker at {path}, counting its last ones: {why}",
                path=path,
                why=failure.getErrorMessage(),
            )

    def render_metrics(self) -> Deferred[bytes]:
        """C{/metrics}: the totals in the Prometheus text format."""
        d = self.refresh()
        d.addCallback(lambda _: generate_latest(self.totals))
        return cast("Deferred[bytes]", d)

    def render_status(self) -> Deferred[bytes]:
        """C{/status}: the page of L{aproxy.observe.status}, with the totals."""
        d = self.refresh()
        d.addCallback(lambda _: self._status())
        return cast("Deferred[bytes]", d)

    def _status(self) -> bytes:
        from aproxy.version import VERSION

        totals = self.totals
        now = self.reactor.seconds()
        return render_status(
            totals.history(self.start),
            now,
            int(totals.value("aproxy_client_connections")),
            int(totals.value("aproxy_tunnels")),
            int(totals.value("aproxy_upstream_pool_connections")),
            int(totals.value("aproxy_upstream_reused_total")),
            self.config,
            VERSION,
            workers=len(self._workers()),
        )

    def site(self) -> Site:
        """The HTTP site: C{/metrics} and C{/status} (see L{aproxy.observe.metrics.pages_site})."""
        ca_pem = None
        if self.config.intercept:
            from aproxy.intercept.ca import default_ca_dir, load_or_create

            # (Made or checked when the options were parsed, before any worker started.)
            ca_pem = load_or_create(self.config.ca_dir or default_ca_dir()).pem
        config = self.config

        def pac() -> bytes:
            return pac_body(config, read_pac(config), None)

        return pages_site(self.render_metrics, self.render_status, self.reactor, ca_pem, pac)
