"""
Prometheus metrics and a status page for a running proxy.

L{Metrics} is an L{Exchange} observer (add it to C{ProxyFactory.observers}) that counts
requests, bytes, errors and durations in its own C{prometheus_client} registry, reads
the factory's gauges (connections, tunnels, pooled upstream connections) at scrape time,
and keeps 15 minutes of history for the C{/status} page (L{aproxy.observe.status}).
L{metrics_site} serves both over HTTP: C{GET /metrics} and C{GET /status}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Union

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aproxy.access.pac import PAC_CONTENT_TYPE, pac_body
from aproxy.observe.records import Exchange
from aproxy.observe.status import History, render_status

if TYPE_CHECKING:
    from aproxy.client.factory import ProxyFactory

__all__ = ["METRICS_CONTENT_TYPE", "Metrics", "Page", "metrics_site", "pages_site"]

log = Logger()

Page = Callable[[], Union[bytes, "Deferred[bytes]"]]
"""What renders one page: its body now, or a Deferred that fires with it (or fails: 503)."""

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The content type of the Prometheus text exposition format that L{Metrics.render} uses."""

# Methods get their own label value; anything else a client sends is counted as
# "other", so a client can't create unbounded label values (time series).
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# Requests take milliseconds to minutes; tunnels (counted when they close) take hours.
_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
_ALLOWED = (b"GET", b"HEAD")
_CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _tunnels(factory: ProxyFactory) -> int:
    """
    The client connections that are tunnels (CONNECT or Upgrade) right now: the
    factory's running count, since this is read after every finished request and
    walking every open connection then made idle connections slow everyone down.
    """
    return factory.tunnels


class _FactoryCollector:
    """The gauges read from the factory at scrape time."""

    def __init__(self, factory: ProxyFactory) -> None:
        self._factory = factory

    def describe(self) -> list[Metric]:
        """The metric names this collector yields, for the registry's duplicate check."""
        return list(self._families(0, 0, 0, 0))

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        factory = self._factory
        return self._families(
            len(factory.connections), _tunnels(factory), len(factory.pool), factory.pool.reused
        )

    def _families(
        self, connections: int, tunnels: int, pooled: int, reused: int
    ) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "aproxy_client_connections",
            "Open client connections, idle keep-alive connections included.",
            value=connections,
        )
        yield GaugeMetricFamily(
            "aproxy_tunnels", "Open tunnels (CONNECT and Upgrade).", value=tunnels
        )
        yield GaugeMetricFamily(
            "aproxy_upstream_pool_connections",
            "Idle upstream connections kept for reuse.",
            value=pooled,
        )
        yield CounterMetricFamily(
            "aproxy_upstream_reused",
            "Requests sent on a reused idle upstream connection.",
            value=reused,
        )
        router = self._factory.runtime.dialer.router
        if router.pools:
            up = GaugeMetricFamily(
                "aproxy_parent_up",
                "Whether each member of a parent pool is up (1) or skipped after failing (0).",
                labels=["parent"],
            )
            now = self._factory.clock.seconds()
            for pool in router.pools:
                for member in pool.members:
                    if member.parent is not None:
                        up.add_metric([member.name], 1.0 if member.up(now) else 0.0)
            yield up
        cache = self._factory.cache
        if cache is None:
            return
        figures = cache.figures()
        size = GaugeMetricFamily(
            "aproxy_cache_bytes",
            "Body bytes stored, by tier (the disk tier is shared by all workers).",
            labels=["tier"],
        )
        objects = GaugeMetricFamily(
            "aproxy_cache_objects", "Objects stored, by tier.", labels=["tier"]
        )
        for tier in ("memory", "disk"):
            size.add_metric([tier], figures[f"{tier}_bytes"])
            objects.add_metric([tier], figures[f"{tier}_objects"])
        yield size
        yield objects
        yield CounterMetricFamily(
            "aproxy_cache_evictions",
            "Objects evicted to stay within the cache's sizes (by this process).",
            value=figures["evictions"],
        )
        yield CounterMetricFamily(
            "aproxy_cache_collapsed",
            "Requests that followed another request's fetch of the same URL.",
            value=cache.collapsed,
        )
        yield CounterMetricFamily(
            "aproxy_cache_saved_bytes",
            "Body bytes answered from the cache instead of fetched.",
            value=cache.saved,
        )


