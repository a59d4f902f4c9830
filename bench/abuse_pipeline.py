"""
Issue #12 item 1: what a client that pipelines requests and never reads the answers costs
the proxy in memory.

A small origin serves a 4 KiB body; the client sends N pipelined ``GET`` requests for it
(40,000 by default: about 2 MiB) through the proxy with a 4 KiB receive buffer and reads
nothing. The proxy's resident memory (VmRSS) is printed before, and every second for the
given time after. Without a bound on what may wait for a client, every answer is queued in
the proxy; with one, the proxy stops taking requests once its answers back up, and the
memory stays flat.

Run from the checkout, with an interpreter that has Twisted (loopback only, bounded)::

    python bench/abuse_pipeline.py                    # aproxy from this checkout
    python bench/abuse_pipeline.py --proxy-cmd 'squid -N -f squid.conf' --proxy-port 3128

The origin and the client are in this process (threads, standard library); aproxy is
started as ``python -m twisted aproxy`` with this checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
BODY = b"x" * 4096
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve_origin(listener: socket.socket, stop: threading.Event) -> None:
    """Answer every request head on every connection with the 4 KiB response."""

    def connection(conn: socket.socket) -> None:
        buffered = b""
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffered += data
                count = buffered.count(b"\r\n\r\n")
                if count:
                    buffered = buffered[buffered.rfind(b"\r\n\r\n") + 4 :]
                    try:
                        conn.sendall(RESPONSE * count)
                    except OSError:
                        return

    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=connection, args=(conn,), daemon=True).start()


def rss_kib(pid: int) -> int:
    """The resident memory of process C{pid}, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_listening(port: int, seconds: float) -> None:
    """Wait (bounded) until something accepts connections on 127.0.0.1:C{port}."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def main() -> None:
    """Run the measurement and print one line per second."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch")
    parser.add_argument("--proxy-cmd", help="another proxy to measure (default: aproxy)")
    parser.add_argument("--proxy-port", type=int, help="the port --proxy-cmd listens on")
    args = parser.parse_args()

    stop = threading.Event()
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen(128)
    origin_port = origin.getsockname()[1]
    threading.Thread(target=serve_origin, args=(origin, stop), daemon=True).start()

    if args.proxy_cmd:
        port = args.proxy_port
        argv = shlex.split(args.proxy_cmd)
    else:
        port = free_port()
        argv = [sys.executable, "-m", "twisted", "aproxy", "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(CHECKOUT))
    proxy = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(port, 15)
        time.sleep(1)
        before = rss_kib(proxy.pid)
        print(f"proxy RSS before: {before / 1024:.1f} MiB")
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.setblocking(False)
        request = b"GET http://127.0.0.1:%d/4k HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (
            origin_port,
            origin_port,
        )
        payload = memoryview(request * args.requests)
        sent = 0
        start = time.monotonic()
        next_report = start + 1
        peak = before
        while time.monotonic() - start < args.seconds:
            if sent < len(payload):
                try:
                    sent += client.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    pass
            now = time.monotonic()
            if now >= next_report:
                rss = rss_kib(proxy.pid)
                peak = max(peak, rss)
                print(
                    f"{now - start:4.0f} s: sent {sent / 1024:7.0f} KiB of "
                    f"{len(payload) / 1024:.0f}, proxy RSS {rss / 1024:6.1f} MiB"
                )
                next_report += 1
            time.sleep(0.005)
        after = rss_kib(proxy.pid)
        print(
            f"proxy RSS: {before / 1024:.1f} -> {after / 1024:.1f} MiB "
            f"(peak {max(peak, after) / 1024:.1f}); client sent {sent / 1024:.0f} KiB "
            f"of {len(payload) / 1024:.0f}"
        )
        client.close()
    finally:
        stop.set()
        origin.close()
        os.killpg(proxy.pid, signal.SIGTERM)
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
