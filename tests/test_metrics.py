"""
Tests for L{aproxy.observe.metrics} and L{aproxy.observe.status}: Prometheus metrics after known
traffic, the 15-minute history, and the C{/metrics} and C{/status} site, all on a fake
clock and in-memory transports.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.observe.metrics import Metrics, metrics_site, pages_site
from aproxy.observe.status import BUCKET_SECONDS, BUCKETS, History, destination_host, render_status
from aproxy.testing import RecordingConnector
from tests.sites import Collect, fetch
from tests.support import GET_A, OK_5, ProxyTestCase, exchange

CONNECT_A = b"CONNECT secure.example:443 HTTP/1.1\r\nHost: secure.example:443\r\n\r\n"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a parsed scrape, keyed by sample name and sorted labels."""
    text = metrics.render().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsTests(SynchronousTestCase):
    """Counters and histograms count the Exchange records they are given."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = ProxyFactory(ProxyConfig(), self.clock, connector=RecordingConnector())
        self.metrics = Metrics(self.factory, self.clock)

    def test_requests_by_method_and_status_class(self) -> None:
        """Requests are counted per method and status class; status 0 is 0xx."""
        for method, status in [("GET", 200), ("GET", 204), ("POST", 502), ("GET", 0)]:
            self.metrics(exchange(method=method, status=status))
        found = samples(self.metrics)
        self.assertEqual(
            found[("aproxy_requests_total", (("method", "GET"), ("status_class", "2xx")))], 2
        )
        self.assertEqual(
            found[("aproxy_requests_total", (("method", "POST"), ("status_class", "5xx")))], 1
        )
        self.assertEqual(
            found[("aproxy_requests_total", (("method", "GET"), ("status_class", "0xx")))], 1
        )

    def test_unknown_methods_share_one_label(self) -> None:
        """Methods outside the standard set are counted as "other", bounding the series."""
        self.metrics(exchange(method="BREW", status=400))
        self.metrics(exchange(method="X-ANYTHING", status=400))
        found = samples(self.metrics)
        self.assertEqual(
            found[("aproxy_requests_total", (("method", "other"), ("status_class", "4xx")))], 2
        )

    def test_bytes_both_directions(self) -> None:
        """Bytes to clients and to origins are summed separately."""
        self.metrics(exchange(bytes_to_client=1000, bytes_to_origin=10))
        self.metrics(exchange(bytes_to_client=24, bytes_to_origin=5))
        found = samples(self.metrics)
        self.assertEqual(found[("aproxy_bytes_total", (("direction", "to_client"),))], 1024)
        self.assertEqual(found[("aproxy_bytes_total", (("direction", "to_origin"),))], 15)

    def test_errors_by_type(self) -> None:
        """Exchanges with an error are counted by its type; others are not errors."""
        self.metrics(exchange(status=502, error="connection_refused"))
        self.metrics(exchange(status=502, error="connection_refused"))
        self.metrics(exchange(status=504, error="connection_timeout"))
        self.metrics(exchange())
        found = samples(self.metrics)
        errors = {k[1]: v for k, v in found.items() if k[0] == "aproxy_errors_total"}
        self.assertEqual(
            errors,
            {(("error", "connection_refused"),): 2, (("error", "connection_timeout"),): 1},
        )

    def test_request_duration_histogram(self) -> None:
        """Durations land in the histogram's buckets, count and sum."""
        for duration in (0.003, 0.2, 7200.0):
            self.metrics(exchange(duration=duration))
        found = samples(self.metrics)
        name = "aproxy_request_duration_seconds"
        self.assertEqual(found[(name + "_count", ())], 3)
        self.assertAlmostEqual(found[(name + "_sum", ())], 7200.203)
        self.assertEqual(found[(name + "_bucket", (("le", "0.005"),))], 1)
        self.assertEqual(found[(name + "_bucket", (("le", "0.25"),))], 2)
        self.assertEqual(found[(name + "_bucket", (("le", "3600.0"),))], 2)
        self.assertEqual(found[(name + "_bucket", (("le", "+Inf"),))], 3)

    def test_connect_histogram(self) -> None:
        """observe_connect feeds the upstream connect-time histogram."""
        self.metrics.observe_connect(0.004)
        self.metrics.observe_connect(1.5)
        found = samples(self.metrics)
        name = "aproxy_upstream_connect_seconds"
        self.assertEqual(found[(name + "_count", ())], 2)
        self.assertEqual(found[(name + "_bucket", (("le", "0.005"),))], 1)

    def test_idle_proxy_reports_zero_gauges(self) -> None:
        """With no traffic every gauge and mirrored counter is present and zero."""
        found = samples(self.metrics)
        for name in (
            "aproxy_client_connections",
            "aproxy_tunnels",
            "aproxy_upstream_pool_connections",
            "aproxy_upstream_reused_total",
        ):
            self.assertEqual(found[(name, ())], 0, name)

    def test_own_registry(self) -> None:
        """Each Metrics has its own registry: two can coexist and the global one is untouched."""
        other = Metrics(self.factory, self.clock)
        self.metrics(exchange())
        self.assertEqual(samples(other)[("aproxy_bytes_total", (("direction", "to_client"),))], 0)
        self.assertIsNone(REGISTRY.get_sample_value("aproxy_bytes_total"))

    def test_given_registry(self) -> None:
        """Metrics can be registered in a registry the caller supplies."""
        registry = CollectorRegistry()
        metrics = Metrics(self.factory, self.clock, registry)
        metrics(exchange(bytes_to_origin=7))
        self.assertEqual(
            registry.get_sample_value("aproxy_bytes_total", {"direction": "to_origin"}), 7
        )