class Metrics:
    """
    Collects aproxy's Prometheus metrics from a factory (an Exchange observer + gauges).

    Register it with C{factory.observers.append(metrics)}; it also keeps the history
    the C{/status} page draws.

    @ivar registry: The registry holding aproxy's metrics (never the global one).
    @ivar history: The last 15 minutes of traffic, for the status page.
    """

    def __init__(
        self,
        factory: ProxyFactory,
        clock: IReactorTime,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param factory: The proxy whose connections and pool are reported.
        @param clock: The clock that places records and samples in the history.
        @param registry: Where to register the metrics (a new registry by default).
        """
        self._factory = factory
        self._clock = clock
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.history = History(clock.seconds())
        self._requests = Counter(
            "aproxy_requests_total",
            "Finished requests and tunnels, by method and status class (0xx: no response).",
            ["method", "status_class"],
            registry=registry,
        )
        self._bytes = Counter(
            "aproxy_bytes_total",
            "Bytes written to clients and to origins, heads included.",
            ["direction"],
            registry=registry,
        )
        self._to_client = self._bytes.labels(direction="to_client")
        self._to_origin = self._bytes.labels(direction="to_origin")
        self._errors = Counter(
            "aproxy_errors_total",
            "Finished requests and tunnels with an error, by RFC 9209 Proxy-Status type.",
            ["error"],
            registry=registry,
        )
        self._cache = Counter(
            "aproxy_cache_requests_total",
            "Requests the cache saw, by Squid result code (TCP_HIT, TCP_MISS, ...).",
            ["result"],
            registry=registry,
        )
        self._parent = Counter(
            "aproxy_parent_requests_total",
            "Requests and tunnels through each parent proxy, by result (ok, or the error).",
            ["parent", "result"],
            registry=registry,
        )
        self._duration = Histogram(
            "aproxy_request_duration_seconds",
            "Seconds from a complete request head to the end of the exchange.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self._connect = Histogram(
            "aproxy_upstream_connect_seconds",
            "Seconds taken to connect to an origin.",
            buckets=_CONNECT_BUCKETS,
            registry=registry,
        )
        registry.register(_FactoryCollector(factory))

    def __call__(self, record: Exchange) -> None:
        """Count a finished exchange (the L{ExchangeObserver} interface)."""
        method = record.method if record.method in _METHODS else "other"
        self._requests.labels(method=method, status_class=f"{record.status // 100}xx").inc()
        self._to_client.inc(record.bytes_to_client)
        self._to_origin.inc(record.bytes_to_origin)
        if record.error is not None:
            self._errors.labels(error=record.error).inc()
        if record.cache is not None:
            self._cache.labels(result=record.cache).inc()
        if record.upstream != "direct":
            result = "ok" if record.error is None else record.error
            self._parent.labels(parent=record.upstream, result=result).inc()
        self._duration.observe(max(record.duration, 0.0))
        now = self._clock.seconds()
        self.history.record(now, record)
        self.sample(now)

    def observe_connect(self, seconds: float) -> None:
        """Record how long a connection to an origin took to establish."""
        self._connect.observe(max(seconds, 0.0))

    def sample(self, now: float) -> tuple[int, int]:
        """Sample the client connections and tunnels into the history; return them."""
        factory = self._factory
        connections, tunnels = len(factory.connections), _tunnels(factory)
        self.history.sample(now, connections, tunnels)
        return connections, tunnels

    def render(self) -> bytes:
        """
        The metrics in the Prometheus text exposition format (version 0.0.4).

        Rendering also samples the connection gauges into the history.
        """
        self.sample(self._clock.seconds())
        return generate_latest(self.registry)

    def render_status(self) -> bytes:
        """The C{/status} HTML page (see L{aproxy.observe.status.render_status})."""
        from aproxy.version import VERSION

        factory = self._factory
        now = self._clock.seconds()
        connections, tunnels = self.sample(now)
        return render_status(
            self.history,
            now,
            connections,
            tunnels,
            len(factory.pool),
            factory.pool.reused,
            factory.config,
            VERSION,
            pools=factory.runtime.dialer.router.pools,
        )


class _Pages(Resource):
    """
    The whole site as one leaf: each page answers GET (and HEAD), anything else is
    404, and other methods get 405. A page whose body comes later (a L{Deferred}) is
    written when it arrives; if it fails, the answer is 503.
    """

    def __init__(self, pages: dict[bytes, tuple[bytes, Page]]) -> None:
        super().__init__()
        self.isLeaf = True
        self._pages = pages

    def render(self, request: Request) -> object:
        """
        Answer with the current document, never cached.

        @return: The body, or C{NOT_DONE_YET} for a body that comes later or an error
            page (written by Twisted's template machinery).
        """
        page = self._pages.get(b"/".join(request.postpath)) if request.postpath else None
        if page is None:
            return _error(request, 404, "No Such Resource", "No such page.")
        if request.method not in _ALLOWED:
            request.setHeader(b"allow", b", ".join(_ALLOWED))
            return _error(request, 405, "Method Not Allowed", "Only GET and HEAD.")
        content_type, body = page
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # Nothing on these pages is meant to run or load: forbid it all, so even a
        # mistake in escaping can't execute anything (inline styles are used).
        request.setHeader(
            b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"
        )
        result = body()
        if isinstance(result, bytes):
            request.setHeader(b"content-type", content_type)
            return result
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def write(data: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
            request.finish()

        def fail(failure: Failure) -> None:
            log.failure("rendering {path}", failure, path=request.path)
            if not gone:
                _error(request, 503, "Service Unavailable", "No figures available now.")

        result.addCallbacks(write, fail)
        return NOT_DONE_YET


def _error(request: Request, code: int, brief: str, detail: str) -> object:
    """Render an escaped error page from L{twisted.web.pages} with status C{code}."""
    return pages.errorPage(code, brief, detail).render(request)


class _QuietSite(Site):
    """A L{Site} that writes no access log: a scrape every few seconds is not news."""

    noisy = False

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """
        What the start-up log calls this listener ("metrics and status starting on
        9108"), rather than this class's name, which means nothing to a user.
        """
        return "metrics and status"

    def log(self, request: http.Request) -> None:
        """Log nothing."""


def metrics_site(metrics: Metrics, factory: ProxyFactory) -> Site:
    """
    The HTTP site for C{--metrics}: C{GET /metrics} (Prometheus text format) and
    C{GET /status} (HTML); every other path is 404 and methods other than GET and
    HEAD get 405.

    @param metrics: The metrics to serve.
    @param factory: The proxy; its clock drives the site's timeouts.
    """
    interceptor = factory.runtime.interceptor
    ca_pem = interceptor.leaves.ca.pem if interceptor is not None else None

    def pac() -> bytes:
        runtime = factory.runtime
        return pac_body(runtime.config, runtime.pac_file, None)

    return pages_site(metrics.render, metrics.render_status, factory.clock, ca_pem, pac)


def pages_site(
    render_metrics: Page,
    render_status: Page,
    clock: IReactorTime,
    ca_pem: bytes | None = None,
    pac: Page | None = None,
) -> Site:
    """
    The C{--metrics} site (see L{metrics_site}) for any source of the two pages; with
    C{--workers} the parent serves the workers' totals with it.

    @param render_metrics: Renders C{/metrics} (Prometheus text format).
    @param render_status: Renders C{/status} (HTML).
    @param clock: Drives the site's timeouts.
    @param ca_pem: With C{--intercept}, the interception CA's certificate (never its
        key), served at C{/ca.pem} for clients to install.
    @param pac: Renders the proxy auto-configuration file, served at C{/proxy.pac} and
        C{/wpad.dat} (see L{aproxy.access.pac}).
    """
    pages = {
        b"metrics": (METRICS_CONTENT_TYPE, render_metrics),
        b"status": (b"text/html; charset=utf-8", render_status),
    }
    if ca_pem is not None:
        pages[b"ca.pem"] = (b"application/x-pem-file", lambda: ca_pem)
    if pac is not None:
        pages[b"proxy.pac"] = pages[b"wpad.dat"] = (PAC_CONTENT_TYPE, pac)
    return _QuietSite(_Pages(pages), reactor=clock)
