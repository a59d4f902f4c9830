#!/usr/bin/env python3
"""
aproxy's cache (issue #14) measured: what a hit costs and what the cache holds in memory.

Starts an origin on 127.0.0.1 (nginx with C{expires 1h} from bench/templates/nginx.conf
when installed, else bench/programs/origin.py with C{max-age=3600}: every answer is
cacheable) and, on free loopback ports, the proxies below; then prints one Markdown table:

  a. 100-byte keep-alive GETs (wrk, 1 thread, 50 connections; the Python load client when
     wrk is missing): requests/s and p50/p99 latency direct to the origin, through aproxy
     without a cache, through aproxy with C{--cache-memory 256MiB} (every request a hit
     after a warm-up) and through squid with a 256 MB memory cache (when installed), in
     alternating rounds (medians), since a shared machine's speed drifts. Ratios: cached
     aproxy / uncached aproxy and cached aproxy / squid's cache;
  b. a 100 MiB object hit from aproxy's disk tier (C{--cache-dir}; curl -o /dev/null, or a
     Python client without curl), MB/s median of 3, next to the same download direct;
  c. a 1 GiB disk hit read by a slow client (64 KiB reads 0.05 s apart for ~10 s, then it
     closes): aproxy's RSS sampled meanwhile, start and max (flat means the file is
     streamed at the client's pace, not read ahead);
  d. a 64 MiB memory tier filled with 1,500 distinct 100 KiB objects: aproxy's RSS growth
     from after start-up to after the fill (the goal: within the tier's size + 10%).

C{--quick} shortens every part (under a minute); C{--smoke} uses tiny sizes and no squid
(~10 s, for the test suite). Only the Python standard library is used, plus the
helpers in bench/aproxybench (child processes, RSS, the load and download clients). aproxy
runs as C{sys.executable -m twisted aproxy} with C{PYTHONPATH} set to C{--checkout} (this
checkout by default). Everything listens on 127.0.0.1; each child runs in its own process
group and is killed at the end (also on errors, Ctrl-C and the time budget), and the temp
dir is removed.

Usage: python bench/cache_bench.py [--quick | --smoke] [--checkout DIR] [--no-wrk]
       [--no-curl] [--no-nginx] [--no-squid] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aproxybench.httpio import Target
from aproxybench.loads import download, load
from aproxybench.procs import (
    Child,
    RssSampler,
    abort_on_signals,
    free_port,
    log,
    rss_kib,
    run_bench,
    sbin,
    settle,
    tool_output,
)
from aproxybench.report import machine_line, notes_lines
from aproxybench.settings import CHECKOUT, DISTURBED_SHARE, LOOPBACK, MIB, PROGRAMS, SMOKE
from aproxybench.targets import render

KIB = 1024
MAX_AGE = 3600  # what the origin says every answer may be cached for
IO_TIMEOUT = 10.0
SMALL_BODY = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes
# The growth allowed over the memory tier's size when it is full (goal d).
TIER_SLACK = 0.10
# RSS growth while the slow client reads that still counts as flat (goal c): run.py's
# slow-reader target.
FLAT_MIB = 2.0


@dataclass(frozen=True)
class Mode:
    """How long and how big each part is (full run, --quick or --smoke)."""

    name: str
    wrk_seconds: float
    connections: int
    rounds: int
    big_bytes: int  # b: the disk hit
    downloads: int  # b: downloads per target (median)
    huge_bytes: int  # c: the slow reader's object
    slow_seconds: float
    tier_bytes: int  # d: the memory tier filled
    fill_objects: int
    fill_object_bytes: int
    max_seconds: int  # time budget of the whole run
    squid: bool


FULL = Mode("full", 5, 50, 3, 100 * MIB, 3, 1024 * MIB, 10, 64 * MIB, 1500, 100 * KIB, 300, True)
QUICK = Mode("quick", 2, 50, 3, 100 * MIB, 1, 1024 * MIB, 4, 64 * MIB, 1500, 100 * KIB, 120, True)
SMOKE_MODE = Mode("smoke", 1, 10, 1, 4 * MIB, 1, 16 * MIB, 1, 8 * MIB, 150, 100 * KIB, 90, False)


def size_name(n: int) -> str:
    """A size as a short label: 100 B, 100 KiB, 100 MiB, 1 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def size_option(n: int) -> str:
    """A size as aproxy's options spell it: 256MiB, 2GiB."""
    return size_name(n).replace(" ", "")