class TrafficTests(ProxyTestCase):
    """Gauges read from a live factory after real requests through L{ProxyProtocol}."""

    def setUp(self) -> None:
        super().setUp()
        self.metrics = Metrics(self.factory, self.clock)
        self.factory.observers.append(self.metrics)

    def test_forwarded_requests_and_pool(self) -> None:
        """Two keep-alive GETs: counted, bytes match, one pooled connection reused once."""
        attempt, upstream = self.forward()
        attempt.respond(OK_5)
        self.proto.dataReceived(GET_A)
        attempt.respond(OK_5)
        found = samples(self.metrics)
        self.assertEqual(
            found[("aproxy_requests_total", (("method", "GET"), ("status_class", "2xx")))], 2
        )
        self.assertEqual(
            found[("aproxy_bytes_total", (("direction", "to_client"),))], len(self.client.value())
        )
        self.assertEqual(
            found[("aproxy_bytes_total", (("direction", "to_origin"),))], len(upstream.value())
        )
        self.assertEqual(found[("aproxy_upstream_reused_total", ())], 1)
        self.assertEqual(found[("aproxy_upstream_pool_connections", ())], 1)
        self.assertEqual(found[("aproxy_client_connections", ())], 1)
        self.assertEqual(found[("aproxy_request_duration_seconds_count", ())], 2)

    def test_tunnel_gauge(self) -> None:
        """An open CONNECT tunnel counts as a tunnel and as a client connection."""
        self.connect_client()
        self.forward(CONNECT_A)
        found = samples(self.metrics)
        self.assertEqual(found[("aproxy_client_connections", ())], 2)
        self.assertEqual(found[("aproxy_tunnels", ())], 1)


