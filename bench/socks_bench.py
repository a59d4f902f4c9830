#!/usr/bin/env python3
"""
aproxy's SOCKS5 listener (issue #17) measured, in one run, next to aproxy's own HTTP
CONNECT tunnel, pproxy (Python, from PyPI), Dante (C, the reference) and a direct
connection to the origin.

  a. Tunnel throughput: one download of BIG bytes through a new tunnel (SOCKS5 CONNECT,
     HTTP CONNECT, or none), MB/s (10^6 B/s), the median over alternating rounds.
     Goals: aproxy SOCKS5 within 10% of aproxy CONNECT (>= 0.90x), >= 1.5x pproxy.
  b. New tunnels per second: CLIENTS client processes each loop over a new TCP
     connection, the handshake (SOCKS5 without login, or an HTTP CONNECT), a 100-byte
     answer from the origin, and close; the sum per second, median of alternating rounds.
     Goal: aproxy SOCKS5 >= aproxy CONNECT. The proxies' CPU share is shown with it, and
     the clients' own (a load client near a whole core each would be the bottleneck).

The origin is a small threaded Python server (this file with C{--origin PORT}): it reads
one line C{N}, sends N bytes and closes. aproxy runs once, serving both C{--port} and
C{--socks-port}, as C{sys.executable -m twisted aproxy} with C{PYTHONPATH} set to
C{--checkout} (this checkout by default). pproxy runs when found (C{--pproxy}, PATH,
/tmp/venv-pproxy/bin), Dante when C{danted} is installed. Everything listens on
127.0.0.1; each child runs in its own process group and is killed at the end (also on
errors, Ctrl-C and the time budget), and the temp dir is removed.

C{--quick} shortens every part (about a minute); C{--smoke} uses tiny sizes and no peers
(~15 s, for the test suite). Run it with an interpreter that has aproxy's dependencies.

Usage: python bench/socks_bench.py [--quick | --smoke] [--clients N] [--checkout DIR]
       [--pproxy PATH | --no-pproxy] [--no-dante] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aproxybench.issuebench import aproxy_version, checkout_env
from aproxybench.procs import (
    Child,
    abort_on_signals,
    cpu_seconds,
    free_port,
    log,
    own_and_children_cpu,
    run_bench,
    sbin,
    tool_output,
)
from aproxybench.report import machine_line
from aproxybench.settings import CHECKOUT, LOOPBACK, MIB

IO_TIMEOUT = 10.0
SMALL = 100
PPROXY_VENV = Path("/tmp/venv-pproxy/bin/pproxy")
_CHUNK = b"\x5a" * (1 << 20)


@dataclass(frozen=True)
class Mode:
    """How long and how big each part is (full run, --quick or --smoke)."""

    name: str
    big_bytes: int  # a: each download
    downloads: int  # a: rounds (each target once per round)
    seconds: float  # b: each load run
    rounds: int  # b: rounds
    max_seconds: int  # time budget of the whole run
    peers: bool


FULL = Mode("full", 200 * MIB, 11, 4, 5, 420, True)
QUICK = Mode("quick", 100 * MIB, 5, 2, 3, 150, True)
SMOKE_MODE = Mode("smoke", 4 * MIB, 1, 1, 1, 90, False)


@dataclass(frozen=True)
class Way:
    """How a client reaches the origin: C{kind} is direct, connect or socks5."""

    name: str
    kind: str
    port: int  # the proxy's (unused for direct)
    origin_port: int

    def open(self) -> socket.socket:
        """A connection to the origin: a fresh tunnel through the proxy, or direct."""
        if self.kind == "direct":
            return socket.create_connection((LOOPBACK, self.origin_port), timeout=IO_TIMEOUT)
        sock = socket.create_connection((LOOPBACK, self.port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.kind == "connect":
                authority = f"{LOOPBACK}:{self.origin_port}".encode()
                sock.sendall(
                    b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("the proxy closed before its answer")
                    head += chunk
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"CONNECT answered {head[:40]!r}")
            else:
                request = b"\x05\x01\x00\x01" + socket.inet_aton(LOOPBACK)
                sock.sendall(b"\x05\x01\x00" + request + struct.pack("!H", self.origin_port))
                answer = _exactly(sock, 2 + 10)
                if answer[:2] != b"\x05\x00" or answer[3] != 0:
                    raise ConnectionError(f"SOCKS5 answered {answer!r}")
        except BaseException:
            sock.close()
            raise
        return sock


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def fetch(way: Way, size: int, buf: bytearray | None = None) -> int:
    """Ask the origin for C{size} bytes through C{way}; the bytes received."""
    with way.open() as sock:
        sock.sendall(b"%d\n" % size)
        view = memoryview(buf if buf is not None else bytearray(1 << 20))
        got = 0
        while True:
            n = sock.recv_into(view)
            if not n:
                return got
            got += n


def download(way: Way, size: int) -> float:
    """One download of C{size} bytes on a new connection; MB/s."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    got = fetch(way, size, buf)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{way.name}: {got} of {size} bytes")
    return size / elapsed / 1e6


