"""
Measure what one abusive client costs the others (issue #12, items 2 and 5).

Runs an aproxy ProxyFactory and a tiny origin in this process, on 127.0.0.1 only, with
blocking clients in plain threads, and prints a Markdown table. No real DNS is used:
``socket.getaddrinfo`` (which aproxy's lookups and Twisted's default resolver call) is
replaced in-process by one that answers ``*.victim.test`` with 127.0.0.1 at once and,
for ``*.stall.test``, blocks for ``--stall`` seconds and then fails, as a resolver does
when its DNS server drops the queries.

Scenarios (the attacker connects from 127.0.0.1, the victim from 127.0.0.2):

- ``dns``: the attacker asks for a new ``*.stall.test`` name twice a second, closing each
  connection at once; the victim (valid, already cached credentials) asks for a
  ``*.victim.test`` name every second. Reported: the victim's statuses and latencies.
- ``bcrypt``: the attacker opens 250 connections at once, each with a different wrong
  password for a bcrypt user (cost ``--cost``), and gives up on each after 2 s; the
  victim meanwhile makes requests as in ``dns``. Reported: bcrypt checks run, how many of
  them started after their client had already left, their CPU seconds, and the victim's
  statuses and latencies.

Run it with an interpreter that has Twisted and bcrypt: ``python bench/abuse_auth_dns.py``
measures the checkout it is in; ``--tree DIR`` measures another one (e.g. one made with
``git archive``). It takes about a minute.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import bcrypt

HERE = os.path.dirname(os.path.abspath(__file__))

_real_getaddrinfo = socket.getaddrinfo
STALL = 10.0


def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    """getaddrinfo without DNS: victims at once, stalled names after STALL seconds."""
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name.endswith(".stall.test"):
        time.sleep(STALL)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    if name.endswith(".victim.test"):
        return _real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
    return _real_getaddrinfo(host, port, *args, **kwargs)


class HashLog:
    """Wraps bcrypt.checkpw: counts the checks, their CPU time and who had left."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.cpu = 0.0
        self.departed = 0
        self.left: dict[bytes, float] = {}
        self._checkpw = bcrypt.checkpw

    def checkpw(self, password: bytes, hashed_password: bytes) -> bool:
        """Count one check; note if the client who sent C{password} had already left."""
        with self.lock:
            self.calls += 1
            if password in self.left:
                self.departed += 1
        start = time.thread_time()
        try:
            return bool(self._checkpw(password, hashed_password))
        finally:
            with self.lock:
                self.cpu += time.thread_time() - start


def basic(user: str, password: str) -> bytes:
    """A Proxy-Authorization value."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def request(
    proxy: int, url: bytes, credentials: bytes, source: str, timeout: float
) -> tuple[str, float]:
    """One GET through the proxy: its status (or what went wrong) and its duration."""
    start = time.monotonic()
    try:
        with socket.create_connection(
            ("127.0.0.1", proxy), timeout=timeout, source_address=(source, 0)
        ) as sock:
            sock.sendall(
                b"GET "
                + url
                + b" HTTP/1.1\r\nHost: x\r\nProxy-Authorization: "
                + credentials
                + b"\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while len(data) < 12:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        status = data[9:12].decode() or "closed"
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - start


def victim_loop(
    proxy: int, origin: int, credentials: bytes, stop: threading.Event, out: list[Any]
) -> None:
    """Every second, one request from 127.0.0.2 for a fresh *.victim.test name."""
    i = 0
    while not stop.is_set():
        url = b"http://v%d.victim.test:%d/" % (i, origin)
        out.append(request(proxy, url, credentials, "127.0.0.2", 15.0))
        i += 1
        stop.wait(1.0)


def summary(results: list[tuple[str, float]]) -> str:
    """Statuses and latencies of the victim's requests."""
    if not results:
        return "no requests"
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    times = sorted(t for _, t in results)
    counts = ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items()))
    return f"{counts}; median {statistics.median(times):.2f} s, max {times[-1]:.2f} s"


def dns_attack(proxy: int, origin: int, good: bytes, seconds: float) -> str:
    """The attacker asks for stalled names twice a second; the victim keeps asking."""
    stop = threading.Event()
    victim: list[Any] = []
    t = threading.Thread(target=victim_loop, args=(proxy, origin, good, stop, victim))
    t.start()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", proxy), timeout=5) as sock:
                sock.sendall(
                    b"GET http://a%d.stall.test/ HTTP/1.1\r\nHost: x\r\n" % i
                    + b"Proxy-Authorization: "
                    + good
                    + b"\r\n\r\n"
                )
        except OSError:
            pass
        i += 1
        time.sleep(0.5)
    stop.set()
    t.join()
    return summary(victim)