class _WatchedSet(set[Any]):
    """A set that counts how often it is iterated (walked)."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()


UPGRADE_B = (
    b"GET http://ws.example/chat HTTP/1.1\r\nHost: ws.example\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


class IncrementalGaugeTests(ProxyTestCase):
    """
    The tunnel gauge is counted as tunnels open and close (issue 12 item 11): reading
    it after every finished request used to walk every open connection, so 2,000 idle
    clients halved throughput with --metrics.
    """

    def setUp(self) -> None:
        super().setUp()
        self.metrics = Metrics(self.factory, self.clock)
        self.factory.observers.append(self.metrics)

    def gauges(self) -> tuple[int, int]:
        """The scraped client connection and tunnel gauges."""
        found = samples(self.metrics)
        connections = int(found[("aproxy_client_connections", ())])
        tunnels = int(found[("aproxy_tunnels", ())])
        walked = sum(1 for proto in list(self.factory.connections) if proto.is_tunnel)
        self.assertEqual(tunnels, walked)
        return connections, tunnels

    def test_finished_request_does_not_walk_connections(self) -> None:
        """Finishing a request with metrics on reads the gauges without a walk."""
        _WatchedSet.walks = 0
        watched = _WatchedSet(self.factory.connections)
        self.factory.connections = watched
        for _ in range(100):
            self.connect_client()
        attempt, _ = self.forward()
        attempt.respond(OK_5)
        self.assertEqual(self.metrics.history.buckets()[-1].requests, 1)
        self.assertEqual(_WatchedSet.walks, 0)

    def test_tunnels_through_open_and_close(self) -> None:
        """
        CONNECT and Upgrade tunnels are counted while open, whichever side ends them
        (client gone, origin gone, idle timeout, shutdown), never below zero.
        """
        self.assertEqual(self.gauges(), (1, 0))
        # A CONNECT tunnel on the first connection, ended by the client.
        connect, _ = self.forward(CONNECT_A)
        self.assertEqual(self.gauges(), (1, 1))
        # An Upgrade tunnel on a second connection, ended by the origin.
        client2, proto2 = self.connect_client()
        proto2.dataReceived(UPGRADE_B)
        upgrade = self.connector.attempts[-1]
        upgrade.succeed()
        self.assertEqual(self.gauges(), (2, 1))
        upgrade.respond(SWITCH)
        self.assertEqual(self.gauges(), (2, 2))
        # A refused CONNECT is no tunnel.
        client3, proto3 = self.connect_client()
        proto3.dataReceived(b"CONNECT a.example:22 HTTP/1.1\r\nHost: a.example:22\r\n\r\n")
        self.assertTrue(client3.value().startswith(b"HTTP/1.1 403 "))
        proto3.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gauges(), (2, 2))
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gauges(), (1, 1))
        upgrade.close()
        self.assertEqual(self.gauges()[1], 0)
        proto2.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gauges(), (0, 0))
        # One closed by the idle timeout, then its connection goes: counted once.
        client4, proto4 = self.connect_client()
        proto4.dataReceived(CONNECT_A)
        self.connector.attempts[-1].succeed()
        self.assertEqual(self.gauges(), (1, 1))
        self.clock.advance(self.factory.config.tunnel_idle_timeout * 1.2)
        self.assertEqual(self.gauges()[1], 0)
        proto4.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gauges(), (0, 0))
        # One open at shutdown, aborted when the drain times out.
        client5, proto5 = self.connect_client()
        proto5.dataReceived(CONNECT_A)
        self.connector.attempts[-1].succeed()
        self.assertEqual(self.gauges(), (1, 1))
        self.factory.drain(1.0)
        self.clock.advance(1.0)
        self.assertTrue(client5.disconnecting)
        proto5.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gauges(), (0, 0))
        self.assertEqual(self.factory.tunnels, 0)


class DestinationHostTests(SynchronousTestCase):
    """The destination host is taken from each kind of request target."""

    def test_connect_authority(self) -> None:
        """A CONNECT target gives its host without the port, IPv6 without brackets."""
        self.assertEqual(destination_host("CONNECT", "Example.COM:443"), "example.com")
        self.assertEqual(destination_host("CONNECT", "[::1]:443"), "::1")

    def test_absolute_form(self) -> None:
        """An absolute-form target gives its host, lower-cased, without port or path."""
        self.assertEqual(destination_host("GET", "http://A.Example:8080/x?y"), "a.example")

    def test_no_host(self) -> None:
        """Origin-form, asterisk-form and unparseable targets name no host."""
        self.assertIsNone(destination_host("GET", "/local"))
        self.assertIsNone(destination_host("OPTIONS", "*"))
        self.assertIsNone(destination_host("GET", "http://[::1/"))


class HistoryTests(SynchronousTestCase):
    """The ring of 10-second buckets behind the status page."""

    def test_requests_in_their_buckets(self) -> None:
        """Each exchange is counted in the bucket of the time it finished."""
        history = History(1000.0)
        history.record(1001.0, exchange())
        history.record(1005.0, exchange())
        history.record(1012.0, exchange())
        window = history.window(1015.0)
        self.assertEqual(len(window), BUCKETS)
        counts = [bucket.requests for _, bucket in window if bucket is not None]
        self.assertEqual(counts, [2, 1])
        self.assertEqual(window[-1][0], 5.0)
        self.assertEqual(window[-2][0], BUCKET_SECONDS)
        self.assertEqual(window[-3][0], 0.0)

    def test_bytes_spread_over_duration(self) -> None:
        """A long exchange's bytes are spread over the buckets it lasted."""
        history = History(0.0)
        history.record(105.0, exchange(duration=30.0, bytes_to_client=3000, bytes_to_origin=60))
        window = history.window(105.0)
        spread = [
            (round(bucket.to_client), round(bucket.to_origin))
            for _, bucket in window
            if bucket is not None
        ]
        self.assertEqual(spread, [(500, 10), (1000, 20), (1000, 20), (500, 10)])

    def test_cache_hits_and_bytes_saved(self) -> None:
        """Requests the cache saw, those it answered and the bytes it sent are counted;
        the status page shows the hit ratio and the bytes saved, as tiles and charts."""
        history = History(1000.0)
        history.record(1001.0, exchange(cache="TCP_MEM_HIT", bytes_to_client=400))
        history.record(1002.0, exchange(cache="TCP_REFRESH_UNMODIFIED", bytes_to_client=100))
        history.record(1003.0, exchange(cache="TCP_MISS", bytes_to_client=900))
        history.record(1004.0, exchange(bytes_to_client=5))  # (no cache)
        [bucket] = [b for _, b in history.window(1005.0) if b is not None]
        self.assertEqual((bucket.cache_requests, bucket.cache_hits, bucket.saved), (3, 2, 500.0))
        page = render_status(history, 1005.0, 0, 0, 0, 0, ProxyConfig(), "1").decode()
        self.assertIn("cache hits<b>67%</b>", page)
        self.assertIn("saved by cache<b>500 B</b>", page)
        self.assertIn("cache hit ratio", page)
        plain = History(1000.0)
        plain.record(1001.0, exchange())
        page = render_status(plain, 1005.0, 0, 0, 0, 0, ProxyConfig(), "1").decode()
        self.assertNotIn("cache", page.split("<h2>Configuration</h2>")[0])

    def test_old_buckets_forgotten(self) -> None:
        """After 15 minutes a bucket's slot is reused and its counts are gone."""
        history = History(0.0)
        history.record(5.0, exchange(target="http://old.example/"))
        later = 5.0 + BUCKETS * BUCKET_SECONDS
        history.record(later, exchange(target="http://new.example/"))
        self.assertEqual(dict(history.totals(later, "hosts")), {"new.example": 1})

    def test_destinations_bounded(self) -> None:
        """Ever new host names in one bucket are capped, the excess counted as (other)."""
        history = History(0.0)
        for i in range(600):
            history.record(1.0, exchange(target=f"http://h{i}.example/"))
        hosts = history.totals(1.0, "hosts")
        self.assertEqual(len(hosts), 501)
        self.assertEqual(hosts["(other)"], 100)

    def test_gauge_samples_keep_the_peak(self) -> None:
        """Samples in one bucket keep the highest connection and tunnel counts."""
        history = History(0.0)
        history.sample(1.0, 3, 1)
        history.sample(2.0, 5, 0)
        bucket = history.window(2.0)[-1][1]
        assert bucket is not None
        self.assertEqual((bucket.connections, bucket.tunnels), (5, 1))


