"""
The C{/status} page: what the proxy is doing now and over the last 15 minutes, for a
person to read at a glance.

L{History} keeps a ring of 10-second buckets fed from L{Exchange} records and sampled
gauges; bucket positions come from the clock reading passed in, so no timer runs.
L{render_status} turns a L{History} and the current gauges into one self-contained HTML
page (inline CSS and SVG charts; no scripts, no external assets). Everything that comes
from requests is HTML-escaped.
"""

from __future__ import annotations

import dataclasses
import html
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aproxy.config import ProxyConfig
from aproxy.observe.records import Exchange
from aproxy.upstream.routes import without_credentials

__all__ = [
    "BUCKETS",
    "BUCKET_SECONDS",
    "CACHE_HITS",
    "Bucket",
    "History",
    "destination_host",
    "render_status",
]

BUCKET_SECONDS = 10
"""The width of one L{History} bucket, in seconds."""

BUCKETS = 90
"""How many buckets a L{History} keeps: 15 minutes of 10-second buckets."""

CACHE_HITS = frozenset(
    {"TCP_HIT", "TCP_MEM_HIT", "TCP_INM_HIT", "TCP_CF_HIT", "TCP_REFRESH_UNMODIFIED"}
    | {"TCP_REFRESH_FAIL_OLD"}
)
"""The cache results (Squid's codes) that count as hits: answered from what the cache
holds (a revalidated object included), or from a fetch another request made."""

# Distinct destinations (and error types) counted per bucket; beyond this a client
# asking for ever new host names is counted under one "(other)" entry, so memory stays
# bounded whatever the traffic.
_MAX_KEYS = 500
_OTHER = "(other)"
# The index of a slot never used: no clock reading maps to it.
_NEVER = -(1 << 62)
_MAX_HOST = 255
# Field names that would hold a secret if the configuration ever grew one; their values
# are never shown (today there are none: auth is a path, shown as such).
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "token", "credentials"})


def destination_host(method: str, target: str) -> str | None:
    """
    The destination host named by a request target, lower-cased and without port.

    @param method: The request method; a C{CONNECT} target is an authority.
    @param target: The request target as received.
    @return: The host (IPv6 literals without brackets), or L{None} for a target that
        names no host (origin form, C{*}, or unparseable).
    """
    if method == "CONNECT":
        host, sep, _ = target.rpartition(":")
        if not sep:
            host = target
        host = host.removeprefix("[").removesuffix("]")
    elif target.startswith(("/", "*")):
        return None
    else:
        try:
            host = urlsplit(target).hostname or ""
        except ValueError:
            return None
    host = host.lower()[:_MAX_HOST]
    return host or None


