#!/usr/bin/env python3
"""
How idle client connections slow aproxy down when C{--metrics} is on (issue 12 item 11).

Starts a small keep-alive origin and aproxy (with C{--metrics}) on free 127.0.0.1 ports,
then measures requests/s of a keep-alive load of 100-byte GETs through the proxy, in
alternating rounds with 0 and with N (default 2,000) idle keep-alive client connections
held open (each sent one request and read its answer first, so it is a real, idle
keep-alive client). Prints the median requests/s of each kind and their ratio, and
aproxy's CPU time per request (utime + stime from /proc, which does not depend on how
fast the load client is or on other work on the machine, unlike requests/s). Before
the fix every finished request walked every open connection, so 2,000 idle connections
halved the rate (934 -> 462 requests/s in the issue's run).

Only the standard library is used; aproxy runs as C{sys.executable -m twisted aproxy}
with C{PYTHONPATH} set to C{--checkout} (this checkout by default), so an older tree can
be measured the same way (e.g. one exported with C{git archive}). Everything listens on
127.0.0.1 only; each child runs in its own process group and is killed at the end (also
on errors and Ctrl-C); every socket has a timeout and the whole run is bounded by
C{--max-seconds}.

Usage: python bench/metrics_idle.py [--idle 2000] [--rounds 3] [--seconds 5]
       [--connections 32] [--checkout DIR] [--no-metrics]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
IO_TIMEOUT = 10.0

# A keep-alive origin answering every request with 100 bytes (run as a child process).
ORIGIN = r"""
import asyncio, sys
BODY = b"x" * 99 + b"\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n" + BODY
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    """A port that is free on 127.0.0.1 now (bound and released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, deadline: float) -> None:
    """Wait until something accepts connections on C{port}, or raise at C{deadline}."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port}")


@contextlib.contextmanager
def child(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """
    Run C{args} in its own process group, in the log's directory; SIGTERM, then SIGKILL,
    the group at the end.
    """
    with open(log, "wb") as out:
        # Not in the caller's directory: "python -m" puts it first on sys.path, so a
        # checkout there would be imported instead of the one PYTHONPATH names.
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)


def request(origin_port: int) -> bytes:
    """An absolute-form keep-alive GET for the origin's 100-byte answer."""
    authority = f"{LOOPBACK}:{origin_port}".encode()
    return b"GET http://" + authority + b"/100b HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one Content-Length framed response; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def open_idle(proxy_port: int, origin_port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open C{count} keep-alive client connections, each after one request, and keep them."""
    req = request(origin_port)
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(64)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, proxy_port), IO_TIMEOUT
            )
            writers.append(writer)
            writer.write(req)
            status = await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
            if status != 200:
                raise RuntimeError(f"idle connection's request got {status}")

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    """Close the idle connections."""
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)


async def load(proxy_port: int, origin_port: int, connections: int, seconds: float) -> float:
    """Keep-alive GETs on C{connections} connections for C{seconds}; return requests/s."""
    req = request(origin_port)
    done = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, proxy_port), IO_TIMEOUT
        )
        try:
            while time.monotonic() < stop:
                writer.write(req)
                status = await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
                if status != 200:
                    raise RuntimeError(f"load request got {status}")
                done += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    return done / (time.monotonic() - started)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    args: argparse.Namespace, proxy_port: int, origin_port: int, pid: int
) -> dict[int, list[tuple[float, float]]]:
    """
    The alternating rounds: with 0 and with C{args.idle} idle connections, requests/s
    and aproxy's CPU microseconds per request.
    """
    results: dict[int, list[tuple[float, float]]] = {0: [], args.idle: []}
    await load(proxy_port, origin_port, args.connections, 1.0)  # warm up
    for round_number in range(args.rounds):
        for idle in (0, args.idle) if round_number % 2 == 0 else (args.idle, 0):
            writers = await open_idle(proxy_port, origin_port, idle) if idle else []
            try:
                await asyncio.sleep(0.5)
                before = cpu_seconds(pid)
                rate = await load(proxy_port, origin_port, args.connections, args.seconds)
                cpu = (cpu_seconds(pid) - before) / (rate * args.seconds) * 1e6
            finally:
                await close_all(writers)
            results[idle].append((rate, cpu))
            print(
                f"round {round_number + 1}: {idle} idle: {rate:,.0f} req/s, {cpu:.0f} us CPU/req",
                file=sys.stderr,
            )
            await asyncio.sleep(0.5)
    return results


def main() -> int:
    """Run the measurement and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle connections (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per load run (5)")
    parser.add_argument("--connections", type=int, default=32, help="load connections (32)")
    parser.add_argument("--checkout", type=Path, default=CHECKOUT, help="aproxy tree to run")
    parser.add_argument("--no-metrics", action="store_true", help="run without --metrics")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="abort after (300)")
    args = parser.parse_args()
    if not 0 < args.idle <= 10000 or not 0 < args.connections <= 256 or args.rounds < 1:
        parser.error("--idle 1..10000, --connections 1..256, --rounds 1 or more")
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("aborted: --max-seconds reached"))
    signal.alarm(int(args.max_seconds))
    origin_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(args.checkout.resolve()))
    command = [
        sys.executable, "-m", "twisted", "aproxy",
        "--port", f"tcp:{proxy_port}:interface={LOOPBACK}",
        "--max-clients-per-ip", str(args.idle + args.connections + 100),
        "--max-connections", str(args.idle + args.connections + 100),
        "--idle-timeout", "600",
    ]  # fmt: skip
    if not args.no_metrics:
        command += ["--metrics", f"tcp:{metrics_port}:interface={LOOPBACK}"]
    with tempfile.TemporaryDirectory(prefix="aproxy-bench-") as tmp:
        origin_cmd = [sys.executable, "-c", ORIGIN, str(origin_port)]
        with (
            child(origin_cmd, dict(os.environ), Path(tmp) / "origin.log"),
            child(command, env, Path(tmp) / "aproxy.log") as proxy,
        ):
            deadline = time.monotonic() + 30
            wait_listening(origin_port, deadline)
            wait_listening(proxy_port, deadline)
            results = asyncio.run(measure(args, proxy_port, origin_port, proxy.pid))
            if proxy.poll() is not None:
                sys.exit(f"aproxy exited: see {tmp}/aproxy.log")
    quiet = statistics.median(rate for rate, _ in results[0])
    busy = statistics.median(rate for rate, _ in results[args.idle])
    print(f"aproxy from {args.checkout.resolve()}, metrics {'off' if args.no_metrics else 'on'}")
    print(f"command: {' '.join(command)}")
    print(
        f"{args.connections} keep-alive load connections,"
        f" {args.rounds} x {args.seconds:g} s rounds of each kind"
    )
    for idle, median in ((0, quiet), (args.idle, busy)):
        rounds = ", ".join(f"{rate:,.0f}" for rate, _ in results[idle])
        cpu = statistics.median(cpu for _, cpu in results[idle])
        print(
            f"{idle} idle connections: {median:,.0f} req/s (median of {rounds}),"
            f" aproxy CPU {cpu:.0f} us per request (median)"
        )
    print(f"req/s ratio, {args.idle} idle / 0 idle: {busy / quiet:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
