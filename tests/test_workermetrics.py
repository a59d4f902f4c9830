"""
Tests for L{aproxy.observe.cluster}: summing the workers' snapshots (on a fake clock, no
processes), and the snapshot socket between a worker and the parent (real unix sockets).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Hashable
from typing import Any, cast

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.observe.cluster import (
    Family,
    NoFigures,
    Snapshot,
    SnapshotFactory,
    Totals,
    WorkerTotals,
    decode_snapshot,
    encode_snapshot,
    fetch_snapshot,
)
from aproxy.observe.metrics import Metrics
from aproxy.testing import RecordingConnector
from tests.support import exchange

# In the middle of a 10-second bucket, so that a short exchange's bytes stay in one.
START = 1_700_000_005.0


class _Connection:
    """Stands for an open client connection in the factory's gauges."""

    def __init__(self, is_tunnel: bool) -> None:
        self.is_tunnel = is_tunnel


class _Worker:
    """One worker's Metrics on a fake clock, with gauges that can be set."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.factory = ProxyFactory(ProxyConfig(), clock, connector=RecordingConnector())
        self.metrics = Metrics(self.factory, clock)

    def requests(self, count: int, **fields: Any) -> None:
        """Count C{count} finished exchanges."""
        for _ in range(count):
            self.metrics(exchange(**fields))

    def connections(self, plain: int, tunnels: int = 0) -> None:
        """Pretend C{plain} + C{tunnels} client connections are open."""
        self.factory.connections.clear()
        for i in range(plain + tunnels):
            self.factory.connections.add(_Connection(i < tunnels))  # type: ignore[arg-type]
        # The factory counts tunnels as they open and close (no walk per request).
        self.factory.tunnels = tunnels

    def snapshot(self) -> Snapshot:
        """A snapshot, through its wire form."""
        return decode_snapshot(encode_snapshot(self.metrics, self.clock.seconds()))


def scrape(totals: Totals) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the totals' text exposition, keyed by name and sorted labels."""
    text = generate_latest(totals).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


GET_2XX = ("aproxy_requests_total", (("method", "GET"), ("status_class", "2xx")))
CONNECTIONS = ("aproxy_client_connections", ())
DURATION_COUNT = ("aproxy_request_duration_seconds_count", ())


