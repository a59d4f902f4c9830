#!/usr/bin/env python3
"""
aproxy's own benchmark: aproxy side by side with a direct connection to the same origin,
and with squid, tinyproxy and proxy.py when they are installed.

Starts a local origin on 127.0.0.1 (nginx from a config rendered into a temp dir when nginx
is installed, else a small asyncio origin written into that temp dir) serving C{/100b} and a
large file, then each proxy target in turn (C{--targets}: aproxy, aproxy with C{--workers 2},
squid, tinyproxy, proxy.py; configs rendered into the temp dir) on a free loopback port,
afresh for each phase, and measures through each:

  - requests/s and p50/p99 latency for 100-byte keep-alive responses (wrk, 1 thread,
    50 connections, absolute-form targets through the proxy; a Python load client when wrk
    is missing), and proxy CPU seconds per 10k requests (/proc/PID/stat);
  - the same with C{Connection: close} on every request;
  - the keep-alive and Connection: close loads again in a few rounds with every target
    running, taking the targets in turn, and per target the medians of its rounds: on a
    shared machine these are the figures to compare targets by, since a slow spell hits
    all of them alike;
  - MB/s for a 100 MiB plain forwarded download (curl -x, median of 3), the same through a
    CONNECT tunnel (curl -p -x; aproxy runs with --connect-ports set to the origin's port),
    and a 100 MiB plain forwarded upload (POST body, curl --data-binary) to a small Python
    sink that reads the whole body before it answers;
  - RSS per idle keep-alive connection with 1000 of them held;
  - RSS growth while a slow client (64 KiB receive buffer, ~1 MB/s) reads the 100 MiB body.

Prints one Markdown report on standard output, a table with a row per target (progress goes
to standard error). Only the Python 3.11 standard library is used; wrk, nginx and curl are
used when present. Every child process runs in its own process group and is killed at the
end, also on Ctrl-C or errors. A peer's failure is reported but does not fail the run.

Usage: python bench/run.py [--quick] [--smoke] [--targets A,B,...] [--aproxy-cmd CMD] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import operator
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

CHECKOUT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
HZ = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
SMALL_BODY = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes
CONNECT_PARALLEL = 64
IO_TIMEOUT = 10.0

# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    """How long and how big each scenario is (full run, --quick or --smoke)."""

    name: str
    wrk_seconds: float
    big_bytes: int
    downloads: int
    idle_conns: int
    slow_seconds: float
    slow_rate: int
    max_seconds: int  # time budget for direct and one proxy target
    per_target_seconds: int  # added to the budget for each further proxy target
    rounds: int  # alternating keep-alive rounds over all targets (see Bench.run_rounds)
    round_seconds: float


FULL = Settings("full", 10, 100 * MIB, 3, 1000, 5, 1_000_000, 1200, 360, 5, 5)
QUICK = Settings("quick", 3, 100 * MIB, 1, 1000, 3, 1_000_000, 400, 180, 3, 3)
SMOKE = Settings("smoke", 1, 1 * MIB, 1, 20, 1, 1_000_000, 90, 30, 1, 1)

# A load run in which more than this share of all CPUs was busy with work not charged to the
# client, the origin or the proxy was disturbed by other work (quiet runs: under 10%).
DISTURBED_SHARE = 0.2

# A large transfer slower than this is not repeated (proxy.py forwards a 100 MiB body at
# about 6 MB/s, 17 s a run): its median is then of one run, and the report says so.
SLOW_TRANSFER_SECONDS = 12.0

# --------------------------------------------------------------------------------------------
# targets

# aproxy targets and their --workers count.
APROXY_TARGETS = {"aproxy": 1, "aproxy-w2": 2}
# Comparison proxies, run when installed; their failures do not fail the run.
PEERS = ("squid", "tinyproxy", "proxypy")
TARGETS = ("direct", *APROXY_TARGETS, *PEERS)
# Where bench/../shared/bench's setup.sh puts proxy.py's venv.
BENCH_VENVS = Path(os.environ.get("BENCH_VENVS") or "/tmp/bench-venvs")

# --------------------------------------------------------------------------------------------
# logging and aborts


def log(message: str) -> None:
    """Write one progress line to standard error."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Abort(BaseException):
    """Raised from a signal handler (SIGTERM, time budget) to unwind and clean up."""


def _raise_abort(signum: int, _frame: Any) -> None:
    """Signal handler: turn SIGTERM, SIGHUP or SIGALRM into an L{Abort}."""
    reason = "time budget exceeded" if signum == signal.SIGALRM else f"signal {signum}"
    raise Abort(reason)


# --------------------------------------------------------------------------------------------
# child processes


class Child:
    """A process started in its own process group; L{stop} kills that whole group."""

    registry: ClassVar[list[Child]] = []

    def __init__(
        self,
        name: str,
        argv: list[str],
        logfile: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        out: Any = subprocess.PIPE
        self._log = None
        if logfile is not None:
            self._log = open(logfile, "wb")  # closed in stop()
            out = self._log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if logfile is not None else subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            text=logfile is None,
        )
        self.pid = self.proc.pid
        Child.registry.append(self)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running after SIGTERM; SIGKILL to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in Child.registry:
            Child.registry.remove(self)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the child's log file, for error messages."""
        if self.logfile is None or not self.logfile.exists():
            return ""
        text = self.logfile.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    @classmethod
    def stop_all(cls) -> None:
        """Stop every child still registered (newest first)."""
        for child in reversed(list(cls.registry)):
            try:
                child.stop(timeout=3)
            except Exception as e:  # keep stopping the others
                log(f"stopping {child.name} failed: {e!r}")


def run_bounded(
    name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool in its own process group, killed after C{timeout} seconds."""
    child = Child(name, argv, env=env)
    try:
        out, err = child.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.stop(timeout=1)
        raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from None
    finally:
        if child.alive() or child in Child.registry:
            child.stop(timeout=1)
    return subprocess.CompletedProcess(argv, child.proc.returncode, out or "", err or "")


def tool_output(argv: list[str]) -> str:
    """First line of a tool's version output (stdout or stderr), or an empty string."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return text[0] if text else ""


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that is free right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# /proc accounting (summed over a process and its descendants)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def proc_tree(root: int) -> list[int]:
    """C{root} and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, i = [root], 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out


def cpu_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process tree, reaped children included."""
    user = system = 0
    for pid in proc_tree(root):
        f = _stat_fields(pid)
        if f:  # from field 3: utime=11, stime=12, cutime=13, cstime=14
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user / HZ, system / HZ


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / HZ


def _own_and_children_cpu() -> float:
    """CPU seconds of this process and its reaped children (wrk, curl): the load client."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def settle(root: int, seconds: float = 10.0) -> None:
    """
    Wait (bounded) until the process tree's RSS stops changing: a proxy with worker
    processes answers as soon as one worker runs, while the others may still be starting,
    and their growth would otherwise be charged to the first scenario measured.
    """
    deadline = time.monotonic() + seconds
    last = rss_kib(root)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(root)
        if abs(now - last) < 256:
            return
        last = now


def rss_kib(root: int) -> int:
    """VmRSS of the process tree from /proc/PID/status, in KiB."""
    total = 0
    for pid in proc_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples a process tree's RSS in a thread while in use; C{peak} afterwards (KiB)."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.peak = rss_kib(root)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """Sampling loop."""
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.root))


# --------------------------------------------------------------------------------------------
# small HTTP helpers


def parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """Status, Content-Length (or None) and whether C{Connection: close} was sent."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    close = lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, close


def request_bytes(
    target: str, host: str, close: bool = False, agent: str = "aproxy-bench"
) -> bytes:
    """An HTTP/1.1 GET request head."""
    extra = "Connection: close\r\n" if close else ""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n{extra}\r\n".encode()


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head from C{s}: (head without the blank line, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise OSError(f"connection closed before a full response head ({buf[:80]!r})")
        buf += data
        if len(buf) > 1 << 20:
            raise OSError("response head larger than 1 MiB")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _open_tunnel(s: socket.socket, authority: str) -> None:
    """Send C{CONNECT authority} on C{s} and read the proxy's answer; raise unless 200."""
    s.sendall(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        "User-Agent: aproxy-bench\r\n\r\n".encode()
    )
    head, rest = _read_head(s)
    status = int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1])
    if status != 200 or rest:
        raise OSError(f"CONNECT {authority} answered {status} ({len(rest)} extra bytes)")


