"""
The scenarios: the keep-alive and Connection: close loads (wrk, or a Python client when wrk
is missing) with CPU accounting, large downloads and uploads, idle connections held, and a
slow reader. Each measures one target and returns its figures as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .httpio import Target, http_fetch, http_post_file, parse_head, request_bytes
from .procs import (
    RssSampler,
    cpu_seconds,
    machine_busy_seconds,
    own_and_children_cpu,
    rss_kib,
    run_bounded,
)
from .settings import CONNECT_PARALLEL, IO_TIMEOUT, LOOPBACK, PROGRAMS, Settings

__all__ = [
    "download",
    "idle_conns",
    "load",
    "python_load",
    "slow_reader",
    "upload",
    "wrk_load",
]


def wrk_load(
    t: Target,
    path: str,
    close: bool,
    s: Settings,
    args: argparse.Namespace,
    tmp: Path,
    delay_ms: int = 0,
) -> dict[str, Any]:
    """
    One wrk run (1 thread, 50 connections by default); returns the parsed summary. With
    C{delay_ms} each connection pauses that long before each request (a paced load).
    """
    out = tmp / f"wrk-{t.name}-{'close' if close else 'ka'}-{time.monotonic_ns()}.json"
    argv = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{s.wrk_seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(PROGRAMS / "wrk.lua"),
        f"http://{LOOPBACK}:{t.port}/",
    ]
    env = dict(os.environ)
    env.update(
        APB_TARGET=t.target(path),
        APB_HOST=t.host,
        APB_CLOSE="1" if close else "0",
        APB_DELAY_MS=str(delay_ms),
        APB_OUT=str(out),
    )
    cmd = f"APB_TARGET={t.target(path)} APB_HOST={t.host} APB_CLOSE={int(close)} "
    if delay_ms:
        cmd += f"APB_DELAY_MS={delay_ms} "
    cmd += shlex.join(argv)
    p = run_bounded("wrk", argv, timeout=s.wrk_seconds + 30, env=env)
    if not out.exists():
        raise RuntimeError(f"wrk wrote no summary (rc {p.returncode}): {p.stderr!r:.300}")
    w = json.loads(out.read_text())
    seconds = w["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "cmd": cmd,
        "requests": w["requests"],
        "seconds": seconds,
        "rps": w["requests"] / seconds if seconds else 0.0,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "socket_errors": w["connect"] + w["read"] + w["write"] + w["timeout"],
        "errors_detail": {k: w[k] for k in ("connect", "read", "write", "timeout")},
        "non_2xx": w["status"],
        "non_2xx_note": "status >= 400 (wrk's count)",
    }


async def _py_load(
    port: int, req: bytes, conns: int, seconds: float, close: bool, max_requests: int
) -> dict[str, Any]:
    """Keep-alive (or close) load from C{conns} asyncio clients for C{seconds}."""
    latencies: list[float] = []
    stats: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < deadline and stats["requests"] < max_requests:
            t0 = time.perf_counter()
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(LOOPBACK, port), 5
                    )
                assert reader is not None and writer is not None  # for mypy
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                status, length, server_close = parse_head(head[:-4])
                if length:
                    await asyncio.wait_for(reader.readexactly(length), 5)
            except (OSError, EOFError, ValueError, IndexError, TimeoutError) as e:
                stats["socket_errors"] += 1
                stats[type(e).__name__] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            stats["requests"] += 1
            if not 200 <= status < 300:
                stats["non_2xx"] += 1
            if close or server_close or length is None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.monotonic() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    return {
        "requests": stats["requests"],
        "seconds": elapsed,
        "rps": stats["requests"] / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "socket_errors": stats["socket_errors"],
        "errors_detail": {k: v for k, v in stats.items() if k not in ("requests", "non_2xx")},
        "non_2xx": stats["non_2xx"],
        "non_2xx_note": "any status outside 2xx",
    }


def python_load(
    t: Target, path: str, close: bool, s: Settings, args: argparse.Namespace
) -> dict[str, Any]:
    """The fallback load client (no wrk): asyncio, same connection count and duration."""
    req = request_bytes(t.target(path), t.host, close=close)
    r = asyncio.run(_py_load(t.port, req, args.connections, s.wrk_seconds, close, 5_000_000))
    r["tool"] = "python"
    r["cmd"] = (
        f"built-in asyncio client: {args.connections} connections, {s.wrk_seconds:g} s, "
        f"GET {t.target(path)} via {LOOPBACK}:{t.port}{' (Connection: close)' if close else ''}"
    )
    return r


def load(
    t: Target,
    path: str,
    close: bool,
    measured_pid: int,
    s: Settings,
    args: argparse.Namespace,
    tmp: Path,
    origin_pid: int | None = None,
    delay_ms: int = 0,
) -> dict[str, Any]:
    """
    One load run with CPU accounting of C{measured_pid}'s process tree, and of the whole
    machine: how much CPU was busy, and how much of it was not charged to the load client,
    the origin (C{origin_pid}) or the measured process (other processes, kernel work).
    """
    cpu0 = cpu_seconds(measured_pid)
    origin0 = sum(cpu_seconds(origin_pid)) if origin_pid else 0.0
    client0 = own_and_children_cpu()
    busy0, wall0 = machine_busy_seconds(), time.monotonic()
    if args.wrk:
        r = wrk_load(t, path, close, s, args, tmp, delay_ms)
    elif delay_ms:
        raise RuntimeError("the paced load needs wrk")
    else:
        r = python_load(t, path, close, s, args)
    cpu1 = cpu_seconds(measured_pid)
    busy, wall = machine_busy_seconds() - busy0, time.monotonic() - wall0
    client = own_and_children_cpu() - client0
    origin = sum(cpu_seconds(origin_pid)) - origin0 if origin_pid else 0.0
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    ncpu = os.cpu_count() or 1
    r["machine_busy"] = busy / (wall * ncpu) if wall else None
    r["unattributed"] = max(0.0, busy - client - origin - user - system) / (wall * ncpu)
    r["cpu_s"] = user + system
    r["cpu_sys_share"] = system / (user + system) if user + system else None
    r["cpu_per_10k"] = r["cpu_s"] / r["requests"] * 10_000 if r["requests"] else None
    if r["requests"] == 0:
        raise RuntimeError(f"no request completed ({r['errors_detail']})")
    return r


# --------------------------------------------------------------------------------------------
# large download, idle connections, slow reader


def download(
    t: Target,
    path: str,
    size: int,
    measured_pid: int,
    args: argparse.Namespace,
    tunnel: bool = False,
) -> dict[str, Any]:
    """
    One download of the large file, with peak RSS: plain forwarding through the proxy
    (curl -x), or with C{tunnel} through a CONNECT tunnel (curl -p -x), or direct.
    """
    base = rss_kib(measured_pid)
    with RssSampler(measured_pid) as sampler:
        if args.curl:
            argv = [args.curl, "-sS", "-o", "/dev/null", "--max-time", "120"]
            argv += ["-w", "%{http_code} %{size_download} %{time_total}"]
            if t.via_proxy:
                argv += (["-p"] if tunnel else []) + ["-x", f"http://{LOOPBACK}:{t.port}"]
            argv.append(f"http://{t.host}{path}")
            p = run_bounded("curl", argv, timeout=130)
            if p.returncode != 0:
                raise RuntimeError(f"curl exit {p.returncode}: {p.stderr.strip()}")
            code, got, seconds = p.stdout.split()
            status, got_n, secs = int(code), int(got), float(seconds)
            cmd = shlex.join(argv)
        else:
            t0 = time.monotonic()
            target = path if tunnel else t.target(path)
            status, got_n = http_fetch(t.port, target, t.host, timeout=30, tunnel=tunnel)
            secs = time.monotonic() - t0
            via = f"CONNECT {t.host} via" if tunnel else "via"
            cmd = f"built-in socket client: GET {target} {via} {LOOPBACK}:{t.port}"
    if status != 200 or got_n != size:
        raise RuntimeError(f"download: status {status}, {got_n} of {size} bytes")
    return {
        "cmd": cmd,
        "mbps": got_n / secs / 1e6 if secs else 0.0,
        "seconds": secs,
        "rss_growth_mib": (sampler.peak - base) / 1024,
    }


def upload(
    t: Target, file: Path, size: int, measured_pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    """
    One POST of the large file to the upload sink (C{t.host}), plain forwarded through the
    proxy (curl -x --data-binary) or direct, with peak RSS. The sink answers with the number
    of body bytes it received, which must be the whole file.
    """
    base = rss_kib(measured_pid)
    url = f"http://{t.host}/upload"
    with RssSampler(measured_pid) as sampler:
        if args.curl:
            # No "Expect: 100-continue" (curl adds it for large bodies): the figure is about
            # forwarding the body, not about waiting for an interim response.
            argv = [args.curl, "-sS", "-o", "-", "--max-time", "120", "-H", "Expect:"]
            argv += ["-H", "Content-Type: application/octet-stream", "--data-binary", f"@{file}"]
            argv += ["-w", "\\n%{http_code} %{size_upload} %{time_total}"]
            if t.via_proxy:
                argv += ["-x", f"http://{LOOPBACK}:{t.port}"]
            argv.append(url)
            p = run_bounded("curl", argv, timeout=130)
            if p.returncode != 0:
                raise RuntimeError(f"curl exit {p.returncode}: {p.stderr.strip()}")
            body, _, stats = p.stdout.rpartition("\n")
            code, sent, seconds = stats.split()
            status, sent_n, secs = int(code), int(sent), float(seconds)
            cmd = shlex.join(argv)
        else:
            t0 = time.monotonic()
            target = url if t.via_proxy else "/upload"
            status, raw = http_post_file(t.port, target, t.host, file, timeout=30)
            secs = time.monotonic() - t0
            body, sent_n = raw.decode("ascii", "replace"), size
            cmd = f"built-in socket client: POST {target} via {LOOPBACK}:{t.port}, {file}"
    received = int(body) if body.strip().isdigit() else None
    if status != 200 or sent_n != size or received != size:
        raise RuntimeError(
            f"upload: status {status}, sent {sent_n} of {size} bytes, sink received "
            f"{received if received is not None else repr(body[:80])}"
        )
    return {
        "cmd": cmd,
        "mbps": size / secs / 1e6 if secs else 0.0,
        "seconds": secs,
        "rss_growth_mib": (sampler.peak - base) / 1024,
    }


async def _hold_idle(
    t: Target, n: int, measure: Callable[[], int], settle: float
) -> tuple[dict[str, Any], int]:
    """Open C{n} keep-alive connections, one request each; measure while all are held."""
    req = request_bytes(t.target("/100b"), t.host, agent="aproxy-bench-idle")
    sem = asyncio.Semaphore(CONNECT_PARALLEL)
    stats: Counter[str] = Counter()
    last_error: list[str] = []

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(LOOPBACK, t.port), IO_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                stats["connect_failed"] += 1
                last_error[:] = [repr(e)]
                return None
            try:
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
                status, length, _ = parse_head(head[:-4])
                if length:
                    await asyncio.wait_for(reader.readexactly(length), IO_TIMEOUT)
                stats["ok" if status == 200 else "bad_status"] += 1
            except (OSError, EOFError, ValueError, IndexError, TimeoutError) as e:
                stats["request_failed"] += 1
                last_error[:] = [repr(e)]
            return reader, writer

    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 120)
    open_s = time.monotonic() - t0
    conns = [c for c in results if c is not None]
    await asyncio.sleep(settle)
    held = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
    held_kib = measure()
    for _, w in conns:
        w.close()
    info: dict[str, Any] = dict(stats)
    info.update(open_s=open_s, held=held, requested=n)
    if last_error:
        info["last_error"] = last_error[0]
    return info, held_kib


def idle_conns(t: Target, measured_pid: int, s: Settings) -> dict[str, Any]:
    """RSS per idle keep-alive connection with C{s.idle_conns} of them held."""
    before = rss_kib(measured_pid)
    info, held_kib = asyncio.run(_hold_idle(t, s.idle_conns, lambda: rss_kib(measured_pid), 0.5))
    info["rss_before_mib"] = before / 1024
    info["rss_held_mib"] = held_kib / 1024
    info["kib_per_conn"] = (held_kib - before) / info["held"] if info["held"] else None
    if info.get("ok", 0) == 0:
        raise RuntimeError(f"no idle-connection request succeeded: {info}")
    return info


def slow_reader(t: Target, path: str, measured_pid: int, s: Settings) -> dict[str, Any]:
    """RSS growth while one client reads the large body at about C{s.slow_rate} B/s."""
    before = rss_kib(measured_pid)
    got, eof = 0, False
    with RssSampler(measured_pid) as sampler:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(IO_TIMEOUT)
            sock.connect((LOOPBACK, t.port))
            sock.sendall(request_bytes(t.target(path), t.host, agent="aproxy-bench-slow"))
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < s.slow_seconds:
                want = int(s.slow_rate * elapsed) - got
                if want <= 0:
                    time.sleep(0.02)
                    continue
                sock.settimeout(max(0.05, s.slow_seconds - elapsed))
                try:
                    data = sock.recv(min(want, 65536))
                except TimeoutError:
                    continue
                if not data:
                    eof = True
                    break
                got += len(data)
            seconds = time.monotonic() - t0
        finally:
            sock.close()
    time.sleep(0.2)
    if got == 0:
        raise RuntimeError("slow reader received nothing")
    return {
        "bytes": got,
        "seconds": seconds,
        "eof": eof,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": sampler.peak / 1024,
        "growth_mib": (sampler.peak - before) / 1024,
        "rss_after_mib": rss_kib(measured_pid) / 1024,
    }