class TotalsTests(SynchronousTestCase):
    """Totals sums the snapshots of live workers and keeps the counters of ended ones."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.one, self.two = _Worker(self.clock), _Worker(self.clock)
        self.totals = Totals()

    def test_counters_histograms_gauges_summed(self) -> None:
        """Counters, histogram buckets, sums and counts, and gauges are all added up."""
        self.one.requests(3, duration=0.02)
        self.two.requests(4, duration=2.0)
        self.two.requests(1, method="BREW", status=0, error="destination_not_found")
        self.one.connections(2, tunnels=1)
        self.two.connections(5)
        self.totals.update("one", self.one.snapshot())
        self.totals.update("two", self.two.snapshot())
        samples = scrape(self.totals)
        self.assertEqual(samples[GET_2XX], 7)
        self.assertEqual(
            samples[("aproxy_requests_total", (("method", "other"), ("status_class", "0xx")))], 1
        )
        self.assertEqual(samples[DURATION_COUNT], 8)
        self.assertAlmostEqual(samples[("aproxy_request_duration_seconds_sum", ())], 8.08)
        self.assertEqual(samples[("aproxy_request_duration_seconds_bucket", (("le", "0.025"),))], 4)
        self.assertEqual(samples[("aproxy_request_duration_seconds_bucket", (("le", "+Inf"),))], 8)
        self.assertEqual(samples[("aproxy_bytes_total", (("direction", "to_client"),))], 800)
        self.assertEqual(samples[CONNECTIONS], 8)
        self.assertEqual(samples[("aproxy_tunnels", ())], 1)
        self.assertEqual(self.totals.value("aproxy_requests_total"), 8)

    def test_no_created_timestamps(self) -> None:
        """_created samples (timestamps) are not summed: they are left out."""
        self.one.requests(1)
        self.totals.update("one", self.one.snapshot())
        self.assertFalse([key for key in scrape(self.totals) if key[0].endswith("_created")])

    def test_ended_worker_counters_stay_gauges_go(self) -> None:
        """After a worker ends its counters stay in the totals; its gauges are 0."""
        self.one.requests(3)
        self.one.connections(4)
        self.two.requests(2)
        self.two.connections(1)
        self.totals.update("one", self.one.snapshot())
        self.totals.update("two", self.two.snapshot())
        self.totals.retire("one")
        samples = scrape(self.totals)
        self.assertEqual((samples[GET_2XX], samples[CONNECTIONS]), (5, 1))
        self.totals.retire("two")
        samples = scrape(self.totals)
        self.assertEqual((samples[GET_2XX], samples[CONNECTIONS]), (5, 0))
        self.assertEqual(self.totals.live, 0)

    def test_replacement_adds_to_the_totals(self) -> None:
        """A restarted worker starts from zero; the totals go on from where they were."""
        self.one.requests(3)
        self.totals.update("one", self.one.snapshot())
        seen = [scrape(self.totals)[GET_2XX]]
        self.totals.retire("one")
        seen.append(scrape(self.totals)[GET_2XX])
        again = _Worker(self.clock)
        self.totals.update("one again", again.snapshot())
        seen.append(scrape(self.totals)[GET_2XX])
        again.requests(2)
        self.totals.update("one again", again.snapshot())
        seen.append(scrape(self.totals)[GET_2XX])
        self.assertEqual(seen, [3, 3, 3, 5])

    def test_older_snapshot_ignored(self) -> None:
        """Of two answers arriving out of order, the later snapshot is kept."""
        self.one.requests(1)
        early = self.one.snapshot()
        self.one.requests(1)
        late = self.one.snapshot()
        self.totals.update("one", late)
        self.totals.update("one", early)
        self.assertEqual(scrape(self.totals)[GET_2XX], 2)

    def test_retire_unknown_worker(self) -> None:
        """Retiring a worker that never answered changes nothing."""
        self.totals.update("one", self.one.snapshot())
        self.totals.retire("never answered")
        self.assertEqual(self.totals.live, 1)

    def test_nothing_yet(self) -> None:
        """Before any worker answered there are no figures (not zeros)."""
        self.assertRaises(NoFigures, self.totals.families)
        self.assertRaises(NoFigures, generate_latest, self.totals)

    def test_labels_only_one_worker_has(self) -> None:
        """A label set seen in one worker only is reported as that worker's value."""
        self.one.requests(1, error="dns_timeout", status=504)
        self.two.requests(1, error="connection_refused", status=502)
        self.totals.update("one", self.one.snapshot())
        self.totals.update("two", self.two.snapshot())
        samples = scrape(self.totals)
        self.assertEqual(samples[("aproxy_errors_total", (("error", "dns_timeout"),))], 1)
        self.assertEqual(samples[("aproxy_errors_total", (("error", "connection_refused"),))], 1)

    def test_history_summed_and_kept(self) -> None:
        """The histories are summed; an ended worker's history stays in the window."""
        self.one.requests(2, target="http://a.example/")
        self.two.requests(1, target="http://b.example/")
        self.totals.update("one", self.one.snapshot())
        self.totals.update("two", self.two.snapshot())
        self.totals.retire("one")
        history = self.totals.history(START)
        self.assertEqual(dict(history.totals(START, "hosts")), {"a.example": 2, "b.example": 1})
        self.assertEqual(history.start, START)