def http_fetch(
    port: int, target: str, host: str, timeout: float = 5.0, tunnel: bool = False
) -> tuple[int, int]:
    """
    One GET with C{Connection: close}: (status, body bytes read). Raises OSError. With
    C{tunnel}, first C{CONNECT host} through the proxy at C{port}, then GET C{target}
    (origin form) inside the tunnel.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.settimeout(timeout)
        if tunnel:
            _open_tunnel(s, host)
        s.sendall(request_bytes(target, host, close=True, agent="aproxy-bench-probe"))
        head, body = _read_head(s)
        status, length, _ = parse_head(head)
        got = len(body)
        while length is None or got < length:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        return status, got


def http_post_file(
    port: int, target: str, host: str, path: Path, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One POST of the file at C{path} (Content-Length, sendfile): (status, response body)."""
    size = path.stat().st_size
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: aproxy-bench-upload\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
        )
        with open(path, "rb") as f:
            s.sendfile(f)
        head, body = _read_head(s)
        status, length, _ = parse_head(head)
        while length is None or len(body) < length:
            data = s.recv(65536)
            if not data:
                break
            body += data
        return status, body


@dataclass(frozen=True)
class Target:
    """Where a client connects and what it asks for: direct (origin) or through aproxy."""

    name: str
    port: int
    origin_port: int
    via_proxy: bool

    @property
    def host(self) -> str:
        """The Host header: always the origin."""
        return f"{LOOPBACK}:{self.origin_port}"

    def target(self, path: str) -> str:
        """Request target: absolute form through the proxy, origin form directly."""
        return f"http://{self.host}{path}" if self.via_proxy else path


# --------------------------------------------------------------------------------------------
# files rendered into the temp dir

NGINX_CONF = """\
# aproxy benchmark origin, rendered by bench/run.py.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{
    worker_connections 8192;
    use epoll;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server_tokens off;
    etag off;
    default_type application/octet-stream;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy_temp;
    fastcgi_temp_path {work}/fastcgi_temp;
    uwsgi_temp_path {work}/uwsgi_temp;
    scgi_temp_path {work}/scgi_temp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {data};
        location / {{
            try_files $uri =404;
        }}
    }}
}}
"""

FALLBACK_ORIGIN = '''\
"""Fallback benchmark origin (no nginx): serves the files of one directory over HTTP/1.1."""

import asyncio
import os
import sys


async def handle(reader, writer, root):
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            lines = head.split(b"\\r\\n")
            method, target, version = lines[0].split(b" ", 2)
            close = version == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"connection":
                    close = b"close" in value.lower()
            if target.startswith(b"http://"):
                target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
            name = target.decode("ascii", "replace").lstrip("/")
            path = os.path.join(root, name)
            conn = b"Connection: close\\r\\n" if close else b""
            if "/" in name or not name or not os.path.isfile(path):
                writer.write(
                    b"HTTP/1.1 404 Not Found\\r\\nContent-Length: 0\\r\\n" + conn + b"\\r\\n"
                )
            else:
                size = os.path.getsize(path)
                writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/octet-stream\\r\\n"
                             b"Content-Length: %d\\r\\n%s\\r\\n" % (size, conn))
                if method != b"HEAD":
                    with open(path, "rb") as f:
                        if size > 65536:
                            await writer.drain()
                            await loop.sendfile(writer.transport, f)
                        else:
                            writer.write(f.read())
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    port, root = int(sys.argv[1]), sys.argv[2]
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, root), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
'''

SINK_ORIGIN = '''\
"""Upload sink for the aproxy benchmark: reads every request body to its end, discards it.

Answers each request (after its whole body: Content-Length or chunked) with 200 and the
number of body bytes received, in decimal, as the response body. A thread per connection,
recv_into a 1 MiB buffer: the kernel copy is the only per-byte cost.
"""

import socket
import sys
import threading


def read_line(conn, rest):
    while b"\\r\\n" not in rest:
        data = conn.recv(65536)
        if not data or len(rest) > 65536:
            raise OSError("connection closed or line too long")
        rest += data
    line, _, rest = rest.partition(b"\\r\\n")
    return line, rest


def read_exact(conn, rest, n, view):
    if len(rest) >= n:
        return rest[n:]
    left = n - len(rest)
    while left:
        k = conn.recv_into(view, min(left, len(view)))
        if not k:
            raise OSError("connection closed inside a body")
        left -= k
    return b""


def read_chunked(conn, rest, view):
    total = 0
    while True:
        line, rest = read_line(conn, rest)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while True:
                line, rest = read_line(conn, rest)
                if not line:
                    return total, rest
        rest = read_exact(conn, rest, size, view)
        total += size
        line, rest = read_line(conn, rest)


def serve(conn):
    view = memoryview(bytearray(1 << 20))
    rest = b""
    try:
        while True:
            while b"\\r\\n\\r\\n" not in rest:
                data = conn.recv(65536)
                if not data or len(rest) > 65536:
                    return
                rest += data
            head, _, rest = rest.partition(b"\\r\\n\\r\\n")
            lines = head.split(b"\\r\\n")
            close = lines[0].endswith(b"HTTP/1.0")
            length, chunked, expect = 0, False, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value
                elif name == b"connection":
                    close = b"close" in value
                elif name == b"expect":
                    expect = value == b"100-continue"
            if expect:
                conn.sendall(b"HTTP/1.1 100 Continue\\r\\n\\r\\n")
            if chunked:
                got, rest = read_chunked(conn, rest, view)
            else:
                rest, got = read_exact(conn, rest, length, view), length
            body = str(got).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n"
                b"%s\\r\\n%s" % (len(body), b"Connection: close\\r\\n" if close else b"", body)
            )
            if close:
                return
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def main():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(60)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
'''

WRK_LUA = """\
-- aproxy benchmark: one fixed request (absolute-form target through the proxy), JSON summary.
-- Environment: APB_TARGET (request target), APB_HOST (Host), APB_CLOSE ("1": Connection:
-- close), APB_DELAY_MS (a pause before each request on a connection: a paced load),
-- APB_OUT (file for the summary written by done()).
wrk.method = "GET"
wrk.path = os.getenv("APB_TARGET")
wrk.headers["Host"] = os.getenv("APB_HOST")
wrk.headers["User-Agent"] = "aproxy-bench-wrk"
if os.getenv("APB_CLOSE") == "1" then
   wrk.headers["Connection"] = "close"
end
local pause = tonumber(os.getenv("APB_DELAY_MS") or "0")
if pause > 0 then
   function delay()
      return pause
   end
end

function done(summary, latency, requests)
   local out = io.open(os.getenv("APB_OUT"), "w")
   local e = summary.errors
   out:write(string.format(
      '{"duration_us": %d, "requests": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
      '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
      summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
   out:close()
end
"""

# squid as a plain forwarder: no cache in memory or on disk (no cache_dir), nothing sent off
# the machine (no DNS server but 127.0.0.1, no ICP/HTCP, no ICMP pinger), logs in its temp
# dir. CONNECT may reach any port (no SSL_ports rule): the tunnel scenario targets the
# origin's plain-HTTP port. squid waits shutdown_lifetime before it exits on SIGTERM.
SQUID_CONF = """\
# squid for the aproxy benchmark, rendered by bench/run.py; run as squid -N -f THIS_FILE.
http_port {listen}
acl bench_clients src 127.0.0.1/32 ::1
http_access allow bench_clients
http_access deny all
cache deny all
cache_mem 0 MB
maximum_object_size_in_memory 0 KB
memory_pools off
dns_nameservers 127.0.0.1
visible_hostname localhost
icp_port 0
htcp_port 0
pinger_enable off
max_filedescriptors 16384
client_persistent_connections on
server_persistent_connections on
shutdown_lifetime 1 seconds
access_log none
cache_store_log none
logfile_rotate 0
cache_log {work}/cache.log
pid_filename {work}/squid.pid
coredump_dir {work}
"""