class HistoryMergeTests(SynchronousTestCase):
    """Summing histories of several processes (--workers) into one."""

    def test_same_interval_summed(self) -> None:
        """Buckets of the same interval add their counts, bytes, errors and hosts."""
        one, two = History(0.0), History(0.0)
        one.record(1.0, exchange(target="http://a.example/", bytes_to_client=10))
        two.record(2.0, exchange(target="http://a.example/", bytes_to_client=5))
        two.record(3.0, exchange(target="http://b.example/", error="dns_timeout"))
        two.record(15.0, exchange(target="http://b.example/"))
        total = History(0.0)
        total.merge(one.buckets())
        total.merge(two.buckets())
        counts = [(b.index, b.requests) for _, b in total.window(15.0) if b is not None]
        self.assertEqual(counts, [(0, 3), (1, 1)])
        self.assertEqual(dict(total.totals(15.0, "hosts")), {"a.example": 2, "b.example": 2})
        self.assertEqual(dict(total.totals(15.0, "errors")), {"dns_timeout": 1})
        first = total.window(15.0)[-2][1]
        assert first is not None
        self.assertEqual(first.to_client, 115.0)

    def test_sampled_gauges_summed(self) -> None:
        """Each process's peak is added; a bucket one process never sampled adds nothing."""
        one, two, three = History(0.0), History(0.0), History(0.0)
        one.sample(1.0, 3, 1)
        two.sample(2.0, 4, 0)
        three.record(3.0, exchange())
        total = History(0.0)
        for history in (three, one, two):
            total.merge(history.buckets())
        bucket = total.window(3.0)[-1][1]
        assert bucket is not None
        self.assertEqual((bucket.requests, bucket.connections, bucket.tunnels), (1, 7, 1))

    def test_older_than_the_slot_ignored(self) -> None:
        """A bucket 15 minutes older than the one in its slot is outside the window."""
        old, new = History(0.0), History(0.0)
        old.record(5.0, exchange(target="http://old.example/"))
        later = 5.0 + BUCKETS * BUCKET_SECONDS
        new.record(later, exchange(target="http://new.example/"))
        total = History(0.0)
        total.merge(new.buckets())
        total.merge(old.buckets())
        self.assertEqual(dict(total.totals(later, "hosts")), {"new.example": 1})
        again = History(0.0)
        again.merge(old.buckets())
        again.merge(new.buckets())
        self.assertEqual(dict(again.totals(later, "hosts")), {"new.example": 1})

    def test_keys_stay_bounded(self) -> None:
        """Merging keeps the cap on distinct destinations per bucket."""
        one, two = History(0.0), History(0.0)
        for i in range(400):
            one.record(1.0, exchange(target=f"http://one{i}.example/"))
            two.record(1.0, exchange(target=f"http://two{i}.example/"))
        total = History(0.0)
        total.merge(one.buckets())
        total.merge(two.buckets())
        hosts = total.totals(1.0, "hosts")
        self.assertEqual(len(hosts), 501)
        self.assertEqual(hosts["(other)"], 300)

    def test_buckets_oldest_first(self) -> None:
        """buckets() lists only buckets with data, oldest first."""
        history = History(0.0)
        history.record(25.0, exchange())
        history.record(5.0, exchange())
        self.assertEqual([b.index for b in history.buckets()], [0, 2])

    def test_workers_tile(self) -> None:
        """With a worker count, the status page shows it as a tile."""
        page = render_status(History(0.0), 10.0, 0, 0, 0, 0, ProxyConfig(), "1", workers=3)
        self.assertIn(b"workers<b>3</b>", page)
        page = render_status(History(0.0), 10.0, 0, 0, 0, 0, ProxyConfig(), "1")
        self.assertNotIn(b"workers<b>", page)


