#!/usr/bin/env python3
"""
aproxy's TLS interception (issue #15) measured, in one run, next to mitmproxy and a direct
connection to the origin.

  leaf. How long a new leaf certificate takes (target: p50 <= 1 ms), measured in this
     process with aproxy's own L{LeafContexts} (the key of every leaf made once; each new
     host name one signature and one TLS context), and a cached lookup.
  a. Intercepted keep-alive requests/s: CLIENTS client processes each open one CONNECT
     tunnel, speak TLS to the proxy (trusting its CA), then GET /small (100 bytes) on that
     connection as fast as they can for a few seconds; the sum of requests/s. The same
     clients talk TLS to the origin directly for reference (the clients' and the origin's
     own ceiling). Goal: aproxy >= 3x mitmproxy.
  b. Intercepted new connections/s: each client loops over a new TCP connection, CONNECT,
     a TLS handshake (the leaf is made once, then cached), one GET with Connection: close,
     close. Goal: aproxy >= 2x mitmproxy.
  c. One intercepted download of a 100 MiB static file, MB/s (10^6 B/s), median.
     Goal: aproxy >= 300 MB/s.

a and b run in alternating rounds (each round starts with the next target; medians), since
a shared machine's speed drifts. The origin is nginx with TLS (bench/templates/
nginx-tls.conf) when installed, else a small threaded Python TLS origin; its certificate
comes from an origin CA made with trustme, which aproxy (C{--ca-file}) and mitmproxy
(C{ssl_verify_upstream_trusted_ca}) are told to trust. mitmproxy runs when C{mitmdump} is
found (C{--mitmdump}, PATH, /tmp/venv-mitm/bin). aproxy runs as C{sys.executable -m twisted
aproxy} with C{PYTHONPATH} set to C{--checkout} (this checkout by default). Everything
listens on 127.0.0.1; each child runs in its own process group and is killed at the end
(also on errors, Ctrl-C and the time budget), and the temp dir is removed.

C{--quick} shortens every part (under 90 s); C{--smoke} uses tiny sizes and no mitmproxy
(~15 s, for the test suite). Run it with an interpreter that has aproxy's dependencies and
trustme (the dev virtualenv's).

Usage: python bench/intercept_bench.py [--quick | --smoke] [--clients N] [--count N]
       [--checkout DIR] [--mitmdump PATH | --no-mitmproxy] [--no-nginx] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aproxybench.issuebench import (
    IssueBench,
    aproxy_version,
    checkout_env,
    median,
    met,
    mitmdump,
    run_main,
)
from aproxybench.procs import (
    Child,
    cpu_seconds,
    free_port,
    log,
    tool_output,
)
from aproxybench.report import machine_line
from aproxybench.settings import CHECKOUT, LOOPBACK, MIB

IO_TIMEOUT = 10.0
SMALL_BODY = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes


@dataclass(frozen=True)
class Mode:
    """How long and how big each part is (full run, --quick or --smoke)."""

    name: str
    seconds: float  # a and b: each client's run per target and round
    rounds: int
    big_bytes: int  # c: the download
    downloads: int  # c: per target (median)
    leaves: int  # leaf: new leaves made
    max_seconds: int  # time budget of the whole run
    mitmproxy: bool


FULL = Mode("full", 5, 3, 100 * MIB, 3, 2000, 270, True)
QUICK = Mode("quick", 2, 3, 100 * MIB, 1, 500, 110, True)
SMOKE_MODE = Mode("smoke", 1, 1, 4 * MIB, 1, 100, 90, False)


# --------------------------------------------------------------------------------------------
# leaf certificates, in this process


def leaf_rows(count: int) -> list[tuple[str, str, str, str, str]]:
    """The leaf part: COUNT new leaves and COUNT cached lookups, p50 and p99."""
    from aproxy.intercept.ca import load_or_create
    from aproxy.intercept.leaves import LeafContexts

    base = tempfile.mkdtemp(prefix="aproxy-intercept-bench-leaf-")
    try:
        ca = load_or_create(os.path.join(base, "ca"))
        leaves = LeafContexts(ca, size=count + 1)
        names = [f"host{i}.example.com" for i in range(count)]
        new, cached = [], []
        for name in names:
            t0 = time.perf_counter()
            leaves.context_for(name)
            new.append(time.perf_counter() - t0)
        for name in names:
            t0 = time.perf_counter()
            leaves.context_for(name)
            cached.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def figure(samples: list[float]) -> str:
        p99 = statistics.quantiles(samples, n=100)[98] * 1e3
        p50 = median(samples) * 1e3
        return f"{len(samples):,} leaves: p50 {p50:.3f} ms, p99 {p99:.3f} ms"

    ok = median(new) * 1e3 <= 1.0
    part = "leaf certificates (in-process LeafContexts)"
    return [
        (part, "new leaf (sign + TLS context)", figure(new), "", met("p50 <= 1 ms", ok)),
        (part, "leaf already made (LRU)", figure(cached), "", ""),
    ]


# --------------------------------------------------------------------------------------------
# the clients (run in forked worker processes)


@dataclass(frozen=True)
class Way:
    """How a client reaches the origin: directly, or through a CONNECT proxy."""

    name: str
    origin_port: int
    proxy_port: int | None  # None: direct
    cafile: str  # what the client trusts: the origin CA, or the proxy's

    def context(self) -> ssl.SSLContext:
        """The client's TLS context (HTTP/1.1 by ALPN, as a browser would offer it)."""
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def open(self, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        """A TLS connection to the origin, through the proxy's CONNECT tunnel if any."""
        port = self.proxy_port or self.origin_port
        raw = socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy_port is not None:
                authority = f"{LOOPBACK}:{self.origin_port}"
                raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:  # nothing follows until the client speaks
                    data = raw.recv(4096)
                    if not data:
                        raise ConnectionError("the proxy closed during CONNECT")
                    head += data
                status = head.split(b"\r\n", 1)[0]
                if b" 200" not in status:
                    raise ConnectionError(f"CONNECT answered {status!r}")
            return ctx.wrap_socket(raw, server_hostname=LOOPBACK)
        except BaseException:
            raw.close()
            raise


def request(path: str, close: bool, origin_port: int) -> bytes:
    """A GET of C{path} as the client sends it inside the tunnel."""
    extra = "Connection: close\r\n" if close else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{origin_port}\r\n"
        f"User-Agent: aproxy-intercept-bench\r\n{extra}\r\n"
    ).encode()