# tinyproxy: loopback only, no Via/X-Tinyproxy headers, CONNECT to any port (no ConnectPort
# lines), quiet. It closes the client connection after every response.
TINYPROXY_CONF = """\
# tinyproxy for the aproxy benchmark, rendered by bench/run.py; run as tinyproxy -d -c THIS_FILE.
Port {port}
Listen {host}
BindSame no
Timeout 600
MaxClients 4096
Allow 127.0.0.1
Allow ::1
DisableViaHeader Yes
XTinyproxy No
LogLevel Critical
PidFile "{work}/tinyproxy.pid"
"""

# --------------------------------------------------------------------------------------------
# load generation


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
        str(tmp / "proxy.lua"),
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
    client0 = _own_and_children_cpu()
    busy0, wall0 = machine_busy_seconds(), time.monotonic()
    if args.wrk:
        r = wrk_load(t, path, close, s, args, tmp, delay_ms)
    elif delay_ms:
        raise RuntimeError("the paced load needs wrk")
    else:
        r = python_load(t, path, close, s, args)
    cpu1 = cpu_seconds(measured_pid)
    busy, wall = machine_busy_seconds() - busy0, time.monotonic() - wall0
    client = _own_and_children_cpu() - client0
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


# --------------------------------------------------------------------------------------------
# profiling (optional)


def _function(frame: str) -> str:
    """C{'f (pkg/mod.py:12)'} -> C{'f (pkg/mod.py)'}: py-spy frames grouped by function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _is_ours(frame: str) -> bool:
    """Whether a py-spy frame is in aproxy's own code."""
    return "(aproxy/" in frame or "/aproxy/" in frame


def summarize_profile(raw: Path, top: int = 12) -> list[str]:
    """Markdown lines from a py-spy raw (collapsed stacks) file: where the time goes."""
    leaf: Counter[str] = Counter()
    own_self: Counter[str] = Counter()
    own_incl: Counter[str] = Counter()
    calls_out: Counter[str] = Counter()  # library leaf <- deepest aproxy line above it
    total = own_total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        top_frame = _function(frames[-1])
        if not _is_ours(frames[-1]) and len(frames) > 1:
            top_frame += f" <- {_function(frames[-2]).split(' (')[0]}"
        leaf[top_frame] += count
        ours = [f for f in frames if _is_ours(f)]
        for f in {_function(f) for f in ours}:
            own_incl[f] += count
        if _is_ours(frames[-1]):
            own_self[_function(frames[-1])] += count
            own_total += count
        elif ours:
            calls_out[f"{_function(frames[-1])} <- {ours[-1]}"] += count
    if not total:
        return ["(py-spy recorded no samples)"]

    def listing(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"- {100 * c / total:5.1f}%  {f}" for f, c in counter.most_common(top)]
        return ["", title, "", *rows]

    lines = [
        f"{total} samples; {100 * own_total / total:.1f}% with aproxy's own code on top of "
        "the stack (percentages are of all samples)."
    ]
    lines += listing("Hottest functions, self time (all code; library ones with caller):", leaf)
    lines += listing("aproxy functions, self time:", own_self)
    lines += listing("aproxy functions, inclusive (with everything they call):", own_incl)
    lines += listing("Library/kernel time by the aproxy line that called into it:", calls_out)
    return lines


def find_py_spy() -> str | None:
    """py-spy on PATH or next to the running interpreter."""
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


# --------------------------------------------------------------------------------------------
# the run