class SnapshotFormatTests(SynchronousTestCase):
    """The snapshot's wire form."""

    def test_round_trip(self) -> None:
        """Families, labels, values and history buckets survive encoding."""
        clock = Clock()
        clock.advance(START)
        worker = _Worker(clock)
        worker.requests(2, error="dns_timeout", target="http://x.example/")
        worker.requests(1, target="http://x.example/", cache="TCP_MEM_HIT", bytes_to_client=70)
        snapshot = worker.snapshot()
        families = {f.name: f for f in snapshot.families}
        self.assertEqual(families["aproxy_requests"].type, "counter")
        self.assertEqual(
            families["aproxy_errors"].samples[("aproxy_errors_total", (("error", "dns_timeout"),))],
            2.0,
        )
        [bucket] = snapshot.buckets
        self.assertEqual((bucket.requests, dict(bucket.hosts)), (3, {"x.example": 3}))
        self.assertEqual((bucket.cache_requests, bucket.cache_hits, bucket.saved), (1, 1, 70.0))
        self.assertEqual(dict(bucket.errors), {"dns_timeout": 2})
        self.assertEqual(bucket.connections, 0)

    def test_sequence_increases(self) -> None:
        """Every snapshot a process gives has a higher sequence number."""
        worker = _Worker(Clock())
        first, second = worker.snapshot(), worker.snapshot()
        self.assertGreater(second.seq, first.seq)

    def test_garbage_refused(self) -> None:
        """Anything but a snapshot is a ValueError."""
        for data in (b"", b"[]", b"{}", b'{"seq": 1, "families": [{}], "history": []}', b"\xff"):
            self.assertRaises(ValueError, decode_snapshot, data)

    def test_family_defaults(self) -> None:
        """A Family starts with no samples."""
        self.assertEqual(Family("a", "gauge", "help").samples, {})


class SnapshotSocketTests(TestCase):
    """A worker serves snapshots on a unix socket; the parent fetches and sums them."""

    timeout = 20

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="aproxy-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.clock = Clock()
        self.clock.advance(START)

    def warnings(self) -> list[str]:
        """The formats of the "no metrics" messages logged during the test."""
        seen: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            text = event.get("log_format") or ""
            if text.startswith("no metrics"):
                seen.append(text)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return seen

    @inlineCallbacks
    def serve(self, name: str, worker: _Worker) -> Generator[Any, Any, str]:
        """Serve C{worker}'s snapshots at a socket called C{name}; its path."""
        path = os.path.join(self.directory, name)
        port = yield UNIXServerEndpoint(reactor, path, mode=0o600).listen(
            SnapshotFactory(worker.metrics, self.clock)
        )
        self.addCleanup(port.stopListening)
        return path

    @inlineCallbacks
    def test_fetch(self) -> Generator[Any, Any, None]:
        """The parent gets the worker's current snapshot."""
        worker = _Worker(self.clock)
        worker.requests(3)
        path = yield self.serve("w", worker)
        snapshot = yield fetch_snapshot(reactor, path)
        self.assertEqual(snapshot.buckets[0].requests, 3)

    @inlineCallbacks
    def test_fetch_nobody_there(self) -> Generator[Any, Any, None]:
        """No socket: the fetch fails."""
        yield self.assertFailure(
            fetch_snapshot(reactor, os.path.join(self.directory, "none")), ConnectError
        )

    @inlineCallbacks
    def test_fetch_times_out(self) -> Generator[Any, Any, None]:
        """A worker that doesn't answer in time: the fetch fails, the connection is closed."""
        path = os.path.join(self.directory, "silent")
        lost: Deferred[None] = Deferred()

        class Silent(Protocol):
            def connectionLost(self, reason: object = None) -> None:
                lost.callback(None)

        port = yield UNIXServerEndpoint(reactor, path).listen(Factory.forProtocol(Silent))
        self.addCleanup(port.stopListening)
        yield self.assertFailure(fetch_snapshot(reactor, path, timeout=0.2), TimeoutError)
        yield lost

    @inlineCallbacks
    def test_parent_pages(self) -> Generator[Any, Any, None]:
        """WorkerTotals renders /metrics and /status with the live workers' totals."""
        # The parent reads the reactor's time: the workers' recent history is on show.
        self.clock.advance(reactor.seconds() - self.clock.seconds())
        one, two = _Worker(self.clock), _Worker(self.clock)
        one.requests(2, target="http://one.example/")
        two.requests(5, target="http://two.example/")
        live: dict[Hashable, str] = {
            "one": (yield self.serve("one", one)),
            "two": (yield self.serve("two", two)),
        }
        parent = WorkerTotals(ProxyConfig(), reactor, lambda: dict(live), self.directory)
        text = yield parent.render_metrics()
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        [total] = [s for s in families["aproxy_requests"].samples if s.name.endswith("_total")]
        self.assertEqual(total.value, 7)
        page = yield parent.render_status()
        self.assertIn(b"workers<b>2</b>", page)
        self.assertIn(b"<td>two.example</td>", page)
        self.assertIn(b"<svg", page)

    @inlineCallbacks
    def test_answer_after_the_worker_ended_dropped(self) -> Generator[Any, Any, None]:
        """A snapshot that arrives after its worker ended (and was retired) is not taken."""
        worker = _Worker(self.clock)
        worker.requests(1)
        live: dict[Hashable, str] = {"one": (yield self.serve("one", worker))}
        parent = WorkerTotals(ProxyConfig(), reactor, lambda: dict(live), self.directory)
        refreshed = parent.refresh()
        del live["one"]
        yield refreshed
        self.assertEqual(parent.totals.live, 0)

    @inlineCallbacks
    def test_unreachable_worker_keeps_its_last_snapshot(self) -> Generator[Any, Any, None]:
        """A worker that doesn't answer is counted with what it said before."""
        worker = _Worker(self.clock)
        worker.requests(4)
        path = os.path.join(self.directory, "one")
        port = yield UNIXServerEndpoint(reactor, path).listen(
            SnapshotFactory(worker.metrics, self.clock)
        )
        workers: dict[Hashable, str] = {"one": path}
        parent = WorkerTotals(ProxyConfig(), reactor, lambda: workers, self.directory)
        warnings = self.warnings()
        yield parent.refresh()
        yield port.stopListening()
        yield parent.refresh()
        self.assertEqual(parent.totals.value("aproxy_requests_total"), 4)
        self.assertEqual(len(warnings), 1)

    @inlineCallbacks
    def test_starting_worker_quiet(self) -> Generator[Any, Any, None]:
        """A worker that never answered yet (it is starting) is not warned about."""
        path = os.path.join(self.directory, "starting")
        workers: dict[Hashable, str] = {"one": path}
        parent = WorkerTotals(ProxyConfig(), reactor, lambda: workers, self.directory)
        warnings = self.warnings()
        yield parent.refresh()
        self.assertEqual(warnings, [])
        self.assertFalse(parent.totals.answered("one"))

    def test_close_removes_the_directory(self) -> None:
        """close() removes the private directory, which only its owner may enter."""
        parent = WorkerTotals(ProxyConfig(), self.clock, dict)
        self.assertEqual(os.stat(parent.directory).st_mode & 0o777, 0o700)
        parent.close()
        self.assertFalse(os.path.exists(parent.directory))