def read_response(sock: ssl.SSLSocket, sink: bytearray | None = None) -> int:
    """
    Read one response with a Content-Length body (no pipelining: nothing follows it); the
    body's length. With C{sink}, large bodies are read into it and dropped.
    """
    head = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a response")
        head += data
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            break
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"answer {head.splitlines()[0]!r}")
    length = -1
    for line in head[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length < 0:
        raise ConnectionError("no Content-Length")
    got = len(head) - end - 4
    if sink is not None:
        view = memoryview(sink)
        while got < length:
            n = sock.recv_into(view)
            if not n:
                raise ConnectionError("closed in the body")
            got += n
    while got < length:
        data = sock.recv(length - got)
        if not data:
            raise ConnectionError("closed in the body")
        got += len(data)
    return length


def client_run(way: Way, kind: str, start_at: float, seconds: float) -> dict[str, Any]:
    """
    One client process's share of part a (C{kind} "keepalive": one connection, opened
    before C{start_at}, then GETs until C{start_at + seconds}) or b ("connect": a new
    connection per GET). Counts only what finished in the window.
    """
    ctx = way.context()
    get = request("/small", kind == "connect", way.origin_port)
    done = errors = 0
    first_error = ""
    sock = way.open(ctx) if kind == "keepalive" else None
    time.sleep(max(0.0, start_at - time.monotonic()))
    deadline = start_at + seconds
    while time.monotonic() < deadline:
        try:
            if kind == "keepalive":
                assert sock is not None
                sock.sendall(get)
                read_response(sock)
            else:
                with way.open(ctx) as s:
                    s.sendall(get)
                    read_response(s)
            done += 1
        except (OSError, ConnectionError) as e:
            errors += 1
            first_error = first_error or repr(e)
            if kind == "keepalive":
                break
    if sock is not None:
        sock.close()
    return {"done": done, "errors": errors, "first_error": first_error}


def client_signals() -> None:
    """In a client process: the default signal handlers (not the run's abort handler)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run stops the pool


def download(way: Way, path: str, size: int) -> float:
    """One download of C{path} on a new connection: MB/s (10^6 B/s) from request to end."""
    sink = bytearray(1 << 20)
    with way.open(way.context()) as sock:
        t0 = time.perf_counter()
        sock.sendall(request(path, False, way.origin_port))
        got = read_response(sock, sink)
        seconds = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{way.name}: {path} is {got} bytes, not {size}")
    return size / seconds / 1e6


# --------------------------------------------------------------------------------------------
# the fallback origin (run as a child: intercept_bench.py --origin PORT DIR CERT KEY)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with keep-alive, no logging."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def serve_origin(port: int, directory: str, cert: str, key: str) -> None:
    """A threaded Python TLS origin serving C{directory} (when nginx is not installed)."""

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handler(*a: Any) -> _Handler:
        return _Handler(*a, directory=directory)

    server = Server((LOOPBACK, port), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


# --------------------------------------------------------------------------------------------
# the run


class InterceptBench(IssueBench):
    """One run: the temp dir, the origin and proxies started, the rows and problems."""

    title = "aproxy TLS interception benchmark"
    columns = ("part", "target", "figure", "ratio", "goal")
    prefix = "aproxy-intercept-bench-"

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        super().__init__(args, mode)
        self.mode: Mode = mode
        self.origin_ca = self.tmp / "origin-ca.pem"
        self.children: dict[str, Child] = {}
        self.ways: list[Way] = []
        self.big = f"/big{mode.big_bytes // MIB}m"

    # ---- processes

    def start_origin(self) -> None:
        """The origin CA and certificate (trustme), the files, then nginx or Python."""
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.origin_ca))
        leaf = ca.issue_cert(LOOPBACK, "localhost")
        cert, key = self.tmp / "origin-cert.pem", self.tmp / "origin-key.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        for p in (cert, key, self.origin_ca):
            os.chmod(p, 0o644)  # nginx's master reads them as root; loopback-only test keys
        self.data.mkdir()
        os.chmod(self.data, 0o755)
        (self.data / "small").write_bytes(SMALL_BODY)
        block = bytes(range(256)) * 4096  # 1 MiB
        with open(self.data / self.big.lstrip("/"), "wb") as f:
            for _ in range(self.mode.big_bytes // len(block)):
                f.write(block)
        for p in self.data.iterdir():
            os.chmod(p, 0o644)
        self.origin_port = free_port()
        argv = self.nginx_argv("nginx-tls.conf", data=self.data, cert=cert, key=key)
        if argv:
            self.origin_kind = "nginx with TLS (1 worker)"
        else:
            argv = [sys.executable, __file__, "--origin"]
            argv += [str(self.origin_port), str(self.data), str(cert), str(key)]
            self.origin_kind = "threaded Python TLS origin"
        self.commands["origin"] = shlex.join(argv)
        child = Child("origin", argv, logfile=self.tmp / "origin.log", cwd=self.tmp)
        self.children["origin"] = child
        direct = Way("direct", self.origin_port, None, str(self.origin_ca))
        self.wait_ready(child, direct)
        self.ways.append(direct)
        log(f"origin: {self.origin_kind}, pid {child.pid}, {LOOPBACK}:{self.origin_port}")

    def wait_ready(self, child: Child, way: Way, cafile: Path | None = None) -> None:
        """Poll a GET of /small (a tunnel, when proxied) until it answers; fail on exit."""
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )
            if cafile is None or cafile.exists():
                try:
                    with way.open(way.context()) as sock:
                        sock.sendall(request("/small", False, way.origin_port))
                        if read_response(sock) == len(SMALL_BODY):
                            return
                except (OSError, ConnectionError) as e:
                    last = repr(e)
            time.sleep(0.2)
        raise RuntimeError(f"{child.name} not ready after 30 s ({last})")

    def start_intercepting(self) -> None:
        """aproxy intercepting every tunnel, its CA made in a fresh --ca-dir."""
        port = free_port()
        work = self.tmp / "aproxy"
        work.mkdir()
        ca_dir = work / "ca"
        argv = [sys.executable, "-m", "twisted", "aproxy"]
        argv += ["--port", f"tcp:{port}:interface={LOOPBACK}", "--intercept", "*"]
        argv += ["--ca-dir", str(ca_dir), "--ca-file", str(self.origin_ca)]
        argv += ["--connect-ports", "*"]
        env = checkout_env(self.args.checkout)
        self.commands["aproxy"] = shlex.join(argv)
        # Not in the checkout's directory: "python -m" puts the working directory first on
        # sys.path, so a checkout there would be imported instead of the one PYTHONPATH names.
        child = Child("aproxy", argv, logfile=work / "output.log", env=env, cwd=work)
        self.children["aproxy"] = child
        way = Way("aproxy", self.origin_port, port, str(ca_dir / "ca.pem"))
        self.wait_ready(child, way, ca_dir / "ca.pem")
        self.ways.append(way)
        self.versions["aproxy"] = aproxy_version()
        log(f"aproxy: pid {child.pid}, {LOOPBACK}:{port}")

    def start_mitmproxy(self) -> None:
        """mitmdump trusting the origin CA, its own CA made in a fresh confdir."""
        exe = self.args.mitmdump
        if not exe:
            self.problems.append("mitmdump not found (--mitmdump PATH): no mitmproxy rows")
            return
        port = free_port()
        work = self.tmp / "mitmproxy"
        work.mkdir()
        # stream_large_bodies: without it mitmproxy holds a whole body before sending it
        # on, which would make part c measure that rather than its forwarding.
        argv = [exe, "--listen-host", LOOPBACK, "--listen-port", str(port)]
        argv += [
            "--set",
            f"confdir={work}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.origin_ca}",
        ]
        argv += ["--set", "stream_large_bodies=1m", "-q"]
        self.commands["mitmproxy"] = shlex.join(argv)
        self.versions["mitmproxy"] = tool_output([exe, "--version"])
        child = Child("mitmproxy", argv, logfile=work / "output.log", cwd=work)
        self.children["mitmproxy"] = child
        cafile = work / "mitmproxy-ca-cert.pem"
        way = Way("mitmproxy", self.origin_port, port, str(cafile))
        self.wait_ready(child, way, cafile)
        self.ways.append(way)
        log(f"mitmproxy: pid {child.pid}, {LOOPBACK}:{port}")

    # ---- a and b

    def load(self, pool: Any, way: Way, kind: str) -> dict[str, float]:
        """One load run of C{kind} over every client: the sum per second and proxy CPU."""
        n, seconds = self.args.clients, self.mode.seconds
        start_at = time.monotonic() + 1.0  # time to open the keep-alive tunnels first
        child = self.children.get(way.name)
        pid = child.pid if child else self.children["origin"].pid
        results = pool.starmap_async(client_run, [(way, kind, start_at, seconds)] * n)
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = sum(cpu_seconds(pid))
        results.wait(seconds + 0.2)  # stop the clock near the window's end
        cpu = sum(cpu_seconds(pid)) - cpu0
        elapsed = time.monotonic() - start_at
        outs = results.get(seconds + 30)
        done = sum(x["done"] for x in outs)
        errors = sum(x["errors"] for x in outs)
        if errors:
            first = next(x["first_error"] for x in outs if x["first_error"])
            self.problems.append(f"{way.name} {kind}: {errors} errors, e.g. {first}")
        rate = done / seconds
        return {"rate": rate, "cpu_share": cpu / elapsed, "cpu_us": cpu / max(done, 1) * 1e6}

    def rounds(self) -> None:
        """Parts a and b in alternating rounds; their rows."""
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(self.args.clients, initializer=client_signals) as pool:
            for r in range(self.mode.rounds):
                order = self.ways[r % len(self.ways) :] + self.ways[: r % len(self.ways)]
                for kind in ("keepalive", "connect"):
                    for way in order:
                        one = self.load(pool, way, kind)
                        runs.setdefault((kind, way.name), []).append(one)
                        log(
                            f"round {r + 1} {kind} {way.name}: {one['rate']:,.0f}/s, "
                            f"its CPU {one['cpu_share']:.0%}"
                        )
                        self.check_alive()
        n, s, k = self.args.clients, self.mode.seconds, self.mode.rounds
        titles = {
            "keepalive": f"a. intercepted keep-alive GET /small (100 B): {n} client processes, "
            f"1 tunnel each, {s:g} s, median of {k} alternating rounds",
            "connect": f"b. new connection per GET (TCP + CONNECT + TLS + GET + close): "
            f"{n} client processes, {s:g} s, median of {k} alternating rounds",
        }
        units = {"keepalive": "req/s", "connect": "conn/s"}
        goals = {"keepalive": 3.0, "connect": 2.0}
        for kind in ("keepalive", "connect"):
            med = {
                name: {key: median([x[key] for x in xs]) for key in ("rate", "cpu_share", "cpu_us")}
                for (k2, name), xs in runs.items()
                if k2 == kind
            }
            for way in self.ways:
                m = med[way.name]
                figure = f"{m['rate']:,.0f} {units[kind]}"
                who = "origin" if way.name == "direct" else way.name
                figure += f"; {who} CPU {m['cpu_share']:.0%} of a core, {m['cpu_us']:,.0f} µs each"
                ratio = goal = ""
                if way.name != "direct":
                    ratio = f"{m['rate'] / med['direct']['rate']:.2f}x direct"
                if way.name == "aproxy" and "mitmproxy" in med:
                    x = m["rate"] / med["mitmproxy"]["rate"]
                    ratio = f"{x:.2f}x mitmproxy; " + ratio
                    goal = met(f">= {goals[kind]:g}x mitmproxy", x >= goals[kind])
                self.rows.append((titles[kind], way.name, figure, ratio, goal))

    def downloads(self) -> None:
        """Part c: the large file per target, alternating, median of the mode's count."""
        mbps: dict[str, list[float]] = {w.name: [] for w in self.ways}
        for _ in range(self.mode.downloads):
            for way in self.ways:
                mbps[way.name].append(download(way, self.big, self.mode.big_bytes))
            self.check_alive()
        for way in self.ways:
            log(f"download {way.name}: {', '.join(f'{x:,.0f}' for x in mbps[way.name])} MB/s")
        size = f"{self.mode.big_bytes // MIB} MiB"
        title = f"c. one {size} download on a new connection (Python client), median of " + str(
            self.mode.downloads
        )
        med = {name: median(xs) for name, xs in mbps.items()}
        for way in self.ways:
            ratio = goal = ""
            if way.name != "direct":
                ratio = f"{med[way.name] / med['direct']:.2f}x direct"
            if way.name == "aproxy":
                if "mitmproxy" in med:
                    ratio = f"{med['aproxy'] / med['mitmproxy']:.2f}x mitmproxy; " + ratio
                goal = met(">= 300 MB/s", med["aproxy"] >= 300)
            self.rows.append((title, way.name, f"{med[way.name]:,.0f} MB/s", ratio, goal))

    def check_alive(self) -> None:
        """Fail the run if a child exited."""
        for child in self.children.values():
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")

    def run(self) -> None:
        """Every part in turn; a failed part is reported and the others still run."""
        with self.part("leaf certificates"):
            self.rows += leaf_rows(self.args.count or self.mode.leaves)
        self.start_origin()
        self.start_intercepting()
        if self.mode.mitmproxy and not self.args.no_mitmproxy:
            with self.part("mitmproxy start"):
                self.start_mitmproxy()
        with self.part("a/b. keep-alive and new connections"):
            self.rounds()
        with self.part("c. download"):
            self.downloads()

    def intro(self) -> str:
        """The paragraph under the title: machine, origin, how to read the rows."""
        return (
            f"Machine: {machine_line()}. Origin: {self.origin_kind}. Clients, origin and "
            "proxies share the CPUs; compare rows of the same run. A proxy's CPU is its "
            "process tree's (utime + stime) over the window, per request or connection."
        )

    def after_stop(self) -> None:
        """Scan aproxy's log, once it has stopped."""
        log_path = self.tmp / "aproxy" / "output.log"
        if log_path.exists():
            bad = [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if "Traceback" in line or "Unhandled" in line or "[-] " in line
            ]
            if bad:
                sample = "\n".join(x[:300] for x in bad[:3])
                self.problems.append(f"aproxy logged {len(bad)} error line(s):\n```\n{sample}\n```")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (under 90 s)")
    mode.add_argument(
        "--smoke", action="store_true", help="tiny sizes, no mitmproxy, ~15 s (for the tests)"
    )
    ap.add_argument("--clients", type=int, default=4, help="client processes (4)")
    ap.add_argument("--count", type=int, default=0, help="new leaves to make (2000)")
    ap.add_argument(
        "--checkout", type=Path, default=CHECKOUT, help="the aproxy tree to run (this one)"
    )
    ap.add_argument("--mitmdump", metavar="PATH", help="mitmdump (PATH, /tmp/venv-mitm/bin)")
    ap.add_argument("--no-mitmproxy", action="store_true", help="leave mitmproxy out")
    ap.add_argument("--no-nginx", action="store_true", help="use the Python origin")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--origin", nargs=4, help=argparse.SUPPRESS)  # PORT DIR CERT KEY
    args = ap.parse_args(argv)
    args.checkout = args.checkout.resolve()
    if not (args.checkout / "aproxy").is_dir():
        ap.error(f"--checkout {args.checkout}: no aproxy/ in it")
    args.mitmdump = mitmdump(args.mitmdump)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every part and print the report: 0 when all ran, 1 if one failed, 130 on abort."""
    args = parse_args(argv)
    if args.origin:
        port, directory, cert, key = args.origin
        serve_origin(int(port), directory, cert, key)
        return 0
    mode = SMOKE_MODE if args.smoke else QUICK if args.quick else FULL
    return run_main(InterceptBench(args, mode))


if __name__ == "__main__":
    sys.exit(main())