class Bench:
    """Owns the temp dir, the origin, the proxies under test, the results and the report."""

    def __init__(
        self, args: argparse.Namespace, s: Settings, targets: list[str], skipped: dict[str, str]
    ) -> None:
        self.args = args
        self.s = s
        self.targets = targets
        self.skipped = skipped
        self.tmp = Path(tempfile.mkdtemp(prefix="aproxy-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers and squid may run as another user
        self.results: dict[str, dict[str, Any]] = {name: {} for name in targets}
        self.problems: list[str] = []
        self.failures: list[str] = []  # direct and aproxy: these make the exit status 1
        self.peer_failures: list[str] = []  # squid, tinyproxy, proxy.py: reported only
        self.commands: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.target_versions: dict[str, str] = {}
        self.origin: Child | None = None
        self.origin_kind = ""
        self.origin_port = 0
        self.sink: Child | None = None
        self.sink_port = 0
        self.data = self.tmp / "data"
        self.big_path = f"/{s.big_bytes // MIB}m" if s.big_bytes >= MIB else "/big"
        self.profile_lines: list[str] = []
        self.disturbed: list[str] = []  # load runs with a large unattributed CPU share

    def fail(self, who: str, text: str) -> None:
        """Record a failure: a peer's is reported, aproxy's and direct's fail the run."""
        (self.peer_failures if who in PEERS else self.failures).append(text)
        log(f"FAILED: {text}")

    # ---- setup

    def write_files(self) -> Path:
        """The origin's files and the wrk script, in the temp dir."""
        data = self.data
        data.mkdir()
        os.chmod(data, 0o755)
        (data / "100b").write_bytes(SMALL_BODY)
        block = bytes(range(256)) * 4096  # 1 MiB
        with open(data / self.big_path.lstrip("/"), "wb") as f:
            left = self.s.big_bytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        for p in data.iterdir():
            os.chmod(p, 0o644)
        (self.tmp / "proxy.lua").write_text(WRK_LUA)
        return data

    def start_origin(self) -> None:
        """nginx from a rendered config when available, else the asyncio fallback origin."""
        data = self.write_files()
        self.origin_port = free_port()
        nginx = None if self.args.no_nginx else shutil.which("nginx") or _sbin("nginx")
        if nginx:
            work = self.tmp / "nginx"
            work.mkdir()
            conf = work / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, port=self.origin_port, data=data))
            argv = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
            self.origin_kind = "nginx (1 worker)"
            self.versions["nginx"] = tool_output([nginx, "-v"])
        else:
            script = self.tmp / "origin.py"
            script.write_text(FALLBACK_ORIGIN)
            argv = [sys.executable, str(script), str(self.origin_port), str(data)]
            self.origin_kind = "Python asyncio fallback origin (nginx not used)"
        self.commands["origin"] = shlex.join(argv)
        self.origin = Child("origin", argv, logfile=self.tmp / "origin.log", cwd=self.tmp)
        direct = Target("direct", self.origin_port, self.origin_port, False)
        self.wait_ready(self.origin, direct, 15)
        log(f"origin: {self.origin_kind}, pid {self.origin.pid}, {LOOPBACK}:{self.origin_port}")

    def start_sink(self) -> None:
        """
        The upload sink (a small threaded Python server): it answers only after the whole
        body, with its length. nginx's C{return 204} answers at once and discards the body
        afterwards, so the answer would overtake the body through a proxy.
        """
        script = self.tmp / "sink.py"
        script.write_text(SINK_ORIGIN)
        self.sink_port = free_port()
        argv = [sys.executable, str(script), str(self.sink_port)]
        self.commands["upload sink"] = shlex.join(argv)
        self.sink = Child("sink", argv, logfile=self.tmp / "sink.log", cwd=self.tmp)
        self.wait_ready(self.sink, Target("sink", self.sink_port, self.sink_port, False), 15)
        log(f"upload sink: pid {self.sink.pid}, {LOOPBACK}:{self.sink_port}")

    def wait_ready(self, child: Child, t: Target, timeout: float) -> None:
        """Poll a GET of /100b until it answers 200; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                status, _ = http_fetch(t.port, t.target("/100b"), t.host, timeout=2)
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s ({last})")

    def aproxy_argv(self, port: int, workers: int = 1) -> tuple[list[str], dict[str, str]]:
        """The aproxy command line and environment for one start on C{port}."""
        env = dict(os.environ)
        listen = f"tcp:{port}:interface={LOOPBACK}"
        # --connect-ports: the tunnel download's target. --max-clients-per-ip: every client
        # here comes from 127.0.0.1, and the default per-address limit (256) would refuse
        # most of the 1000 idle connections.
        extra = {
            "--connect-ports": str(self.origin_port),
            "--max-clients-per-ip": "100000",
        }
        if workers > 1:
            extra["--workers"] = str(workers)
        if self.args.aproxy_cmd:
            text = self.args.aproxy_cmd
            argv = shlex.split(text.replace("{port}", str(port)))
            if "{port}" not in text:
                argv += ["--port", listen]
            for option, value in extra.items():
                if option not in text:
                    argv += [option, value]
            return argv, env
        if (CHECKOUT / "aproxy" / "__init__.py").exists():
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p
            )
        argv = [sys.executable, "-m", "twisted", "aproxy", "--port", listen]
        for option, value in extra.items():
            argv += [option, value]
        return argv, env

    def proxy_argv(self, name: str, port: int, work: Path) -> tuple[list[str], dict[str, str]]:
        """
        The command line and environment of proxy target C{name} listening on
        127.0.0.1:C{port}; a peer's config is rendered into C{work} first.
        """
        if name in APROXY_TARGETS:
            return self.aproxy_argv(port, APROXY_TARGETS[name])
        exe = find_peer(name, self.args)
        if exe is None:
            raise RuntimeError(f"{name} is not installed")
        env = dict(os.environ)
        if name == "squid":
            conf = work / "squid.conf"
            conf.write_text(SQUID_CONF.format(listen=f"{LOOPBACK}:{port}", work=work))
            os.chmod(conf, 0o644)
            return [exe, "-N", "-f", str(conf)], env
        if name == "tinyproxy":
            conf = work / "tinyproxy.conf"
            conf.write_text(TINYPROXY_CONF.format(port=port, host=LOOPBACK, work=work))
            return [exe, "-d", "-c", str(conf)], env
        # proxy.py keeps its data (certificates, cache) under ~/.proxy: use the temp dir.
        env["HOME"] = str(work)
        return [exe, "--hostname", LOOPBACK, "--port", str(port), "--log-level", "WARNING"], env

    @contextlib.contextmanager
    def proxy(self, name: str, phase: str) -> Iterator[tuple[Child, Target]]:
        """A fresh process of proxy target C{name} for one phase, stopped afterwards."""
        port = free_port()
        work = self.tmp / name / phase
        work.mkdir(parents=True)
        os.chmod(work, 0o777)  # squid, started as root, runs as its own user
        argv, env = self.proxy_argv(name, port, work)
        self.commands[name] = shlex.join(argv)  # the last phase's (the load phase)
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        t = Target(name, port, self.origin_port, True)
        ready = False
        try:
            self.wait_ready(child, t, 30)
            settle(child.pid)
            ready = True
            log(f"{name} ({phase}): pid {child.pid}, {LOOPBACK}:{port}")
            yield child, t
        finally:
            alive = child.alive()
            child.stop()
            if not ready:
                pass  # wait_ready's exception says why
            elif not alive:
                self.problems.append(
                    f"{name} exited during the {phase} phase (status "
                    f"{child.proc.returncode}); log tail:\n```\n{child.log_tail()}\n```"
                )
            elif name in APROXY_TARGETS:
                self.scan_log(child, phase)

    def scan_log(self, child: Child, phase: str) -> None:
        """Report tracebacks and error-level lines from an aproxy log."""
        if child.logfile is None or not child.logfile.exists():
            return
        text = child.logfile.read_text(errors="replace")
        bad = [
            line
            for line in text.splitlines()
            if "Traceback" in line
            or '"isError": 1' in line
            or '"name": "error"' in line
            or '"name": "critical"' in line
        ]
        if bad:
            sample = "\n".join(x[:400] for x in bad[:5])
            self.problems.append(
                f"{child.name} logged {len(bad)} error line(s) in the {phase} phase, e.g.:\n"
                f"```\n{sample}\n```"
            )

    # ---- scenarios

    def scenario(self, who: str, key: str, fn: Callable[[], Any]) -> Any:
        """Run one scenario; an exception is recorded as a failure, not raised."""
        log(f"{who}: {key} ...")
        try:
            r = fn()
        except Exception as e:  # every failure is reported, the run goes on
            self.results[who][key] = {"error": str(e)}
            self.fail(who, f"{who} {key}: {e}")
            return None
        self.results[who][key] = r
        log(f"{who}: {key}: {_brief(r)}")
        self.check_health(who, key, r)
        return r

    def check_health(self, who: str, key: str, r: Any) -> None:
        """Note errors and non-2xx answers seen by a load run, and runs disturbed by others."""
        if not isinstance(r, dict):
            return
        noise = r.get("unattributed")
        if isinstance(noise, float) and noise > DISTURBED_SHARE:
            self.disturbed.append(f"{who} {key}")
            self.problems.append(
                f"{who} {key}: {noise:.0%} of all CPUs were busy with work not charged to the "
                "client, the origin or the proxy: other work on the machine disturbed this run"
            )
        errs, bad = r.get("socket_errors", 0), r.get("non_2xx", 0)
        if errs or bad:
            self.problems.append(
                f"{who} {key}: {errs} socket errors {r.get('errors_detail')}, {bad} non-2xx "
                f"answers ({r.get('non_2xx_note')}) out of {r.get('requests')} requests"
            )
        if who != "direct" and r.get("eof") and key == "slow_reader":
            self.problems.append(f"{who} slow_reader: the connection ended before the body did")

    def probe(self, child: Child, t: Target, after: str) -> None:
        """After a scenario: does the proxy still answer promptly? A stall is a problem."""
        t0 = time.monotonic()
        try:
            status, n = http_fetch(t.port, t.target("/100b"), t.host, timeout=5)
            if status != 200 or n != len(SMALL_BODY):
                self.problems.append(
                    f"{t.name} after {after}: probe got status {status}, {n} bytes"
                )
        except OSError as e:
            self.problems.append(
                f"{t.name} after {after}: no answer to a GET of /100b within 5 s ({e!r}); "
                f"alive={child.alive()}"
            )
            return
        if time.monotonic() - t0 > 1:
            self.problems.append(
                f"{t.name} after {after}: probe took {time.monotonic() - t0:.1f} s"
            )

    def transfers(self, one: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """
        Median MB/s over C{s.downloads} large transfers (downloads or uploads); one only
        when the first took longer than L{SLOW_TRANSFER_SECONDS}.
        """
        runs = [one()]
        while len(runs) < self.s.downloads and runs[0]["seconds"] <= SLOW_TRANSFER_SECONDS:
            runs.append(one())
        return {
            "cmd": runs[0]["cmd"],
            "mbps": statistics.median(r["mbps"] for r in runs),
            "runs": len(runs),
            "runs_mbps": [round(r["mbps"], 1) for r in runs],
            "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
        }

    def upload_file(self) -> Path:
        """The file POSTed by the upload scenario: the origin's large file."""
        return self.data / self.big_path.lstrip("/")

    def run_direct(self) -> None:
        """Every scenario against the origin itself (memory and CPU are the origin's)."""
        assert self.origin is not None
        pid, s, a = self.origin.pid, self.s, self.args
        t = Target("direct", self.origin_port, self.origin_port, False)
        self.results["direct"]["rss_start_mib"] = rss_kib(pid) / 1024
        self.scenario("direct", "idle", lambda: idle_conns(t, pid, s))
        self.scenario("direct", "slow_reader", lambda: slow_reader(t, self.big_path, pid, s))
        self.scenario("direct", "ka", lambda: load(t, "/100b", False, pid, s, a, self.tmp))
        if a.wrk:
            self.scenario(
                "direct",
                "paced",
                lambda: load(t, "/100b", False, pid, s, a, self.tmp, None, PACE_DELAY_MS),
            )
        self.scenario("direct", "close", lambda: load(t, "/100b", True, pid, s, a, self.tmp))
        big, size = self.big_path, s.big_bytes
        self.scenario(
            "direct", "download", lambda: self.transfers(lambda: download(t, big, size, pid, a))
        )
        if self.sink is not None:
            sink, f = self.sink.pid, self.upload_file()
            up = Target("direct", self.sink_port, self.sink_port, False)
            self.scenario(
                "direct", "upload", lambda: self.transfers(lambda: upload(up, f, size, sink, a))
            )

    def run_proxy(self, name: str) -> None:
        """Every scenario through proxy target C{name}, a fresh process for each phase."""
        s, a = self.s, self.args

        def idle(child: Child, t: Target) -> None:
            self.results[name]["rss_start_mib"] = rss_kib(child.pid) / 1024
            self.scenario(name, "idle", lambda: idle_conns(t, child.pid, s))
            self.probe(child, t, "the idle-connections scenario")

        def slow(child: Child, t: Target) -> None:
            self.scenario(name, "slow_reader", lambda: slow_reader(t, self.big_path, child.pid, s))
            self.probe(child, t, "the slow-reader scenario")

        def loads(child: Child, t: Target) -> None:
            pid = child.pid
            o = self.origin.pid if self.origin else None
            self.scenario(name, "ka", lambda: load(t, "/100b", False, pid, s, a, self.tmp, o))
            self.probe(child, t, "the keep-alive load")
            if a.wrk:
                self.scenario(
                    name,
                    "paced",
                    lambda: load(t, "/100b", False, pid, s, a, self.tmp, o, PACE_DELAY_MS),
                )
                self.probe(child, t, "the paced keep-alive load")
            if a.profile and name == "aproxy":
                self.profile(child, t)
            self.scenario(name, "close", lambda: load(t, "/100b", True, pid, s, a, self.tmp, o))
            self.probe(child, t, "the Connection: close load")
            big, size = self.big_path, s.big_bytes
            self.scenario(
                name, "download", lambda: self.transfers(lambda: download(t, big, size, pid, a))
            )
            self.probe(child, t, "the downloads")
            self.scenario(
                name,
                "tunnel",
                lambda: self.transfers(lambda: download(t, big, size, pid, a, tunnel=True)),
            )
            self.probe(child, t, "the CONNECT tunnel downloads")
            if self.sink is not None:
                f = self.upload_file()
                up = dataclasses.replace(t, origin_port=self.sink_port)
                self.scenario(
                    name, "upload", lambda: self.transfers(lambda: upload(up, f, size, pid, a))
                )
                self.probe(child, t, "the uploads")

        for phase, body in (("idle", idle), ("slow", slow), ("load", loads)):
            try:
                with self.proxy(name, phase) as (child, t):
                    body(child, t)
            except Exception as e:  # the other phases still run
                for key in PHASE_KEYS[phase]:  # what the phase did not get to: "failed"
                    self.results[name].setdefault(key, {"error": f"{phase} phase: {e}"})
                self.fail(name, f"{name} {phase} phase: {e}")

    def profile(self, child: Child, t: Target) -> None:
        """py-spy record during an extra keep-alive load run; summary into the report."""
        py_spy = find_py_spy()
        if not py_spy:
            self.problems.append("--profile: py-spy not found (pip install py-spy)")
            return
        out = Path(self.args.profile).resolve()
        seconds = max(self.s.wrk_seconds, 2)
        argv = [py_spy, "record", "--format", "raw", "-r", "200", "-o", str(out)]
        if self.args.profile_mode == "nonblocking":
            argv.insert(2, "--nonblocking")
        argv += ["-d", f"{seconds:g}", "-p", str(child.pid)]
        self.commands["profile"] = shlex.join(argv)
        log(f"profiling: {shlex.join(argv)}")
        spy = Child("py-spy", argv, logfile=self.tmp / "py-spy.log")
        try:
            time.sleep(0.5)
            s = Settings(**{**self.s.__dict__, "wrk_seconds": seconds})
            self.scenario(
                "aproxy",
                "ka_profiled",
                lambda: load(
                    t,
                    "/100b",
                    False,
                    child.pid,
                    s,
                    self.args,
                    self.tmp,
                    self.origin.pid if self.origin else None,
                ),
            )
            spy.proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            self.problems.append("py-spy did not finish in time")
        finally:
            spy.stop()
        if out.exists():
            self.profile_lines = summarize_profile(out)
        else:
            self.problems.append(f"py-spy wrote no profile: {spy.log_tail()}")

    def collect_versions(self) -> None:
        """Python, Twisted, aproxy, the peers', wrk's and curl's versions."""
        self.versions["Python (bench)"] = platform.python_version()
        aproxy_version = "unknown (--aproxy-cmd: not queried)"
        if not self.args.aproxy_cmd:
            _, env = self.aproxy_argv(0)
            code = (
                "import platform, twisted, aproxy; print('aproxy', aproxy.__version__,"
                " '/ Python', platform.python_version(), '/ Twisted', twisted.__version__,"
                " '/ from', aproxy.__file__)"
            )
            try:
                p = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=30,
                )
                aproxy_version = (p.stdout or p.stderr).strip().splitlines()[-1]
            except (OSError, subprocess.TimeoutExpired, IndexError) as e:
                aproxy_version = f"unknown ({e!r})"
            self.versions["aproxy side"] = aproxy_version
        if not self.args.aproxy_cmd and (CHECKOUT / ".git").exists():
            git = tool_output(["git", "-C", str(CHECKOUT), "describe", "--always", "--dirty"])
            if git:
                self.versions["aproxy checkout"] = f"{CHECKOUT} at {git}"
        for name in self.targets:
            if name in APROXY_TARGETS:
                self.target_versions[name] = aproxy_version.split(" / from ")[0]
            elif name in PEERS:
                self.target_versions[name] = peer_version(name, self.args)
        if self.args.wrk:
            self.versions["wrk"] = tool_output([self.args.wrk, "--version"])
        if self.args.curl:
            self.versions["curl"] = tool_output([self.args.curl, "--version"])

    def run(self) -> None:
        """Origin, then every scenario for each target in turn."""
        self.collect_versions()
        self.start_origin()
        self.target_versions["direct"] = self.versions.get("nginx") or self.origin_kind
        try:
            self.start_sink()
        except Exception as e:  # the other scenarios still run
            self.failures.append(f"upload sink: {e}")
            log(f"upload sink FAILED: {e}")
        for name in self.targets:
            if name == "direct":
                self.run_direct()
            else:
                self.run_proxy(name)
        if self.args.wrk and self.s.rounds:
            self.run_rounds()

    def run_rounds(self) -> None:
        """
        The keep-alive and the Connection: close loads once more, in C{s.rounds} rounds
        that take every target in turn (each round starting one target later), with all
        proxies running; per target the medians of its rounds. A slow spell of a shared
        machine then lands on every target alike instead of on whichever one was being
        measured, so these medians are the figures to compare targets by (the single runs
        above are each target alone).
        """
        s, a = self.s, self.args
        settings = dataclasses.replace(s, wrk_seconds=s.round_seconds)
        origin = self.origin.pid if self.origin else None
        loads = (("rounds", False, "keep-alive"), ("rounds_close", True, "Connection: close"))
        with contextlib.ExitStack() as stack:
            live: list[tuple[str, Target, int, int | None]] = []
            for name in self.targets:
                if name == "direct":
                    if origin is not None:
                        t = Target("direct", self.origin_port, self.origin_port, False)
                        live.append((name, t, origin, None))
                    continue
                try:
                    child, t = stack.enter_context(self.proxy(name, "rounds"))
                except Exception as e:  # the others still run
                    for key, _, _ in loads:
                        self.results[name][key] = {"error": f"rounds phase: {e}"}
                    self.fail(name, f"{name} rounds phase: {e}")
                    continue
                live.append((name, t, child.pid, origin))
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in range(s.rounds):
                k = r % len(live) if live else 0
                for name, t, pid, o in live[k:] + live[:k]:
                    for key, close, what in loads:
                        log(f"{name}: {what} round {r + 1} of {s.rounds} ...")
                        try:
                            result = load(t, "/100b", close, pid, settings, a, self.tmp, o)
                        except Exception as e:  # that target's rounds are incomplete
                            self.results[name][key] = {"error": f"round {r + 1}: {e}"}
                            self.fail(name, f"{name} {what} round {r + 1}: {e}")
                            continue
                        self.check_health(name, f"{what} round {r + 1}", result)
                        runs.setdefault((name, key), []).append(result)
        for (name, key), results in runs.items():
            if key in self.results[name]:
                continue  # failed in some round
            summary: dict[str, Any] = {"rounds": len(results)}
            for field in ("rps", "p50_ms", "p99_ms", "cpu_per_10k"):
                each = [float(x[field]) for x in results if x.get(field) is not None]
                if each:
                    summary[field] = statistics.median(each)
                    summary[f"{field}_each"] = [round(x, 2) for x in each]
            self.results[name][key] = summary
            log(f"{name}: {key}: {_brief(summary)}")

    def cleanup(self) -> None:
        """Stop every child and remove the temp dir (unless --keep-tmp)."""
        Child.stop_all()
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- report

    def report(self) -> str:
        """The Markdown report."""
        s = self.s
        big = size_label(s.big_bytes)
        commands = {name: self.commands.get(name, "") for name in self.targets}
        commands["direct"] = ""
        lines = [
            f"# aproxy benchmark ({s.name} run, {time.strftime('%Y-%m-%d %H:%M:%S')})",
            "",
            f"Machine: {machine_line()}. Client (wrk, curl, this script), origin and proxy share "
            "the CPUs, nothing is pinned; all traffic on 127.0.0.1.",
            "",
            *table_lines(self.targets, self.results, s, self.target_versions, commands),
            "",
            "Rows: direct = client straight to the origin "
            f"({self.origin_kind}; its memory and CPU figures are the origin's own, its upload "
            "RSS the upload sink's); every other row is that proxy's process tree (RSS and CPU "
            "summed over the started process and its descendants), started afresh for each "
            "phase (idle connections; slow reader; load runs and transfers). "
            '"failed": the scenario failed (see Problems); "-": not measured. '
            "In aproxy rows, (N.NNx) is aproxy / squid from this run (for CPU and KiB per "
            "connection lower is better). The alternating rounds come last: every target "
            f"running at once and measured in turn, {s.rounds} rounds of {s.round_seconds:g} s "
            "keep-alive then Connection: close, "
            "each round starting one target later; their medians are the fairest comparison "
            "on a shared machine (a slow spell hits every target alike). "
            "A transfer slower than "
            f"{SLOW_TRANSFER_SECONDS:g} s is not repeated, marked (1 run).",
            "",
            *detail_lines(self, big),
        ]
        if self.disturbed:
            lines += [
                "",
                f"**Disturbed**: in {len(self.disturbed)} load run(s) "
                f"({', '.join(self.disturbed)}) over {DISTURBED_SHARE:.0%} of the machine's CPU "
                "went to other work, so those figures, and ratios between rows, are not "
                "reliable: rerun on an idle machine.",
            ]
        goals = [line for name in self.targets for line in goal_lines(name, self.results, s)]
        if goals:
            lines += ["", "## Targets (aproxy)", "", *goals]
            if s.big_bytes < 100 * MIB:
                lines.append(
                    f"- (the transfer targets are about a 100 MiB body; this run moved {big}, "
                    "so its MB/s are mostly connection setup)"
                )
        lines += ["", "## Machine and versions", ""]
        lines.append(f"- machine: {machine_line()}")
        lines += [f"- {k}: {v}" for k, v in self.versions.items()]
        lines += [f"- {k}: {v}" for k, v in self.target_versions.items() if k in PEERS]
        if self.skipped:
            lines += ["", "## Targets not run", ""]
            lines += [f"- {name}: {why}" for name, why in self.skipped.items()]
        lines += ["", "## Command lines", ""]
        for name in ("origin", "upload sink", *self.targets, "profile"):
            if self.commands.get(name):
                lines.append(f"- {name}: `{self.commands[name]}`")
        if any(name in PEERS for name in self.targets):
            lines.append(
                "- peers' configs (rendered into the temp dir, kept with --keep-tmp): squid: "
                "no cache (cache deny all, cache_mem 0, no cache_dir), http_port 127.0.0.1:PORT, "
                "access from 127.0.0.1 only, no access log; tinyproxy: Listen 127.0.0.1, Allow "
                "127.0.0.1, no Via header, LogLevel Critical; proxy.py: its defaults (threadless, "
                "one acceptor process per CPU), HOME in the temp dir"
            )
        # Client commands: direct's and the first proxy's; the other proxies' differ only
        # in the proxy port (the one in their command line).
        shown = [who for who in self.targets if who == "direct"]
        shown += [who for who in self.targets if who != "direct"][:1]
        for who in shown:
            for key in ("ka", "paced", "close", "download", "tunnel", "upload"):
                v = self.results[who].get(key)
                if isinstance(v, dict) and "cmd" in v:
                    lines.append(f"- {who} {key}: `{v['cmd']}`")
        others = [who for who in self.targets if who not in shown]
        if others:
            lines.append(
                f"- {', '.join(others)}: the same client commands as {shown[-1]}'s, with that "
                "proxy's port"
            )
        lines.append(
            "- idle connections and slow reader: built-in clients (this script), "
            f"GET http://{LOOPBACK}:{self.origin_port}/100b and {self.big_path}"
        )
        if self.profile_lines:
            lines += ["", "## Profile (aproxy under the keep-alive load)", ""]
            lines += self.profile_lines
        lines += ["", "## Problems", ""]
        if not self.failures and not self.peer_failures and not self.problems:
            lines.append("None seen.")
        lines += [f"- FAILED: {f}" for f in self.failures]
        lines += [
            f"- FAILED (a peer; does not change the exit status): {f}" for f in self.peer_failures
        ]
        lines += [f"- {x}" for x in self.problems]
        return "\n".join(lines) + "\n"