class SharedDiskGaugeTests(SynchronousTestCase):
    """The disk cache is one store for all workers: its gauges are counted once."""

    def test_disk_tier_taken_once_memory_summed(self) -> None:
        """Two workers reporting the same disk figures give that figure, not twice it."""
        totals = Totals()
        for worker, memory in ((1, 10.0), (2, 30.0)):
            family = Family("aproxy_cache_bytes", "gauge", "bytes")
            family.samples[("aproxy_cache_bytes", (("tier", "disk"),))] = 500.0
            family.samples[("aproxy_cache_bytes", (("tier", "memory"),))] = memory
            totals.update(worker, Snapshot(worker, (family,), ()))
        [summed] = totals.families()
        self.assertEqual(summed.samples[("aproxy_cache_bytes", (("tier", "disk"),))], 500.0)
        self.assertEqual(summed.samples[("aproxy_cache_bytes", (("tier", "memory"),))], 40.0)

    def test_parent_up_is_any_worker(self) -> None:
        """A pool member is up in the totals when any worker has it up (not 2 for two)."""
        totals = Totals()
        for worker, up in ((1, 1.0), (2, 1.0), (3, 0.0)):
            family = Family("aproxy_parent_up", "gauge", "up")
            family.samples[("aproxy_parent_up", (("parent", "http://p:1"),))] = up
            totals.update(worker, Snapshot(worker, (family,), ()))
        [summed] = totals.families()
        self.assertEqual(summed.samples[("aproxy_parent_up", (("parent", "http://p:1"),))], 1.0)