class SiteTests(SynchronousTestCase):
    """The HTTP site serves /metrics and /status and nothing else."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = ProxyFactory(ProxyConfig(), self.clock, connector=RecordingConnector())
        self.metrics = Metrics(self.factory, self.clock)
        self.site = metrics_site(self.metrics, self.factory)

    def traffic(self) -> None:
        """A minute of requests to two destinations, one of them with a hostile name."""
        for second in range(60):
            self.clock.advance(1)
            self.metrics(exchange(target="http://a.example/x", bytes_to_client=2000))
            if second % 3 == 0:
                self.metrics(exchange(method="CONNECT", target="<script>alert(1)</script>:443"))

    def test_metrics_endpoint(self) -> None:
        """GET /metrics answers in the Prometheus text format with the counts."""
        self.traffic()
        status, headers, body = fetch(self.site, b"/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"text/plain; version=0.0.4; charset=utf-8")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        [total] = [s for s in families["aproxy_requests"].samples if s.labels["method"] == "GET"]
        self.assertEqual(total.value, 60)

    def test_status_page(self) -> None:
        """GET /status is HTML with the connection count, a destination and SVG charts."""
        self.traffic()
        status, headers, body = fetch(self.site, b"/status")
        page = body.decode("utf-8")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        self.assertIn(b"default-src 'none'", headers[b"content-security-policy"])
        self.assertIn("client connections<b>0</b>", page)
        self.assertIn('<td>a.example</td><td class="num">60</td>', page)
        self.assertIn("<svg", page)
        self.assertIn("<polyline", page)
        self.assertNotIn("<script", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)

    def test_status_shows_configuration(self) -> None:
        """The configuration table lists the fields with their values."""
        _, _, body = fetch(self.site, b"/status")
        page = body.decode("utf-8")
        self.assertIn("<td>connect_timeout</td><td>10.0</td>", page)
        self.assertIn("<td>connect_ports</td><td>443</td>", page)
        self.assertIn("<td>http_ports</td><td>80, 443, 1025-65535</td>", page)

    def test_status_shows_auth_file_path_not_contents(self) -> None:
        """The password file's path is shown; nothing from inside it is."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "htpasswd")
        digest = base64.b64encode(hashlib.sha1(b"hunter2").digest()).decode()
        with open(path, "w") as f:
            f.write(f"alice-the-user:{{SHA}}{digest}\n")
        factory = ProxyFactory(ProxyConfig(auth=path), self.clock, connector=RecordingConnector())
        site = metrics_site(Metrics(factory, self.clock), factory)
        page = fetch(site, b"/status")[2].decode("utf-8")
        self.assertIn(path, page)
        self.assertNotIn("alice-the-user", page)
        self.assertNotIn(digest, page)

    def test_status_hides_parent_credentials(self) -> None:
        """Parent URLs are shown without the user name and password in them."""
        config = ProxyConfig(
            route=("*.corp.example=http://bob:hunter2@10.1.2.3:3128",),
            upstream="socks5://eve:swordfish@127.0.0.1:1080",
        )
        factory = ProxyFactory(config, self.clock, connector=RecordingConnector())
        page = fetch(metrics_site(Metrics(factory, self.clock), factory), b"/status")[2].decode()
        self.assertIn("<td>route</td><td>*.corp.example=http://***@10.1.2.3:3128</td>", page)
        self.assertIn("<td>upstream</td><td>socks5://***@127.0.0.1:1080</td>", page)
        for secret in ("bob", "hunter2", "eve", "swordfish"):
            self.assertNotIn(secret, page)

    def test_unknown_paths_404(self) -> None:
        """The root, unknown paths and paths below the two pages are 404."""
        for path in (b"/", b"/nothing", b"/metrics/extra", b"/status/"):
            self.assertEqual(fetch(self.site, path)[0], 404, path)

    def test_other_methods_405(self) -> None:
        """Only GET and HEAD are served; anything else is 405 with Allow."""
        status, headers, _ = fetch(self.site, b"/metrics", b"POST")
        self.assertEqual(status, 405)
        self.assertEqual(headers[b"allow"], b"GET, HEAD")

    def test_head(self) -> None:
        """HEAD /metrics answers 200 with the headers and no body."""
        status, headers, body = fetch(self.site, b"/metrics", b"HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain"))