# phase -> the result keys it fills (marked "failed" when the phase fails before them)
PHASE_KEYS = {
    "idle": ("rss_start_mib", "idle"),
    "slow": ("slow_reader",),
    "load": ("ka", "paced", "close", "download", "tunnel", "upload"),
}

# The paced keep-alive load: each of wrk's connections pauses this long before each
# request, so every proxy gets about the same modest rate (at most connections * 1000 /
# PACE_DELAY_MS requests/s; 5,000 with 50 connections) and the latencies compare the work
# per request rather than how each proxy queues at its own saturation point, which is what
# the unpaced run measures (a faster proxy answers more requests there, each waiting
# behind more).
PACE_DELAY_MS = 10

# --------------------------------------------------------------------------------------------
# the report's pieces (plain functions of the results, so the tests can render fakes)


def size_label(n: int) -> str:
    """C{100 MiB} or C{512 B}."""
    return f"{n // MIB} MiB" if n >= MIB else f"{n} B"


def machine_line() -> str:
    """CPU count and model, architecture, kernel."""
    return (
        f"{os.cpu_count()} CPUs ({_cpu_model()}, {platform.machine()}), Linux {platform.release()}"
    )


def value(r: dict[str, Any], key: str, field: str) -> float | None:
    """A figure from one target's results, or None when missing or failed."""
    v = r.get(key)
    if isinstance(v, dict) and "error" not in v:
        x = v.get(field)
        return float(x) if isinstance(x, int | float) else None
    if key == field and isinstance(v, int | float):
        return float(v)
    return None