def median(values: list[float]) -> float:
    """The median (a one-element list is its element)."""
    return float(statistics.median(values))


# --------------------------------------------------------------------------------------------
# a small HTTP client that shows response headers (the cache says hit or miss in them)


def fetch(port: int, target: str, host: str, method: str = "GET") -> tuple[int, dict[str, str]]:
    """
    One request on a new connection, the whole body read: the status and the headers
    (names lower-cased). Raises OSError or http.client.HTTPException.
    """
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, target, headers={"Host": host, "User-Agent": "aproxy-cache-bench"})
        response = conn.getresponse()
        while response.read(1 << 20):
            pass
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def hit_said(headers: dict[str, str]) -> bool:
    """Whether a response says it came from a cache: aproxy's Cache-Status, squid's X-Cache."""
    status = headers.get("cache-status", "").lower()
    return "; hit" in status or headers.get("x-cache", "").upper().startswith("HIT")


def wait_hit(port: int, target: str, host: str, seconds: float = 10.0) -> dict[str, str]:
    """
    GET C{target} until the answer is a cache hit (a store may be committed just after the
    body was sent); the hit's headers. Raises RuntimeError after C{seconds}.
    """
    deadline = time.monotonic() + seconds
    headers: dict[str, str] = {}
    while time.monotonic() < deadline:
        status, headers = fetch(port, target, host)
        if status == 200 and hit_said(headers):
            return headers
        time.sleep(0.1)
    said = headers.get("cache-status") or headers.get("x-cache") or "no cache header"
    raise RuntimeError(f"GET {target} is not a cache hit after {seconds:.0f} s ({said})")


# --------------------------------------------------------------------------------------------
# the run