def client_run(way: Way, start_at: float, seconds: float) -> dict[str, Any]:
    """One client process of part b: new tunnels, one small answer each, until the end."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = time.process_time()
    end = start_at + seconds
    done = errors = 0
    first = ""
    buf = bytearray(4096)
    while time.monotonic() < end:
        try:
            if fetch(way, SMALL, buf) == SMALL:
                done += 1
            else:
                errors += 1
        except OSError as e:
            errors += 1
            first = first or repr(e)
    return {"done": done, "errors": errors, "first_error": first, "cpu": time.process_time() - cpu0}


def client_signals() -> None:
    """Pool workers leave Ctrl-C and SIGTERM to the parent, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Origin(socketserver.BaseRequestHandler):
    """Reads C{N\\n}, sends N bytes, closes."""

    def handle(self) -> None:
        sock = self.request
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                return
            line += chunk
        left = int(line)
        while left:
            n = min(left, len(_CHUNK))
            sock.sendall(memoryview(_CHUNK)[:n])
            left -= n
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def serve_origin(port: int) -> None:
    """The origin process (C{--origin PORT})."""

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

    with Server((LOOPBACK, port), _Origin) as server:
        server.serve_forever()


def median(values: list[float]) -> float:
    """The median (a one-element list is its element)."""
    return float(statistics.median(values))


def met(goal: str, ok: bool) -> str:
    """A goal and whether the figure meets it."""
    return f"{goal}: {'met' if ok else '**NOT met**'}"