def failed(r: dict[str, Any], key: str) -> bool:
    """Whether a scenario of one target failed."""
    v = r.get(key)
    return isinstance(v, dict) and "error" in v


def cell(r: dict[str, Any], key: str, field: str, fmt: str, vs: dict[str, Any] | None) -> str:
    """One figure, formatted; C{failed} or C{-}; with C{vs} (squid's results) a ratio."""
    if failed(r, key):
        return "failed"
    x = value(r, key, field)
    if x is None:
        return "-"
    text = format(x, fmt)
    y = value(vs, key, field) if vs is not None else None
    return f"{text} ({x / y:.2f}x)" if x is not None and y else text


def load_cell(r: dict[str, Any], key: str, vs: dict[str, Any] | None) -> str:
    """Requests/s of a load run, with wrk's socket errors and non-2xx answers when any."""
    text = cell(r, key, "rps", ",.0f", vs)
    v = r.get(key)
    if isinstance(v, dict) and "error" not in v:
        notes = []
        if v.get("socket_errors"):
            notes.append(f"{v['socket_errors']:,} sock err")
        if v.get("non_2xx"):
            notes.append(f"{v['non_2xx']:,} non-2xx")
        if notes:
            text += f" [{', '.join(notes)}]"
    return text


def latency_cell(r: dict[str, Any], key: str) -> str:
    """C{p50 / p99} in ms."""
    if failed(r, key):
        return "failed"
    p50, p99 = value(r, key, "p50_ms"), value(r, key, "p99_ms")
    return "-" if p50 is None or p99 is None else f"{p50:.2f} / {p99:.2f}"


def paced_cell(r: dict[str, Any], vs: dict[str, Any] | None) -> str:
    """The paced load: requests/s and C{p50 / p99}, with the p99 ratio to squid's."""
    if failed(r, "paced"):
        return "failed"
    rps = value(r, "paced", "rps")
    if rps is None:
        return "-"
    text = f"{rps:,.0f}, {latency_cell(r, 'paced')}"
    p99, theirs = value(r, "paced", "p99_ms"), value(vs, "paced", "p99_ms") if vs else None
    if p99 is not None and theirs:
        text += f" ({p99 / theirs:.2f}x)"
    return text