class Bucket:
    """
    What happened during one L{BUCKET_SECONDS}-long interval.

    @ivar index: The interval's number: its start time divided by L{BUCKET_SECONDS}.
    @ivar requests: Exchanges (requests and tunnels) that finished in it.
    @ivar to_client: Bytes written to clients in it (an exchange's bytes are spread
        evenly over its duration, so a long tunnel does not show as one spike).
    @ivar to_origin: Bytes written to origins in it, spread the same way.
    @ivar errors: Finished exchanges per error type.
    @ivar hosts: Finished exchanges per destination host.
    @ivar connections: The most client connections sampled in it, or L{None}.
    @ivar tunnels: The most open tunnels sampled in it, or L{None}.
    @ivar cache_requests: Finished exchanges the cache saw.
    @ivar cache_hits: Those it answered from what it holds (L{CACHE_HITS}).
    @ivar saved: Bytes sent to clients from the cache instead of fetched.
    """

    __slots__ = (
        "cache_hits",
        "cache_requests",
        "connections",
        "errors",
        "hosts",
        "index",
        "requests",
        "saved",
        "to_client",
        "to_origin",
        "tunnels",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.requests = 0
        self.to_client = 0.0
        self.to_origin = 0.0
        self.errors: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()
        self.connections: int | None = None
        self.tunnels: int | None = None
        self.cache_requests = 0
        self.cache_hits = 0
        self.saved = 0.0

    def add(self, other: Bucket) -> None:
        """
        Add another process's figures for the same interval (C{--workers}): counts and
        bytes are summed, and so are the sampled gauges (each process keeps its own
        peak, so the sum is at least the peak of the total).
        """
        self.requests += other.requests
        self.to_client += other.to_client
        self.to_origin += other.to_origin
        for key, amount in other.errors.items():
            _count(self.errors, key, amount)
        for key, amount in other.hosts.items():
            _count(self.hosts, key, amount)
        self.connections = _add_samples(self.connections, other.connections)
        self.tunnels = _add_samples(self.tunnels, other.tunnels)
        self.cache_requests += other.cache_requests
        self.cache_hits += other.cache_hits
        self.saved += other.saved


def _add_samples(a: int | None, b: int | None) -> int | None:
    """The sum of two sampled gauges, either of which may not have been sampled."""
    if a is None:
        return b
    return a if b is None else a + b


def _count(counter: Counter[str], key: str, amount: int = 1) -> None:
    """Count C{key}, or L{_OTHER} once C{counter} holds L{_MAX_KEYS} distinct keys."""
    if key not in counter and len(counter) >= _MAX_KEYS:
        key = _OTHER
    counter[key] += amount


class History:
    """
    A ring of L{BUCKETS} buckets of L{BUCKET_SECONDS} seconds each, driven by the clock
    readings passed in (no timers): stale buckets are reset as time reaches them again.

    @param start: When collection started (clock seconds); earlier buckets have no data.
    """

    def __init__(self, start: float) -> None:
        self.start = start
        self._ring = [Bucket(_NEVER) for _ in range(BUCKETS)]

    def _bucket(self, index: int) -> Bucket:
        slot = self._ring[index % BUCKETS]
        if slot.index != index:
            slot = self._ring[index % BUCKETS] = Bucket(index)
        return slot

    def _get(self, index: int) -> Bucket | None:
        slot = self._ring[index % BUCKETS]
        return slot if slot.index == index else None

    def record(self, now: float, exchange: Exchange) -> None:
        """
        Count an exchange that finished at C{now}: its request, error and destination
        in the current bucket, its bytes spread over the buckets its duration covers.
        """
        last = int(now // BUCKET_SECONDS)
        bucket = self._bucket(last)
        bucket.requests += 1
        if exchange.error is not None:
            _count(bucket.errors, exchange.error)
        host = destination_host(exchange.method, exchange.target)
        if host is not None:
            _count(bucket.hosts, host)
        if exchange.cache is not None:
            bucket.cache_requests += 1
            if exchange.cache in CACHE_HITS:
                bucket.cache_hits += 1
                bucket.saved += exchange.bytes_to_client
        duration = exchange.duration
        begin = now - duration
        first = max(int(begin // BUCKET_SECONDS), last - BUCKETS + 1)
        if duration <= 0 or first >= last:
            bucket.to_client += exchange.bytes_to_client
            bucket.to_origin += exchange.bytes_to_origin
            return
        # Bytes sent before the window are dropped with it: no bucket shows them.
        for index in range(first, last + 1):
            low = max(begin, index * BUCKET_SECONDS)
            high = min(now, (index + 1) * BUCKET_SECONDS)
            share = (high - low) / duration
            if share > 0:
                spread = self._bucket(index)
                spread.to_client += exchange.bytes_to_client * share
                spread.to_origin += exchange.bytes_to_origin * share

    def sample(self, now: float, connections: int, tunnels: int) -> None:
        """Note the current client connections and tunnels (the bucket keeps the most)."""
        bucket = self._bucket(int(now // BUCKET_SECONDS))
        bucket.connections = max(connections, bucket.connections or 0)
        bucket.tunnels = max(tunnels, bucket.tunnels or 0)

    def window(self, now: float) -> list[tuple[float, Bucket | None]]:
        """
        The last L{BUCKETS} buckets up to C{now}, oldest first, each with the seconds of
        it that have been observed (0 before L{start}, partial for the current one), and
        L{None} for a bucket nothing was recorded in.
        """
        last = int(now // BUCKET_SECONDS)
        result = []
        for index in range(last - BUCKETS + 1, last + 1):
            low = max(index * BUCKET_SECONDS, self.start)
            high = min((index + 1) * BUCKET_SECONDS, now)
            result.append((max(high - low, 0.0), self._get(index)))
        return result

    def buckets(self) -> list[Bucket]:
        """Every bucket that holds data, oldest first."""
        return sorted((b for b in self._ring if b.index != _NEVER), key=lambda b: b.index)

    def merge(self, buckets: Iterable[Bucket]) -> None:
        """
        Add another process's buckets (C{--workers}) into this history: a bucket for an
        interval this history also has is summed with it (L{Bucket.add}); a bucket older
        than the one in its slot of the ring is outside the window and ignored.
        """
        for other in buckets:
            slot = self._ring[other.index % BUCKETS]
            if other.index < slot.index:
                continue
            self._bucket(other.index).add(other)

    def totals(self, now: float, key: str) -> Counter[str]:
        """Sum the per-bucket counters named C{key} (C{"hosts"} or C{"errors"}) over the window."""
        total: Counter[str] = Counter()
        for _, bucket in self.window(now):
            if bucket is not None:
                total.update(getattr(bucket, key))
        return total


def _rates(window: Sequence[tuple[float, Bucket | None]], attr: str) -> list[float | None]:
    """Per-second rates of a bucket attribute; L{None} where nothing was observed."""
    values: list[float | None] = []
    for seconds, bucket in window:
        if seconds <= 0:
            values.append(None)
        else:
            amount = getattr(bucket, attr) if bucket is not None else 0
            values.append(amount / max(seconds, 1.0))
    return values


def _hit_ratio(window: Sequence[tuple[float, Bucket | None]]) -> list[float | None]:
    """Per bucket, the share of the cache's requests it answered, in percent."""
    return [
        100.0 * b.cache_hits / b.cache_requests if b is not None and b.cache_requests else None
        for _, b in window
    ]


def _samples(window: Sequence[tuple[float, Bucket | None]], attr: str) -> list[float | None]:
    """The sampled gauge C{attr} per bucket; L{None} where it was not sampled."""
    values: list[float | None] = []
    for _, bucket in window:
        value = getattr(bucket, attr) if bucket is not None else None
        values.append(None if value is None else float(value))
    return values


def _si(value: float, unit: str) -> str:
    """Format C{value} with an SI prefix: C{1234.0, "B/s"} gives C{"1.23 kB/s"}."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            break
        value /= 1000
    if value == int(value) and not prefix:
        return f"{int(value)} {unit}".strip()
    return f"{value:.3g} {prefix}{unit}".strip()


_WIDTH, _HEIGHT = 360, 80
_COLOURS = ("#2b6cb0", "#c05621")


def _chart(title: str, unit: str, series: Sequence[tuple[str, list[float | None]]]) -> str:
    """
    An inline SVG line chart of one or two series over the window; gaps (L{None})
    break the line, a lone point is drawn as a dot.
    """
    count = max(len(values) for _, values in series)
    peak = max((v for _, values in series for v in values if v is not None), default=0.0)
    scale = peak if peak > 0 else 1.0
    step = _WIDTH / max(count - 1, 1)
    shapes = []
    for (_, values), colour in zip(series, _COLOURS, strict=False):
        runs: list[list[tuple[float, float]]] = [[]]
        for i, value in enumerate(values):
            if value is None:
                runs.append([])
                continue
            runs[-1].append((i * step, _HEIGHT - value / scale * (_HEIGHT - 4) - 2))
        for run in runs:
            if len(run) == 1:
                x, y = run[0]
                shapes.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{colour}"/>')
            elif run:
                points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                shapes.append(
                    f'<polyline points="{points}" fill="none" stroke="{colour}"'
                    ' stroke-width="1.5" stroke-linejoin="round"/>'
                )
    legend = " ".join(
        f'<span style="color:{colour}">&#9632; {html.escape(name)}</span>'
        for (name, _), colour in zip(series, _COLOURS, strict=False)
    )
    return (
        f"<figure><figcaption><b>{html.escape(title)}</b> {legend}"
        f' <span class="muted">peak {html.escape(_si(peak, unit))}</span></figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}"'
        f' viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img"'
        f' aria-label="{html.escape(title)}, last 15 minutes">'
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="#f7f7f7"/>'
        f'<line x1="0" y1="{_HEIGHT - 1}" x2="{_WIDTH}" y2="{_HEIGHT - 1}" stroke="#ccc"/>'
        + "".join(shapes)
        + '</svg><div class="axis"><span>&minus;15 min</span><span>now</span></div></figure>'
    )


def _config_value(name: str, value: object) -> str:
    """One configuration value as plain text (escaped by the caller)."""
    if set(name.split("_")) & _SECRET_WORDS:
        return "(hidden)"
    if name in ("upstream", "route"):
        # Parent URLs may carry the parent's user name and password.
        items = value if isinstance(value, tuple) else (value,) if value else ()
        return ", ".join(without_credentials(str(item)) for item in items) or "(none)"
    if value is None:
        return "any" if name in ("connect_ports", "http_ports") else "(none)"
    if name in ("connect_ports", "http_ports") and isinstance(value, tuple):
        return ", ".join(f"{low}" if low == high else f"{low}-{high}" for low, high in value)
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value) or "(none)"
    return str(value)


def _rows(rows: Iterable[Sequence[str]], numeric: bool = True) -> str:
    """Table rows from already-formatted cells (escaped here); later cells align right."""
    out = []
    for row in rows:
        cells = [f"<td>{html.escape(row[0])}</td>"]
        cls = ' class="num"' if numeric else ""
        cells += [f"<td{cls}>{html.escape(cell)}</td>" for cell in row[1:]]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1180px}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.muted{color:#777;font-weight:normal}
.tiles{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:8.5em}
.tile b{display:block;font-size:1.6em}
.charts{display:flex;flex-wrap:wrap;gap:1.2em}
figure{margin:0}figcaption{margin-bottom:.2em}
.axis{display:flex;justify-content:space-between;width:360px;color:#777;font-size:.8em}
table{border-collapse:collapse}td,th{padding:.15em .8em .15em 0;text-align:left}
tr+tr td{border-top:1px solid #eee}.num{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:flex;flex-wrap:wrap;gap:3em}
"""


def render_status(
    history: History,
    now: float,
    connections: int,
    tunnels: int,
    pooled: int,
    reused: int,
    config: ProxyConfig,
    version: str,
    top: int = 10,
    workers: int | None = None,
    pools: Sequence[Any] = (),
) -> bytes:
    """
    Render the status page.

    @param history: The traffic of the last 15 minutes.
    @param now: The current clock reading, in seconds since the epoch.
    @param connections: Open client connections (idle keep-alive ones included).
    @param tunnels: Open tunnels (CONNECT and Upgrade).
    @param pooled: Idle upstream connections kept for reuse.
    @param reused: Requests that reused an idle upstream connection so far.
    @param config: The running configuration, shown as a table.
    @param version: The aproxy version shown in the title.
    @param top: How many destinations to list.
    @param workers: With C{--workers}, how many worker processes the figures (totals
        over all of them) come from; shown as a tile.
    @param pools: The parent pools of the routes (L{aproxy.upstream.routes.Pool}): their
        members are listed with their state and last error.
    @return: A UTF-8 HTML document.
    """
    window = history.window(now)
    seconds = sum(s for s, _ in window)
    present = [b for _, b in window if b is not None]
    requests = sum(b.requests for b in present)
    to_client = sum(b.to_client for b in present)
    to_origin = sum(b.to_origin for b in present)
    per = max(seconds, 1.0)
    hosts = history.totals(now, "hosts")
    errors = history.totals(now, "errors")
    span = "15 min" if seconds >= BUCKETS * BUCKET_SECONDS - BUCKET_SECONDS else f"{seconds:.0f} s"

    tiles = [
        ("client connections", str(connections)),
        ("tunnels", str(tunnels)),
        ("requests/s", f"{requests / per:.3g}"),
        ("to clients", _si(to_client / per, "B/s")),
        ("to origins", _si(to_origin / per, "B/s")),
        ("requests", str(requests)),
        ("errors", str(sum(errors.values()))),
        ("idle upstream", str(pooled)),
        ("upstream reused", str(reused)),
    ]
    cache_requests = sum(b.cache_requests for b in present)
    if cache_requests:
        hits = sum(b.cache_hits for b in present)
        tiles.append(("cache hits", f"{100 * hits / cache_requests:.0f}%"))
        tiles.append(("saved by cache", _si(sum(b.saved for b in present), "B")))
    if workers is not None:
        tiles.append(("workers", str(workers)))
    tile_html = "".join(
        f'<div class="tile">{html.escape(label)}<b>{html.escape(value)}</b></div>'
        for label, value in tiles
    )
    charts = "".join(
        [
            _chart("requests/s", "/s", [("requests", _rates(window, "requests"))]),
            _chart(
                "throughput",
                "B/s",
                [
                    ("to clients", _rates(window, "to_client")),
                    ("to origins", _rates(window, "to_origin")),
                ],
            ),
            *(
                [
                    _chart("cache hit ratio", "%", [("hits", _hit_ratio(window))]),
                    _chart("saved by cache", "B/s", [("saved", _rates(window, "saved"))]),
                ]
                if cache_requests
                else []
            ),
            _chart(
                "open (sampled)",
                "",
                [
                    ("connections", _samples(window, "connections")),
                    ("tunnels", _samples(window, "tunnels")),
                ],
            ),
        ]
    )
    destinations = (
        "<table><tr><th>host</th><th class=num>requests</th><th class=num>share</th></tr>"
        + _rows(
            (host, str(count), f"{100 * count / max(requests, 1):.0f}%")
            for host, count in hosts.most_common(top)
        )
        + "</table>"
        if hosts
        else '<p class="muted">no requests in this period</p>'
    )
    error_table = (
        "<table>" + _rows((name, str(count)) for name, count in errors.most_common()) + "</table>"
        if errors
        else '<p class="muted">none</p>'
    )
    config_table = (
        "<table>"
        + _rows(
            (
                (field.name, _config_value(field.name, getattr(config, field.name)))
                for field in dataclasses.fields(config)
            ),
            numeric=False,
        )
        + "</table>"
    )
    members = [
        (
            pool.strategy,
            member.name,
            "up" if member.up(now) else f"down, retried in {member.down_until - now:.0f} s",
            member.last_error or "-",
        )
        for pool in pools
        for member in pool.members
    ]
    pool_table = (
        "<h2>Parent pools</h2><table><tr><th>strategy</th><th>member</th><th>state</th>"
        "<th>last error</th></tr>" + _rows(members, numeric=False) + "</table>\n"
        if members
        else ""
    )
    ca_link = (
        "<p>HTTPS is intercepted for some hosts: clients must trust "
        '<a href="ca.pem">the interception CA certificate</a>.</p>\n'
        if config.intercept
        else ""
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    up = _duration(now - history.start)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="10">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aproxy status</title><style>{_STYLE}</style></head>
<body>
<h1>aproxy {html.escape(version)} <span class="muted">status</span></h1>
<div class="muted">{html.escape(stamp)} &middot; collecting for {html.escape(up)}
&middot; rates are averages over the last {html.escape(span)}</div>
<div class="tiles">{tile_html}</div>
<div class="charts">{charts}</div>
<div class="cols">
<section><h2>Top destinations <span class="muted">last {html.escape(span)}</span></h2>
{destinations}</section>
<section><h2>Errors <span class="muted">last {html.escape(span)}</span></h2>
{error_table}</section>
</div>
{pool_table}{ca_link}<h2>Configuration</h2>
{config_table}
</body></html>
"""
    return page.encode("utf-8")


def _duration(seconds: float) -> str:
    """A short human duration: C{"3 d 4 h"}, C{"2 h 5 min"}, C{"40 s"}."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