class LaterPagesTests(SynchronousTestCase):
    """pages_site: a page whose body comes later (the parent's totals with --workers)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: Deferred[bytes] = Deferred()
        self.site = pages_site(lambda: self.pending, lambda: b"<p>now</p>", self.clock)

    def start(self, method: bytes = b"GET") -> tuple[Collect, iosim.IOPump]:
        """Send a request for /metrics; the answer waits for C{self.pending}."""
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9090))
        client = Collect()
        transport = iosim.makeFakeClient(client)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, transport, greet=False)
        transport.write(method + b" /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        pump.flush()
        return client, pump

    def test_written_when_it_arrives(self) -> None:
        """Nothing is sent until the body arrives, then it is, with its length."""
        client, pump = self.start()
        self.assertEqual(client.data, b"")
        self.pending.callback(b"aproxy_x 1\n")
        pump.flush()
        head, _, body = client.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"Content-Length: 11", head)
        self.assertIn(b"Content-Type: text/plain; version=0.0.4", head)
        self.assertEqual(body, b"aproxy_x 1\n")

    def test_head(self) -> None:
        """HEAD gets the header fields only."""
        client, pump = self.start(b"HEAD")
        self.pending.callback(b"aproxy_x 1\n")
        pump.flush()
        head, _, body = client.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, b"")

    def test_failure_is_503(self) -> None:
        """A body that fails is a 503 page (and the failure is logged)."""
        client, pump = self.start()
        self.pending.errback(ZeroDivisionError("no figures"))
        pump.flush()
        self.assertTrue(client.data.startswith(b"HTTP/1.1 503 "), client.data)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_client_gone(self) -> None:
        """A body that arrives after the client left is dropped quietly."""
        client, pump = self.start()
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
        self.pending.callback(b"late")
        pump.flush()
        self.assertEqual(client.data, b"")

    def test_immediate_body(self) -> None:
        """A page that gives bytes at once is served as before."""
        status, headers, body = fetch(self.site, b"/status")
        self.assertEqual((status, body), (200, b"<p>now</p>"))
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")


_CHROMIUM = next(
    (
        path
        for path in (
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if path
    ),
    None,
)


class ScreenshotTests(SynchronousTestCase):
    """The status page renders in a real browser (only where Chromium is installed)."""

    def test_headless_screenshot(self) -> None:
        """Headless Chromium renders /status to a PNG, with no console errors."""
        if _CHROMIUM is None:
            self.skipTest("Chromium is not installed")
        clock = Clock()
        clock.advance(1_700_000_000)
        factory = ProxyFactory(ProxyConfig(), clock, connector=RecordingConnector())
        metrics = Metrics(factory, clock)
        for second in range(300):
            clock.advance(1)
            for _ in range(second % 7):
                metrics(exchange(target=f"http://host{second % 5}.example/", duration=0.5))
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        page = os.path.join(directory, "status.html")
        png = os.path.join(directory, "status.png")
        with open(page, "wb") as f:
            f.write(metrics.render_status())
        result = subprocess.run(
            [
                _CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={directory}/profile",
                "--enable-logging=stderr",
                f"--screenshot={png}",
                "--window-size=1200,900",
                "file://" + page,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertTrue(os.path.exists(png), result.stderr[-2000:])
        self.assertGreater(os.path.getsize(png), 1000)
        # With --enable-logging=stderr, messages from the page's console appear as
        # "CONSOLE(...)" lines; the page has no script, so there must be none.
        self.assertNotIn("CONSOLE", result.stderr)
        self.assertNotIn("Uncaught", result.stderr)


class CACertificatePageTests(SynchronousTestCase):
    """With --intercept the metrics site serves the CA certificate (never its key)."""

    def test_ca_pem(self) -> None:
        """/ca.pem is the CA certificate; /status links it; without --intercept, 404."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        clock = Clock()
        config = ProxyConfig(intercept=("*",), ca_dir=directory)
        factory = ProxyFactory(config, clock, connector=RecordingConnector())
        site = metrics_site(Metrics(factory, clock, CollectorRegistry()), factory)
        status, headers, body = fetch(site, b"/ca.pem")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"application/x-pem-file")
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            self.assertEqual(body, f.read())
        self.assertNotIn(b"PRIVATE", body)
        _, _, page = fetch(site, b"/status")
        self.assertIn(b'<a href="ca.pem">', page)
        plain = ProxyFactory(ProxyConfig(), clock, connector=RecordingConnector())
        plain_site = metrics_site(Metrics(plain, clock, CollectorRegistry()), plain)
        self.assertEqual(fetch(plain_site, b"/ca.pem")[0], 404)