def rounds_cell(r: dict[str, Any], key: str, vs: dict[str, Any] | None) -> str:
    """
    Alternating rounds (C{key}: C{rounds}, keep-alive, or C{rounds_close}): median
    requests/s and median C{p50 / p99}, with the ratios to squid's medians (requests/s,
    then p99).
    """
    if failed(r, key):
        return "failed"
    rps = value(r, key, "rps")
    if rps is None:
        return "-"
    text = f"{rps:,.0f}"
    theirs = value(vs, key, "rps") if vs else None
    if theirs:
        text += f" ({rps / theirs:.2f}x)"
    text += f", {latency_cell(r, key)}"
    p99, theirs = value(r, key, "p99_ms"), value(vs, key, "p99_ms") if vs else None
    if p99 is not None and theirs:
        text += f" ({p99 / theirs:.2f}x)"
    return text


def transfer_cell(r: dict[str, Any], key: str, s: Settings, vs: dict[str, Any] | None) -> str:
    """MB/s of the large transfers, noting a single run where the mode asks for more."""
    text = cell(r, key, "mbps", ",.0f", vs)
    v = r.get(key)
    if isinstance(v, dict) and v.get("runs", s.downloads) < s.downloads:
        text += f" ({v['runs']} run)"
    return text


def table_lines(
    names: list[str],
    results: dict[str, dict[str, Any]],
    s: Settings,
    versions: dict[str, str],
    commands: dict[str, str],
) -> list[str]:
    """The report's table: a row per target (direct, aproxy, peers), a column per figure."""
    big = size_label(s.big_bytes)
    squid = results.get("squid")
    if squid is not None and value(squid, "ka", "rps") is None:
        squid = None  # no ratios against a squid that did not run
    headers = [
        "target",
        "100 B keep-alive: req/s",
        "keep-alive p50 / p99, ms",
        "keep-alive CPU s / 10k req",
        "paced keep-alive: req/s, p50 / p99 ms",
        f"keep-alive, {s.rounds} alternating rounds: req/s, p50 / p99 ms (medians)",
        f"Connection: close, {s.rounds} alternating rounds: req/s, p50 / p99 ms (medians)",
        "100 B Connection: close: req/s",
        "close p50 / p99, ms",
        "close CPU s / 10k req",
        f"{big} plain download, MB/s",
        f"{big} CONNECT tunnel download, MB/s",
        f"{big} upload (POST body), MB/s",
        "transfer peak RSS growth, MiB (plain / tunnel / upload)",
        "RSS at start, MiB",
        f"idle keep-alive conns held (of {s.idle_conns})",
        "RSS per idle conn, KiB",
        f"slow reader: RSS growth, MiB (MB read in {s.slow_seconds:g} s)",
        "version",
        "command",
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 3) + "---|---|",
    ]
    for name in names:
        r = results.get(name, {})
        vs = squid if name in APROXY_TARGETS else None
        growth = " / ".join(
            cell(r, key, "rss_growth_mib", ".1f", None) for key in ("download", "tunnel", "upload")
        )
        slow = cell(r, "slow_reader", "growth_mib", ".2f", None)
        got = value(r, "slow_reader", "bytes")
        if got is not None:
            slow += f" ({got / 1e6:.1f})"
        command = commands.get(name, "")
        row = [
            name,
            load_cell(r, "ka", vs),
            latency_cell(r, "ka"),
            cell(r, "ka", "cpu_per_10k", ".3f", vs),
            paced_cell(r, vs),
            rounds_cell(r, "rounds", vs),
            rounds_cell(r, "rounds_close", vs),
            load_cell(r, "close", vs),
            latency_cell(r, "close"),
            cell(r, "close", "cpu_per_10k", ".3f", vs),
            transfer_cell(r, "download", s, vs),
            "n/a (no proxy)" if name == "direct" else transfer_cell(r, "tunnel", s, vs),
            transfer_cell(r, "upload", s, vs),
            growth,
            cell(r, "rss_start_mib", "rss_start_mib", ".1f", None),
            cell(r, "idle", "held", ".0f", None),
            cell(r, "idle", "kib_per_conn", ".2f", vs),
            slow,
            versions.get(name, "-"),
            f"`{command}`" if command else "- (no proxy)" if name == "direct" else "-",
        ]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in row) + " |")
    return lines


def goal_lines(name: str, results: dict[str, dict[str, Any]], s: Settings) -> list[str]:
    """The project's targets for an aproxy row: each with its figure and met / NOT met."""
    if name not in APROXY_TARGETS:
        return []
    r = results.get(name, {})
    big = size_label(s.big_bytes)
    one = " through one aproxy process" if APROXY_TARGETS[name] == 1 else ""
    goals: list[tuple[str, str, str, str, Callable[[float], bool]]] = [
        (f"100 B keep-alive >= 15,000 requests/s{one}", "ka", "rps", ",.0f", lambda x: x >= 15000),
        (
            "RSS per idle keep-alive connection <= 4 KiB",
            "idle",
            "kib_per_conn",
            ".2f",
            lambda x: x <= 4,
        ),
        ("slow-reader RSS growth < 2 MiB", "slow_reader", "growth_mib", ".2f", lambda x: x < 2),
        (f"{big} plain download >= 1,000 MB/s", "download", "mbps", ",.0f", lambda x: x >= 1000),
        (
            f"{big} CONNECT tunnel download >= 1,000 MB/s",
            "tunnel",
            "mbps",
            ",.0f",
            lambda x: x >= 1000,
        ),
        (
            f"{big} upload (plain forwarded POST body) >= 1,000 MB/s",
            "upload",
            "mbps",
            ",.0f",
            lambda x: x >= 1000,
        ),
    ]
    squid = results.get("squid", {})
    for key, what in (("rounds", "keep-alive"), ("rounds_close", "Connection: close")):
        theirs = value(squid, key, "rps")
        if theirs is not None:
            goals.append(
                (
                    f"{what} requests/s >= squid's, median of {s.rounds} alternating rounds "
                    f"({theirs:,.0f})",
                    key,
                    "rps",
                    ",.0f",
                    functools.partial(operator.le, theirs),  # theirs <= x
                )
            )
    for key, what in (
        ("ka", "keep-alive"),
        ("paced", "paced keep-alive"),
        ("rounds", f"keep-alive (median of {s.rounds} alternating rounds)"),
    ):
        theirs = value(squid, key, "p99_ms")
        if theirs is not None:
            goals.append(
                (
                    f"{what} p99 <= squid's ({theirs:.2f} ms, same run)",
                    key,
                    "p99_ms",
                    ".2f",
                    functools.partial(operator.ge, theirs),  # theirs >= x
                )
            )
    lines = []
    for text, key, field, fmt, ok in goals:
        x = value(r, key, field)
        if failed(r, key):
            lines.append(f"- {name}: {text}: failed (NOT met)")
        elif x is not None:
            lines.append(f"- {name}: {text}: {format(x, fmt)} ({'met' if ok(x) else 'NOT met'})")
    return lines


def detail_lines(bench: Bench, big: str) -> list[str]:
    """How the load ran: tool and settings, and per target the CPU share and machine noise."""
    a, s = bench.args, bench.s
    load_tool = "wrk" if a.wrk else "built-in asyncio load client (wrk not found)"
    lines = [
        f"Load: {load_tool}, {a.threads} thread(s), {a.connections} connections, "
        f"{s.wrk_seconds:g} s per run, absolute-form target through proxies; CPU from "
        "/proc/PID/stat utime+stime before/after, per 10k requests. Transfers: curl, median of "
        f"{s.downloads}, MB/s = 10^6 B/s; the CONNECT tunnel goes to the origin's port (aproxy "
        "runs with --connect-ports set to it), then a GET inside the tunnel (curl -p -x); the "
        f"upload POSTs the {big} file to a Python sink that reads the whole body before it "
        "answers with its byte count (checked). Idle connections: opened 64 at a time, one "
        "keep-alive request each, RSS before opening vs. while all are held. Slow reader: "
        "64 KiB SO_RCVBUF, peak RSS during the read minus RSS before.",
        "",
        "CPU of the load runs (keep-alive; close): share in the kernel, machine busy (% of all "
        "CPUs), and unattributed (not charged to the client, origin or proxy: other processes "
        "and kernel work; a large value means the run was disturbed):",
        "",
    ]
    for name in bench.targets:
        r = bench.results.get(name, {})
        parts = []
        for key in ("ka", "close"):
            share, busy = value(r, key, "cpu_sys_share"), value(r, key, "machine_busy")
            noise = value(r, key, "unattributed")
            if share is None or busy is None or noise is None:
                parts.append("-")
            else:
                parts.append(f"{share:.0%} kernel, {busy:.0%} busy, {noise:.0%} unattributed")
        lines.append(f"- {name}: {parts[0]}; {parts[1]}")
    return lines