def bcrypt_attack(
    proxy: int, origin: int, good: bytes, log: HashLog, seconds: float
) -> tuple[str, str]:
    """250 wrong passwords at once from one address; the victim keeps asking."""
    stop = threading.Event()
    victim: list[Any] = []
    t = threading.Thread(target=victim_loop, args=(proxy, origin, good, stop, victim))
    t.start()
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def guess(n: int) -> None:
        password = f"wrong-{n}"
        status, _ = request(
            proxy, b"http://x.victim.test:%d/" % origin, basic("alice", password), "127.0.0.1", 2.0
        )
        with log.lock:
            log.left[password.encode()] = time.monotonic()
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    guessers = [threading.Thread(target=guess, args=(n,)) for n in range(250)]
    for g in guessers:
        g.start()
    for g in guessers:
        g.join()
    time.sleep(max(0.0, seconds - 2.0))
    stop.set()
    t.join()
    answers = ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items()))
    return answers, summary(victim)


def main() -> None:
    """Run both scenarios against the aproxy found on sys.path and print the table."""
    global STALL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall", type=float, default=10.0, help="seconds a stalled lookup takes")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each attack")
    parser.add_argument("--cost", type=int, default=12, help="bcrypt cost of the user's hash")
    parser.add_argument(
        "--tree", default=os.path.dirname(HERE), help="the aproxy checkout to measure"
    )
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    STALL = args.stall
    socket.getaddrinfo = fake_getaddrinfo
    import twisted.internet._resolver as resolver_module

    # Twisted's default resolver bound getaddrinfo when it was imported.
    setattr(resolver_module, "getaddrinfo", fake_getaddrinfo)  # noqa: B010
    log = HashLog()
    setattr(bcrypt, "checkpw", log.checkpw)  # noqa: B010

    from twisted.internet import reactor as global_reactor
    from twisted.internet.protocol import Factory, Protocol

    import aproxy
    from aproxy import ProxyConfig, ProxyFactory

    reactor: Any = global_reactor

    class Origin(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "htpasswd")
    hashed = bcrypt.hashpw(b"alice-secret", bcrypt.gensalt(args.cost)).decode()
    with open(path, "w") as f:
        f.write(f"alice:{hashed}\n")
    config = ProxyConfig(
        auth=path, auth_max_failures=10, max_clients_per_ip=1000, max_connections=4096
    )
    factory = ProxyFactory(config, reactor)
    origin_port = reactor.listenTCP(0, Factory.forProtocol(Origin), interface="127.0.0.1")
    proxy_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    proxy, origin = proxy_port.getHost().port, origin_port.getHost().port
    rows: list[tuple[str, str]] = []
    good = basic("alice", "alice-secret")

    def run() -> None:
        try:
            status, took = request(
                proxy, b"http://warm.victim.test:%d/" % origin, good, "127.0.0.2", 30.0
            )
            rows.append(("warm-up login (victim)", f"{status} in {took:.2f} s"))
            rows.append(("victim, no attack", dns_attack(proxy, origin, good, 0.0)))
            rows.append(("victim under DNS attack", dns_attack(proxy, origin, good, args.seconds)))
            time.sleep(args.stall)
            log.calls = log.departed = 0
            log.cpu = 0.0
            answers, victim = bcrypt_attack(proxy, origin, good, log, args.seconds)
            time.sleep(1.0)
            rows.append(("250 wrong bcrypt passwords: answers", answers))
            rows.append(("  bcrypt checks run", str(log.calls)))
            rows.append(("  of them for clients already gone", str(log.departed)))
            rows.append(("  CPU seconds in bcrypt", f"{log.cpu:.1f}"))
            rows.append(("victim under bcrypt attack", victim))
        finally:
            reactor.callFromThread(reactor.stop)

    threading.Thread(target=run, daemon=True).start()
    reactor.run()
    where = os.path.dirname(os.path.abspath(aproxy.__file__))
    print(
        f"aproxy from {where}; stall {args.stall} s; bcrypt cost {args.cost}; "
        f"{os.cpu_count()} cores\n"
    )
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