class CacheBench:
    """One run: the temp dir, the origin, the proxies started, the results and problems."""

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        self.args = args
        self.mode = mode
        self.tmp = Path(tempfile.mkdtemp(prefix="aproxy-cache-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers and squid run as other users
        self.data = self.tmp / "data"
        self.origin: Child | None = None
        self.origin_port = 0
        self.origin_kind = ""
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.problems: list[str] = []
        self.failures: list[str] = []
        self.commands: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        # The load runs go through aproxybench.loads, which reads these from its settings.
        self.settings = replace(SMOKE, wrk_seconds=mode.wrk_seconds)
        self.big = f"/{size_option(mode.big_bytes).lower()}"
        self.huge = f"/{size_option(mode.huge_bytes).lower()}"
        self.piece = f"/{size_option(mode.fill_object_bytes).lower()}"

    # ---- processes

    def write_files(self) -> None:
        """The origin's files: 100 B, the disk hit's object, the slow read's, a fill piece."""
        self.data.mkdir()
        os.chmod(self.data, 0o755)
        (self.data / "100b").write_bytes(SMALL_BODY)
        block = bytes(range(256)) * 4096  # 1 MiB
        with open(self.data / self.big.lstrip("/"), "wb") as f:
            for _ in range(self.mode.big_bytes // len(block)):
                f.write(block)
            f.write(block[: self.mode.big_bytes % len(block)])
        (self.data / self.piece.lstrip("/")).write_bytes((block * 2)[: self.mode.fill_object_bytes])
        # The slow read's object: sparse (no 1 GiB written here; the origin reads zeros).
        # aproxy writes it to its disk tier in full when it fills the cache.
        with open(self.data / self.huge.lstrip("/"), "wb") as f:
            f.truncate(self.mode.huge_bytes)
        for p in self.data.iterdir():
            os.chmod(p, 0o644)

    def start_origin(self) -> None:
        """nginx (C{expires 1h}) when installed, else the Python origin with max-age."""
        self.write_files()
        self.origin_port = free_port()
        nginx = None if self.args.no_nginx else shutil.which("nginx") or sbin("nginx")
        if nginx:
            work = self.tmp / "nginx"
            work.mkdir()
            conf = work / "nginx.conf"
            text = render(
                "nginx.conf",
                work=work,
                port=self.origin_port,
                data=self.data,
                location=f"expires {MAX_AGE}s;",
            )
            conf.write_text(text)
            argv = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
            self.origin_kind = "nginx (1 worker, expires 3600s)"
            self.versions["nginx"] = tool_output([nginx, "-v"])
        else:
            script = PROGRAMS / "origin.py"
            argv = [sys.executable, str(script), str(self.origin_port), str(self.data)]
            argv.append(str(MAX_AGE))
            self.origin_kind = "Python asyncio origin (bench/programs/origin.py, max-age=3600)"
        self.commands["origin"] = shlex.join(argv)
        self.origin = Child("origin", argv, logfile=self.tmp / "origin.log", cwd=self.tmp)
        self.wait_ready(self.origin, self.direct())
        _, headers = fetch(self.origin_port, "/100b", self.host)
        if "max-age" not in headers.get("cache-control", ""):
            raise RuntimeError(f"the origin's answer is not cacheable: {headers}")
        log(f"origin: {self.origin_kind}, pid {self.origin.pid}, {LOOPBACK}:{self.origin_port}")

    @property
    def host(self) -> str:
        """The origin's authority (the Host header and the absolute-form target's)."""
        return f"{LOOPBACK}:{self.origin_port}"

    def direct(self) -> Target:
        """The origin itself as a target."""
        return Target("direct", self.origin_port, self.origin_port, False)

    def wait_ready(self, child: Child, t: Target, timeout: float = 30.0) -> None:
        """Poll a GET of /100b until it answers 200; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                status, _ = fetch(t.port, t.target("/100b"), t.host)
                if status == 200:
                    return
                last = f"status {status}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s ({last})")

    def start_aproxy(self, name: str, options: list[str]) -> tuple[Child, Target]:
        """aproxy with C{options} on a free port, in its own work dir; ready and settled."""
        port = free_port()
        work = self.tmp / name
        work.mkdir()
        argv = [sys.executable, "-m", "twisted", "aproxy"]
        argv += ["--port", f"tcp:{port}:interface={LOOPBACK}", *options]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.args.checkout), env.get("PYTHONPATH", "")) if p
        )
        self.commands[name] = shlex.join(argv)
        # Not in the checkout's directory: "python -m" puts the working directory first on
        # sys.path, so a checkout there would be imported instead of the one PYTHONPATH names.
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        t = Target(name, port, self.origin_port, True)
        self.wait_ready(child, t)
        settle(child.pid, 5)
        log(f"{name}: pid {child.pid}, {LOOPBACK}:{port}")
        return child, t

    def start_squid(self) -> tuple[Child, Target] | None:
        """squid with a 256 MB memory cache, or None when it is not installed or not wanted."""
        if not self.mode.squid or self.args.no_squid:
            return None
        exe = self.args.squid or shutil.which("squid") or sbin("squid")
        if not exe:
            self.problems.append("squid is not installed: no squid-cache row")
            return None
        port = free_port()
        work = self.tmp / "squid-cache"
        work.mkdir()
        os.chmod(work, 0o777)  # started as root, squid runs as its own user
        conf = work / "squid.conf"
        conf.write_text(render("squid-cache.conf", listen=f"{LOOPBACK}:{port}", work=work))
        os.chmod(conf, 0o644)
        argv = [exe, "-N", "-f", str(conf)]
        self.commands["squid-cache"] = shlex.join(argv)
        self.versions["squid"] = tool_output([exe, "-v"])
        child = Child("squid-cache", argv, logfile=work / "output.log", cwd=work)
        t = Target("squid-cache", port, self.origin_port, True)
        self.wait_ready(child, t)
        log(f"squid-cache: pid {child.pid}, {LOOPBACK}:{port}")
        return child, t

    def scan_log(self, child: Child) -> None:
        """Report tracebacks and error-level lines in an aproxy log."""
        if child.logfile is None or not child.logfile.exists():
            return
        bad = [
            line
            for line in child.logfile.read_text(errors="replace").splitlines()
            if "Traceback" in line or '"isError": 1' in line or '"name": "error"' in line
        ]
        if bad:
            sample = "\n".join(x[:300] for x in bad[:3])
            self.problems.append(
                f"{child.name} logged {len(bad)} error line(s), e.g.:\n```\n{sample}\n```"
            )

    def stop(self, child: Child) -> None:
        """Stop one proxy; an aproxy's log is scanned for errors, an early exit noted."""
        if not child.alive():
            self.problems.append(
                f"{child.name} exited early (status {child.proc.returncode}):\n"
                f"```\n{child.log_tail()}\n```"
            )
        child.stop()
        if child.name != "squid-cache":
            self.scan_log(child)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """One part of the run: a failure is recorded and the run goes on with the next."""
        log(f"part {name} ...")
        try:
            yield
        except Exception as e:  # every failure is reported, the run goes on
            self.failures.append(f"{name}: {e}")
            log(f"FAILED: {name}: {e}")

    # ---- a. 100 B keep-alive

    def keepalive(self) -> None:
        """Part a: alternating keep-alive rounds over direct, aproxy with/without, squid."""
        running: list[tuple[Child | None, Target]] = [(None, self.direct())]
        try:
            running.append(self.start_aproxy("aproxy", []))
            running.append(self.start_aproxy("aproxy-cache", ["--cache-memory", "256MiB"]))
            squid = self.start_squid()
            if squid:
                running.append(squid)
            for _, t in running[2:]:  # the caches: warm, and a hit from now on
                headers = wait_hit(t.port, t.target("/100b"), t.host)
                log(f"{t.name}: /100b is a hit ({headers.get('cache-status') or 'X-Cache'})")
            runs: dict[str, list[dict[str, Any]]] = {t.name: [] for _, t in running}
            assert self.origin is not None
            for r in range(self.mode.rounds):
                # Rotate who goes first, so no target always runs right after another.
                order = running[r % len(running) :] + running[: r % len(running)]
                for child, t in order:
                    pid = child.pid if child else self.origin.pid
                    one = load(
                        t,
                        "/100b",
                        False,
                        pid,
                        self.settings,
                        self.args,
                        self.tmp,
                        origin_pid=self.origin.pid if child else None,
                    )
                    noise = one.get("unattributed")
                    if isinstance(noise, float) and noise > DISTURBED_SHARE:
                        self.problems.append(
                            f"{t.name} round {r + 1}: {noise:.0%} of all CPUs were busy with "
                            "work not charged to wrk, the origin or the proxy: other work on "
                            "the machine disturbed this run"
                        )
                    if one.get("socket_errors") or one.get("non_2xx"):
                        self.problems.append(
                            f"{t.name} round {r + 1}: {one['socket_errors']} socket errors, "
                            f"{one['non_2xx']} non-2xx answers of {one['requests']}"
                        )
                    runs[t.name].append(one)
                    log(
                        f"round {r + 1} {t.name}: {one['rps']:,.0f} req/s, "
                        f"p50 {one['p50_ms']:.2f} / p99 {one['p99_ms']:.2f} ms"
                    )
            cached = running[2][1]
            if not hit_said(fetch(cached.port, cached.target("/100b"), cached.host)[1]):
                self.problems.append("aproxy-cache: /100b was no longer a hit after the rounds")
        finally:
            for child, _ in running:
                if child:
                    self.stop(child)
        self.keepalive_rows(runs)

    def keepalive_rows(self, runs: dict[str, list[dict[str, Any]]]) -> None:
        """The table rows of part a, with the ratios and goals of the cached aproxy."""
        med = {
            name: {key: median([x[key] for x in xs]) for key in ("rps", "p50_ms", "p99_ms")}
            for name, xs in runs.items()
        }
        cpu = {
            name: (
                median([x["cpu_per_10k"] for x in xs if x.get("cpu_per_10k") is not None]),
                median([x["cpu_sys_share"] for x in xs if x.get("cpu_sys_share") is not None]),
            )
            for name, xs in runs.items()
            if name != "direct"
        }
        tool = "wrk" if self.args.wrk else "Python load client"
        scenario = (
            f"100 B keep-alive, {tool} {self.args.connections} conns x "
            f"{self.mode.wrk_seconds:g} s, median of {self.mode.rounds} alternating rounds"
        )
        labels = {
            "direct": f"direct ({self.origin_kind.split(' (')[0]})",
            "aproxy": "aproxy, no cache",
            "aproxy-cache": "aproxy --cache-memory 256MiB (hits)",
            "squid-cache": "squid, cache_mem 256 MB (hits)",
        }
        for name, m in med.items():
            figure = f"{m['rps']:,.0f} req/s, p50 {m['p50_ms']:.2f} / p99 {m['p99_ms']:.2f} ms"
            if name in cpu:
                figure += f", {cpu[name][0]:.3f} CPU s / 10k req ({cpu[name][1]:.0%} kernel)"
            ratio = goal = ""
            if name == "aproxy-cache":
                base = med["aproxy"]["rps"]
                parts = [f"{m['rps'] / base:.2f}x uncached aproxy"]
                goals = [met("req/s >= 1.5x uncached aproxy", m["rps"] >= 1.5 * base)]
                if "squid-cache" in med:
                    squid = med["squid-cache"]["rps"]
                    parts.append(f"{m['rps'] / squid:.2f}x squid-cache")
                    goals.append(met("req/s >= squid-cache's", m["rps"] >= squid))
                ratio, goal = "; ".join(parts), "; ".join(goals)
            elif name != "direct":
                ratio = f"{m['rps'] / med['direct']['rps']:.2f}x direct"
            self.rows.append((scenario, labels[name], figure, ratio, goal))

    # ---- b and c: the disk tier

    def disk(self) -> None:
        """Parts b and c: a large disk hit at full speed, and a huge one read slowly."""
        child, t = self.start_aproxy(
            "aproxy-disk",
            [
                "--cache-dir",
                str(self.tmp / "aproxy-disk-cache"),
                "--cache-size",
                size_option(3 * self.mode.huge_bytes),
                "--cache-max-object",
                size_option(2 * self.mode.huge_bytes),
            ],
        )
        try:
            if "b" in self.args.parts:
                with self.part("b. disk hit"):
                    self.disk_hit(child, t)
            if "c" in self.args.parts:
                with self.part("c. slow reader"):
                    self.slow_read(child, t)
        finally:
            self.stop(child)

    def disk_hit(self, child: Child, t: Target) -> None:
        """Part b: the large object direct, then stored by aproxy and downloaded as hits."""
        assert self.origin is not None
        scenario = f"{size_name(self.mode.big_bytes)} hit, {self.client_name()}"
        scenario += f", median of {self.mode.downloads}"
        base = self.downloads(self.direct(), self.origin.pid)
        self.rows.append((scenario, "direct", f"{base:,.0f} MB/s", "", ""))
        fill = download(t, self.big, self.mode.big_bytes, child.pid, self.args)
        headers = wait_hit(t.port, t.target(self.big), t.host)
        log(f"aproxy-disk: {self.big} is a hit ({headers.get('cache-status')})")
        mbps = self.downloads(t, child.pid)
        self.rows.append(
            (
                scenario,
                "aproxy --cache-dir (disk tier only)",
                f"{mbps:,.0f} MB/s (the miss that filled it: {fill['mbps']:,.0f})",
                f"{mbps / base:.2f}x direct",
                met(">= 1,000 MB/s", mbps >= 1000),
            )
        )

    def client_name(self) -> str:
        """The download client, for the table."""
        return "curl -o /dev/null" if self.args.curl else "Python client"

    def downloads(self, t: Target, pid: int) -> float:
        """The median MB/s of the mode's number of downloads of the large object."""
        runs = [
            download(t, self.big, self.mode.big_bytes, pid, self.args)["mbps"]
            for _ in range(self.mode.downloads)
        ]
        log(f"{t.name}: {self.big}: {', '.join(f'{x:,.0f}' for x in runs)} MB/s")
        return median(runs)

    def slow_read(self, child: Child, t: Target) -> None:
        """Part c: fill the huge object, then read it slowly while sampling aproxy's RSS."""
        t0 = time.monotonic()
        fill = download(t, self.huge, self.mode.huge_bytes, child.pid, self.args)
        headers = wait_hit(t.port, t.target(self.huge), t.host, seconds=30)
        log(
            f"aproxy-disk: {self.huge} stored in {time.monotonic() - t0:.1f} s "
            f"({fill['mbps']:,.0f} MB/s), a hit ({headers.get('cache-status')})"
        )
        time.sleep(0.5)
        samples: list[int] = []
        with Sampler(child.pid, samples, 0.1):
            got, status_line, cache_status = slow_client(t, self.huge, self.mode.slow_seconds)
        if not cache_status or "; hit" not in cache_status.lower():
            self.problems.append(f"slow reader: not a hit ({status_line}, {cache_status})")
        start, peak, end = samples[0], max(samples), samples[-1]
        growth = (peak - start) / KIB
        figure = (
            f"RSS start {start / KIB:.1f} MiB, max {peak / KIB:.1f} MiB ({growth:+.1f}), "
            f"end {end / KIB:.1f} MiB; {got / 1e6:,.1f} MB read in "
            f"{self.mode.slow_seconds:g} s, {len(samples)} samples"
        )
        self.rows.append(
            (
                f"{size_name(self.mode.huge_bytes)} disk hit, slow reader (64 KiB reads, "
                f"0.05 s apart, {self.mode.slow_seconds:g} s, then closes)",
                "aproxy --cache-dir",
                figure,
                "",
                met(f"RSS flat (max - start <= {FLAT_MIB:g} MiB)", growth <= FLAT_MIB),
            )
        )

    # ---- d. the memory tier filled

    def memory_fill(self) -> None:
        """Part d: RSS growth from start-up to a full memory tier of small objects."""
        m = self.mode
        child, t = self.start_aproxy("aproxy-fill", ["--cache-memory", size_option(m.tier_bytes)])
        try:
            time.sleep(0.5)
            before, heap_before = rss_kib(child.pid), heap_kib(child.pid)
            t0 = time.monotonic()
            with RssSampler(child.pid, 0.05) as sampler:
                stored = fill(t, self.piece, m.fill_objects)
            seconds = time.monotonic() - t0
            time.sleep(0.5)
            after, heap_after = rss_kib(child.pid), heap_kib(child.pid)
            # The last objects stored are still in the tier (least recently used go first).
            last = f"{self.piece}?n={m.fill_objects - 1}"
            if not hit_said(fetch(t.port, t.target(last), t.host)[1]):
                self.problems.append(f"aproxy-fill: {last} is not a hit after the fill")
            if stored < m.fill_objects:
                self.problems.append(
                    f"aproxy-fill: {m.fill_objects - stored} of {m.fill_objects} fill answers "
                    "did not say stored"
                )
        finally:
            self.stop(child)
        growth = (after - before) / KIB
        limit = m.tier_bytes / MIB * (1 + TIER_SLACK)
        total = m.fill_objects * m.fill_object_bytes
        figure = (
            f"RSS {before / KIB:.1f} -> {after / KIB:.1f} MiB: {growth:+.1f} MiB "
            f"(peak {sampler.peak / KIB:.1f}; of the growth, malloc's brk heap "
            f"{(heap_after - heap_before) / KIB:+.1f}); {m.fill_objects:,} GETs, "
            f"{total / MIB:,.0f} MiB in {seconds:.1f} s"
        )
        self.rows.append(
            (
                f"{size_name(m.tier_bytes)} memory tier filled with {m.fill_objects:,} "
                f"distinct {size_name(m.fill_object_bytes)} objects",
                f"aproxy --cache-memory {size_option(m.tier_bytes)}",
                figure,
                f"{growth / (m.tier_bytes / MIB):.2f}x the tier",
                met(f"RSS growth <= {limit:.1f} MiB (tier + 10%)", growth <= limit),
            )
        )

    # ---- the whole run

    def run(self) -> None:
        """Every part in turn; a failed part is reported and the others still run."""
        self.start_origin()
        parts = self.args.parts
        if "a" in parts:
            with self.part("a. 100 B keep-alive"):
                self.keepalive()
        if "b" in parts or "c" in parts:
            with self.part("b/c. disk tier"):
                self.disk()
        if "d" in parts:
            with self.part("d. memory tier fill"):
                self.memory_fill()

    def report(self) -> str:
        """The Markdown report: the table, then how it ran, then problems and failures."""
        mode = self.mode
        out = [
            f"# aproxy cache benchmark ({mode.name})",
            "",
            f"Machine: {machine_line()}. Origin: {self.origin_kind}. Client, origin and proxies "
            "share the CPUs; compare rows of the same run.",
            "",
            "| scenario | target | figure | ratio | goal |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {' | '.join(row)} |" for row in self.rows]
        out += notes_lines(self.versions, self.commands, self.problems, self.failures)
        return "\n".join(out) + "\n"

    def cleanup(self) -> None:
        """Stop every child and remove the temp dir (unless --keep-tmp)."""
        Child.stop_all()
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def met(goal: str, ok: bool) -> str:
    """A goal and whether the figure meets it."""
    return f"{goal}: {'met' if ok else '**NOT met**'}"


class Sampler:
    """Appends a process tree's RSS (KiB) to a list every C{interval} seconds while in use."""

    def __init__(self, pid: int, samples: list[int], interval: float) -> None:
        self.pid = pid
        self.samples = samples
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """Sampling loop."""
        while not self._stop.wait(self.interval):
            self.samples.append(rss_kib(self.pid))

    def __enter__(self) -> Sampler:
        self.samples.append(rss_kib(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_kib(self.pid))


def heap_kib(pid: int) -> int:
    """
    The resident part of a process's C{[heap]} mapping (glibc malloc's main arena, grown
    with brk), KiB: what freed blocks in the middle of it keep resident shows up here.
    """
    rss, in_heap = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    in_heap = line.rstrip().endswith("[heap]")
                elif in_heap and line.startswith("Rss:"):
                    rss += int(line.split()[1])
    except OSError:
        return 0
    return rss


def slow_client(t: Target, path: str, seconds: float) -> tuple[int, str, str]:
    """
    GET C{path} through C{t} and read 64 KiB every 0.05 s for C{seconds}, then close:
    the bytes read (head included), the status line and the Cache-Status header.
    """
    got = 0
    head = b""
    with socket.create_connection((LOOPBACK, t.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(
            f"GET {t.target(path)} HTTP/1.1\r\nHost: {t.host}\r\n"
            "User-Agent: aproxy-cache-bench-slow\r\n\r\n".encode()
        )
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = sock.recv(64 * KIB)
            if not data:
                break
            got += len(data)
            if len(head) < 8192 and b"\r\n\r\n" not in head:
                head += data[:8192]
            time.sleep(0.05)
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    cache_status = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "cache-status":
            cache_status = value.strip()
    return got, lines[0], cache_status


def fill(t: Target, piece: str, count: int) -> int:
    """
    GET C{piece?n=0} .. C{piece?n=count-1} through C{t} on one keep-alive connection, the
    bodies read in full; how many answers said they were stored.
    """
    stored = 0
    conn = http.client.HTTPConnection(LOOPBACK, t.port, timeout=IO_TIMEOUT)
    try:
        for n in range(count):
            conn.request("GET", t.target(f"{piece}?n={n}"), headers={"Host": t.host})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"fill: GET {piece}?n={n} answered {response.status}")
            if "stored" in (response.getheader("Cache-Status") or ""):
                stored += 1
    finally:
        conn.close()
    return stored


def parts_list(text: str) -> str:
    """C{--parts}: letters from a, b, c, d (commas and spaces ignored)."""
    letters = "".join(c for c in text if c not in ", ")
    if not letters or set(letters) - set("abcd"):
        raise argparse.ArgumentTypeError(f"parts are letters from a, b, c, d: {text!r}")
    return letters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    mode.add_argument(
        "--smoke", action="store_true", help="tiny sizes, no squid, ~10 s (for the test suite)"
    )
    ap.add_argument(
        "--checkout", type=Path, default=CHECKOUT, help="the aproxy tree to run (this one)"
    )
    ap.add_argument("--squid", metavar="PATH", help="squid executable (default: PATH, /usr/sbin)")
    ap.add_argument("--no-squid", action="store_true", help="leave squid out")
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load client")
    ap.add_argument("--no-nginx", action="store_true", help="use the Python origin")
    ap.add_argument("--no-curl", action="store_true", help="use the built-in download client")
    ap.add_argument(
        "--parts",
        type=parts_list,
        default="abcd",
        help="which parts to run, e.g. 'd' or 'a,d' (default: all of a, b, c, d)",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.checkout = args.checkout.resolve()
    if not (args.checkout / "aproxy").is_dir():
        ap.error(f"--checkout {args.checkout}: no aproxy/ in it")
    # What aproxybench.loads reads: the load and download clients, wrk's shape.
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.curl = None if args.no_curl else shutil.which("curl")
    args.threads = 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every part and print the report: 0 when all ran, 1 if one failed, 130 on abort."""
    args = parse_args(argv)
    mode = SMOKE_MODE if args.smoke else QUICK if args.quick else FULL
    args.connections = mode.connections
    abort_on_signals(mode.max_seconds)
    bench = CacheBench(args, mode)
    status = run_bench(bench)
    print(bench.report(), end="")
    return 1 if status == 0 and bench.failures else status


if __name__ == "__main__":
    sys.exit(main())