def _brief(r: Any) -> str:
    """A one-line summary of a scenario result for the progress log."""
    if not isinstance(r, dict):
        return str(r)
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_per_10k",
        "cpu_sys_share",
        "socket_errors",
        "non_2xx",
        "mbps",
        "held",
        "kib_per_conn",
        "growth_mib",
        "bytes",
    )
    parts = []
    for k in keys:
        if k in r and r[k] is not None:
            v = r[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _sbin(name: str) -> str | None:
    """A tool in /usr/sbin or /sbin when PATH lacks those."""
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def find_peer(name: str, args: argparse.Namespace) -> str | None:
    """
    The executable of comparison proxy C{name}, or None when it is not installed: the
    C{--squid}/C{--tinyproxy}/C{--proxypy} option when given, else squid and tinyproxy on
    C{PATH} or in /usr/sbin, and proxy.py in BENCH_VENVS/proxypy (default /tmp/bench-venvs).
    """
    given = getattr(args, name, None)
    if given:
        return shutil.which(given)
    if name == "proxypy":
        return shutil.which(str(BENCH_VENVS / "proxypy" / "bin" / "proxy"))
    return shutil.which(name) or _sbin(name)


def peer_where(name: str, args: argparse.Namespace) -> str:
    """Where L{find_peer} looked, for the report's "not installed" line."""
    given = getattr(args, name, None)
    if given:
        return f"--{name} {given} is not an executable"
    if name == "proxypy":
        return f"no {BENCH_VENVS}/proxypy/bin/proxy (--proxypy PATH, or BENCH_VENVS)"
    return f"no {name} on PATH or in /usr/sbin (--{name} PATH)"


def peer_version(name: str, args: argparse.Namespace) -> str:
    """The first line of a peer's version output (proxy.py's with its venv's Python)."""
    exe = find_peer(name, args)
    if exe is None:
        return "-"
    if name == "squid":
        return tool_output([exe, "-v"]) or "squid (version unknown)"
    if name == "tinyproxy":
        return tool_output([exe, "-v"]) or "tinyproxy (version unknown)"
    text = f"proxy.py {tool_output([exe, '--version']) or '(version unknown)'}"
    python = Path(exe).parent / "python"
    if python.exists():
        text += f" / {tool_output([str(python), '--version'])}"
    return text


def target_list(text: str) -> list[str]:
    """C{--targets}: comma-separated names from L{TARGETS}, in the order given."""
    names: list[str] = []
    for name in (x.strip() for x in text.split(",")):
        if name not in TARGETS:
            raise argparse.ArgumentTypeError(
                f"unknown target {name!r} (choose from {', '.join(TARGETS)})"
            )
        if name not in names:
            names.append(name)
    return names


def select_targets(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """
    The targets to run, and those left out with the reason. Default: direct, aproxy and
    every installed peer; C{--smoke} without C{--targets}: direct and aproxy only. A peer
    that is not installed is left out, never a failure.
    """
    skipped: dict[str, str] = {}
    if args.targets is not None:
        wanted = list(args.targets)
    elif args.smoke:
        wanted = ["direct", "aproxy"]
        for name in PEERS:
            skipped[name] = "not run: --smoke runs direct and aproxy unless --targets names more"
    else:
        wanted = ["direct", "aproxy", *PEERS]
    chosen = []
    for name in wanted:
        if name in PEERS and find_peer(name, args) is None:
            skipped[name] = f"skipped, not installed: {peer_where(name, args)}"
        else:
            chosen.append(name)
    return chosen, skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        description="Benchmark aproxy against a direct connection to a local origin, and "
        "against squid, tinyproxy and proxy.py when they are installed."
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 s load runs, one download")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="every scenario for about a second with tiny sizes (for the test suite)",
    )
    ap.add_argument(
        "--aproxy-cmd",
        help="command that runs aproxy in the foreground; '{port}' is replaced by the port, "
        "else '--port tcp:PORT:interface=127.0.0.1' is appended. The environment is passed "
        "unchanged. Default: sys.executable -m twisted aproxy, with PYTHONPATH=the checkout. "
        "Also used for aproxy-w2 (with --workers 2 appended)",
    )
    ap.add_argument(
        "--targets",
        type=target_list,
        help=f"comma-separated, in this order; from {','.join(TARGETS)} (aproxy-w2: aproxy "
        "--workers 2; proxypy: proxy.py). Default: direct, aproxy and every installed peer; "
        "with --smoke: direct,aproxy",
    )
    for peer, where in (
        ("squid", "PATH or /usr/sbin"),
        ("tinyproxy", "PATH or /usr/sbin"),
        ("proxypy", "$BENCH_VENVS/proxypy/bin/proxy, BENCH_VENVS=/tmp/bench-venvs"),
    ):
        ap.add_argument(f"--{peer}", metavar="PATH", help=f"{peer} executable (default: {where})")
    ap.add_argument("--duration", type=float, help="seconds per load run (overrides the mode)")
    ap.add_argument("--connections", type=int, default=50, help="load connections (50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    ap.add_argument("--idle-conns", type=int, help="idle connections to hold (mode default)")
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load client")
    ap.add_argument("--no-nginx", action="store_true", help="use the built-in Python origin")
    ap.add_argument("--no-curl", action="store_true", help="use the built-in download client")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="also run py-spy record (raw format, to FILE) during an extra keep-alive run",
    )
    ap.add_argument(
        "--profile-mode",
        choices=("nonblocking", "blocking"),
        default="nonblocking",
        help="py-spy sampling: nonblocking (default; less skew towards system calls) or "
        "blocking (consistent stacks, but samples land just after system calls)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument("--max-seconds", type=int, help="abort the whole run after this long")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.curl = None if args.no_curl else shutil.which("curl")
    return args


def settings_for(args: argparse.Namespace, proxies: int = 1) -> Settings:
    """
    The mode's settings with command-line overrides applied; the time budget grows with
    the number of proxy targets beyond the first.
    """
    s = SMOKE if args.smoke else QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.duration:
        changes["wrk_seconds"] = args.duration
    if args.idle_conns:
        changes["idle_conns"] = args.idle_conns
    if args.max_seconds:
        changes["max_seconds"] = args.max_seconds
    elif proxies > 1:
        changes["max_seconds"] = s.max_seconds + s.per_target_seconds * (proxies - 1)
    return Settings(**{**s.__dict__, **changes}) if changes else s


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every scenario ran, 1 if any failed outright, 130 on abort."""
    args = parse_args(argv)
    targets, skipped = select_targets(args)
    s = settings_for(args, sum(1 for name in targets if name != "direct"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _raise_abort)
    signal.alarm(s.max_seconds)
    for name, why in skipped.items():
        log(f"{name}: {why}")
    log(f"targets: {', '.join(targets)}; time budget {s.max_seconds} s")
    bench = Bench(args, s, targets, skipped)
    started = time.monotonic()
    status = 0
    try:
        bench.run()
    except (KeyboardInterrupt, Abort) as e:
        bench.failures.append(f"run aborted: {e!r}")
        status = 130
    except Exception as e:  # report what we have, then fail
        bench.failures.append(f"run stopped: {e}")
        status = 1
    finally:
        signal.alarm(0)
        bench.cleanup()
    log(f"finished in {time.monotonic() - started:.1f} s")
    print(bench.report(), end="")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": s.__dict__,
                    "targets": targets,
                    "skipped": skipped,
                    "results": bench.results,
                    "versions": {**bench.versions, **bench.target_versions},
                    "commands": bench.commands,
                },
                indent=1,
                default=str,
            )
        )
    if status == 0 and bench.failures:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