class SocksBench:
    """One run: origin, proxies, parts a and b, the report."""

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        self.args = args
        self.mode = mode
        self.tmp = Path(tempfile.mkdtemp(prefix="aproxy-socks-bench-"))
        self.children: dict[str, Child] = {}
        self.ways: list[Way] = []
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.problems: list[str] = []
        self.failures: list[str] = []
        self.commands: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.origin_port = 0
        self.load_before = os.getloadavg()[0]

    # ---- children

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start C{argv} as the child C{name}, its output in its own work directory."""
        work = self.tmp / name
        work.mkdir()
        self.commands[name] = shlex.join(argv)
        # Not in the checkout's directory: "python -m" puts the working directory first on
        # sys.path, so a checkout there would be imported instead of the one PYTHONPATH names.
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        self.children[name] = child
        return child

    def wait_ready(self, child: Child, way: Way) -> None:
        """Until a small fetch through C{way} works (30 s at most)."""
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
            try:
                if fetch(way, SMALL) == SMALL:
                    return
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready after 30 s ({last})")

    def start_origin(self) -> None:
        """The origin process, and the direct way to it."""
        self.origin_port = free_port()
        argv = [sys.executable, os.path.abspath(__file__), "--origin", str(self.origin_port)]
        child = self.start("origin", argv)
        way = Way("direct", "direct", 0, self.origin_port)
        self.wait_ready(child, way)
        self.ways.append(way)
        log(f"origin: pid {child.pid}, {LOOPBACK}:{self.origin_port}")

    def start_aproxy(self) -> None:
        """One aproxy serving HTTP CONNECT and SOCKS5."""
        http, socks = free_port(), free_port()
        argv = [sys.executable, "-m", "twisted", "aproxy"]
        argv += ["--port", f"tcp:{http}:interface={LOOPBACK}"]
        argv += ["--socks-port", f"tcp:{socks}:interface={LOOPBACK}", "--connect-ports", "*"]
        env = checkout_env(self.args.checkout)
        child = self.start("aproxy", argv, env)
        connect = Way("aproxy CONNECT", "connect", http, self.origin_port)
        self.wait_ready(child, connect)
        socks5 = Way("aproxy SOCKS5", "socks5", socks, self.origin_port)
        self.wait_ready(child, socks5)
        self.ways += [connect, socks5]
        self.versions["aproxy"] = aproxy_version()
        log(f"aproxy: pid {child.pid}, CONNECT {http}, SOCKS5 {socks}")

    def start_pproxy(self) -> None:
        """pproxy serving SOCKS5 (when found)."""
        exe = self.args.pproxy
        if not exe:
            self.problems.append("pproxy not found (--pproxy PATH): no pproxy rows")
            return
        port = free_port()
        child = self.start("pproxy", [exe, "-l", f"socks5://{LOOPBACK}:{port}"])
        way = Way("pproxy", "socks5", port, self.origin_port)
        self.wait_ready(child, way)
        self.ways.append(way)
        self.versions["pproxy"] = tool_output([exe, "--version"])
        log(f"pproxy: pid {child.pid}, {port}")

    def start_dante(self) -> None:
        """Dante serving SOCKS5 without login (when installed): the C reference."""
        exe = sbin("danted")
        if exe is None:
            self.problems.append("danted not installed (apt-get install dante-server)")
            return
        port = free_port()
        conf = self.tmp / "danted.conf"
        conf.write_text(
            f"logoutput: {self.tmp / 'danted.log'}\n"
            f"internal: {LOOPBACK} port = {port}\nexternal: {LOOPBACK}\n"
            "clientmethod: none\nsocksmethod: none\n"
            "user.privileged: root\nuser.unprivileged: nobody\n"
            "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        )
        child = self.start("dante", [exe, "-f", str(conf), "-p", str(self.tmp / "danted.pid")])
        way = Way("dante", "socks5", port, self.origin_port)
        self.wait_ready(child, way)
        self.ways.append(way)
        self.versions["dante"] = tool_output([exe, "-v"])
        log(f"dante: pid {child.pid}, {port}")

    def check_alive(self) -> None:
        """Fail the run if a child exited."""
        for child in self.children.values():
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")

    # ---- parts

    def downloads(self) -> None:
        """Part a: one download per target and round, alternating; medians."""
        mbps: dict[str, list[float]] = {w.name: [] for w in self.ways}
        for r in range(self.mode.downloads):
            order = self.ways[r % len(self.ways) :] + self.ways[: r % len(self.ways)]
            for way in order:
                mbps[way.name].append(download(way, self.mode.big_bytes))
            self.check_alive()
        for way in self.ways:
            log(f"download {way.name}: {', '.join(f'{x:,.0f}' for x in mbps[way.name])} MB/s")
        med = {name: median(xs) for name, xs in mbps.items()}
        size = f"{self.mode.big_bytes // MIB} MiB"
        title = f"a. one {size} download through a new tunnel, median of {self.mode.downloads}"
        for way in self.ways:
            self.rows.append(
                (
                    title,
                    way.name,
                    f"{med[way.name]:,.0f} MB/s",
                    *self.compare(med, way.name, "throughput"),
                )
            )

    def compare(self, med: dict[str, float], name: str, part: str) -> tuple[str, str]:
        """The ratio and goal cells of C{name}'s row."""
        ratios, goals = [], []
        if name != "direct":
            ratios.append(f"{med[name] / med['direct']:.2f}x direct")
        if name == "aproxy SOCKS5":
            x = med[name] / med["aproxy CONNECT"]
            ratios.insert(0, f"{x:.2f}x aproxy CONNECT")
            if part == "throughput":
                goals.append(met(">= 0.90x CONNECT", x >= 0.90))
            else:
                goals.append(met(">= 1.00x CONNECT", x >= 1.0))
            if "pproxy" in med:
                y = med[name] / med["pproxy"]
                ratios.insert(1, f"{y:.2f}x pproxy")
                if part == "throughput":
                    goals.append(met(">= 1.5x pproxy", y >= 1.5))
            if "dante" in med:
                ratios.insert(1, f"{med[name] / med['dante']:.2f}x dante")
        return "; ".join(ratios), "; ".join(goals)

    def load(self, pool: Any, way: Way) -> dict[str, float]:
        """One load run over every client: tunnels per second and CPU shares."""
        n, seconds = self.args.clients, self.mode.seconds
        start_at = time.monotonic() + 0.5
        child = self.children.get("origin" if way.kind == "direct" else way.name.split()[0])
        pid = child.pid if child else self.children["origin"].pid
        results = pool.starmap_async(client_run, [(way, start_at, seconds)] * n)
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = sum(cpu_seconds(pid))
        results.wait(seconds + 0.2)
        cpu = sum(cpu_seconds(pid)) - cpu0
        elapsed = time.monotonic() - start_at
        outs = results.get(seconds + 30)
        done = sum(x["done"] for x in outs)
        errors = sum(x["errors"] for x in outs)
        if errors:
            first = next(x["first_error"] for x in outs if x["first_error"])
            self.problems.append(f"{way.name} new tunnels: {errors} errors, e.g. {first}")
        clients = sum(x["cpu"] for x in outs) / seconds / n
        return {
            "rate": done / seconds,
            "cpu_share": cpu / elapsed,
            "cpu_us": cpu / max(done, 1) * 1e6,
            "clients": clients,
        }

    def rounds(self) -> None:
        """Part b in alternating rounds; its rows."""
        runs: dict[str, list[dict[str, float]]] = {}
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(self.args.clients, initializer=client_signals) as pool:
            for r in range(self.mode.rounds):
                order = self.ways[r % len(self.ways) :] + self.ways[: r % len(self.ways)]
                for way in order:
                    one = self.load(pool, way)
                    runs.setdefault(way.name, []).append(one)
                    log(
                        f"round {r + 1} {way.name}: {one['rate']:,.0f}/s,"
                        f" CPU {one['cpu_share']:.0%}"
                    )
                    self.check_alive()
        n, s, k = self.args.clients, self.mode.seconds, self.mode.rounds
        title = (
            f"b. new tunnel per 100-byte answer (TCP + handshake + answer + close): {n} client"
            f" processes, {s:g} s, median of {k} alternating rounds"
        )
        med = {
            name: {
                key: median([x[key] for x in xs])
                for key in ("rate", "cpu_share", "cpu_us", "clients")
            }
            for name, xs in runs.items()
        }
        rates = {name: m["rate"] for name, m in med.items()}
        for way in self.ways:
            m = med[way.name]
            who = "origin" if way.name == "direct" else way.name.split()[0]
            figure = (
                f"{m['rate']:,.0f} conn/s; {who} CPU {m['cpu_share']:.0%} of a core,"
                f" {m['cpu_us']:,.0f} µs each; each client {m['clients']:.0%}"
            )
            self.rows.append((title, way.name, figure, *self.compare(rates, way.name, "rate")))

    @contextlib.contextmanager
    def part(self, name: str) -> Any:
        """One part: a failure is recorded and the run goes on with the next."""
        log(f"part {name} ...")
        try:
            yield
        except Exception as e:  # every failure is reported, the run goes on
            self.failures.append(f"{name}: {e}")
            log(f"FAILED: {name}: {e}")

    def run(self) -> None:
        """Start everything, then each part in turn; a failed part is reported."""
        self.start_origin()
        self.start_aproxy()
        if self.mode.peers and not self.args.no_pproxy:
            with self.part("pproxy start"):
                self.start_pproxy()
        if self.mode.peers and not self.args.no_dante:
            with self.part("dante start"):
                self.start_dante()
        with self.part("a. throughput"):
            self.downloads()
        with self.part("b. new tunnels"):
            self.rounds()

    def report(self) -> str:
        """The Markdown report: the table, then how it ran, then problems and failures."""
        out = [
            f"# aproxy SOCKS5 benchmark ({self.mode.name})",
            "",
            f"Machine: {machine_line()}. Clients, origin and proxies share the CPUs; compare"
            " rows of the same run. A proxy's CPU is its process tree's (utime + stime) over"
            " the window. Load average (1 min) at the start"
            f" {self.load_before:.1f} (before this run's processes), at the end"
            f" {os.getloadavg()[0]:.1f}: other work on the machine moves the figures.",
            "",
            "| part | target | figure | ratio | goal |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {' | '.join(row)} |" for row in self.rows]
        out += ["", "Versions:"]
        out += [f"- {k}: {v}" for k, v in sorted(self.versions.items()) if v]
        out += ["", "Commands:"]
        out += [f"- {k}: `{v}`" for k, v in self.commands.items()]
        if self.problems:
            out += ["", "Problems:"] + [f"- {x}" for x in self.problems]
        if self.failures:
            out += ["", "Failed:"] + [f"- {x}" for x in self.failures]
        return "\n".join(out) + "\n"

    def cleanup(self) -> None:
        """Stop every child, scan aproxy's log, remove the temp dir (unless --keep-tmp)."""
        log_path = self.tmp / "aproxy" / "output.log"
        Child.stop_all()
        if log_path.exists():
            bad = [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if "Traceback" in line or "Unhandled" in line or "[-] " in line
            ]
            if bad:
                sample = "\n".join(x[:300] for x in bad[:3])
                self.problems.append(f"aproxy logged {len(bad)} error line(s):\n```\n{sample}\n```")
        log(f"this process and its clients used {own_and_children_cpu():.1f} s of CPU")
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, no peers (the tests)")
    ap.add_argument("--clients", type=int, default=4, help="client processes for part b (4)")
    ap.add_argument("--checkout", type=Path, default=CHECKOUT, help="the aproxy tree to run")
    ap.add_argument("--pproxy", metavar="PATH", help="pproxy (PATH, /tmp/venv-pproxy/bin)")
    ap.add_argument("--no-pproxy", action="store_true", help="leave pproxy out")
    ap.add_argument("--no-dante", action="store_true", help="leave Dante out")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--origin", type=int, help=argparse.SUPPRESS)  # PORT: be the origin
    args = ap.parse_args(argv)
    args.checkout = args.checkout.resolve()
    if not (args.checkout / "aproxy").is_dir():
        ap.error(f"--checkout {args.checkout}: no aproxy/ in it")
    if not args.pproxy:
        found = shutil.which("pproxy")
        args.pproxy = found or (str(PPROXY_VENV) if PPROXY_VENV.exists() else None)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every part and print the report: 0 when all ran, 1 if one failed, 130 on abort."""
    args = parse_args(argv)
    if args.origin:
        serve_origin(args.origin)
        return 0
    mode = SMOKE_MODE if args.smoke else QUICK if args.quick else FULL
    abort_on_signals(mode.max_seconds)
    bench = SocksBench(args, mode)
    status = run_bench(bench)
    print(bench.report(), end="")
    return 1 if status == 0 and bench.failures else status


if __name__ == "__main__":
    sys.exit(main())
