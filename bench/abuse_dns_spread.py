"""
Issue #12 item 2, spread over several addresses: can clients asking for names under one
slow domain, from a few addresses at once, starve everyone else's name lookups?

An aproxy and a tiny origin run in this process on 127.0.0.1; C{getaddrinfo} is replaced,
so that names ending in C{.stall.test} take C{--stall} seconds and then fail (a DNS
server that drops their queries) and names ending in C{.victim.test} resolve to
127.0.0.1 at once. Attackers, each from its own loopback address (127.0.0.10 and up),
keep C{--per-address} requests for fresh random names under C{stall.test} going for
C{--seconds}; meanwhile a victim (127.0.0.2) asks once a second for a name that resolves.
Printed: the victim's status and time for each request. No real DNS is asked; every
socket is on the loopback range and every wait is bounded.

Run from the checkout with an interpreter that has Twisted::

    python bench/abuse_dns_spread.py                       # 3 addresses x 4 names, 15 s
    python bench/abuse_dns_spread.py --addresses 13 --per-address 16 --seconds 10
    python bench/abuse_dns_spread.py --tree /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    """Run the attack and print the victim's answers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addresses", type=int, default=3, help="attacking addresses")
    parser.add_argument("--per-address", type=int, default=4, help="requests each keeps going")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the attack runs")
    parser.add_argument("--stall", type=float, default=10.0, help="seconds a slow lookup takes")
    parser.add_argument(
        "--tree", default=os.path.dirname(HERE), help="the aproxy checkout to measure"
    )
    args = parser.parse_args()
    sys.path.insert(0, args.tree)

    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *rest: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".stall.test"):
            time.sleep(args.stall)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name.endswith(".victim.test"):
            return real("127.0.0.1", port, *rest, **kw)
        return real(host, port, *rest, **kw)

    socket.getaddrinfo = fake
    import twisted.internet._resolver as resolver_module
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    resolver_module.getaddrinfo = fake  # type: ignore[attr-defined]

    from aproxy import ProxyConfig, ProxyFactory

    class Origin(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )

    factory = ProxyFactory(ProxyConfig(max_clients_per_ip=1000), reactor)
    origin_port = reactor.listenTCP(0, Factory.forProtocol(Origin), interface="127.0.0.1")
    proxy_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    oport = origin_port.getHost().port
    pport = proxy_port.getHost().port

    def request(url: bytes, source: str, timeout: float = 15.0) -> tuple[str, float]:
        start = time.monotonic()
        try:
            with socket.create_connection(
                ("127.0.0.1", pport), timeout=timeout, source_address=(source, 0)
            ) as s:
                s.sendall(b"GET " + url + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status = s.recv(200)[9:12].decode() or "closed"
        except OSError as e:
            status = type(e).__name__
        return status, time.monotonic() - start

    def run() -> None:
        try:
            print("victim before:", request(b"http://v0.victim.test:%d/" % oport, "127.0.0.2"))
            stop = time.monotonic() + args.seconds

            def attacker(source: str, slot: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    url = b"http://a%s-%d-%d.stall.test/" % (source.encode(), slot, n)
                    request(url, source, timeout=max(0.1, stop - time.monotonic()))
                    n += 1

            for a in range(args.addresses):
                for slot in range(args.per_address):
                    threading.Thread(
                        target=attacker, args=(f"127.0.0.{10 + a}", slot), daemon=True
                    ).start()
            time.sleep(0.5)
            answers = []
            i = 0
            while time.monotonic() < stop:
                i += 1
                answers.append(request(b"http://v%d.victim.test:%d/" % (i, oport), "127.0.0.2"))
                time.sleep(1)
            times = sorted(t for _, t in answers)
            print(
                f"attack: {args.addresses} addresses x {args.per_address} stalled names for "
                f"{args.seconds:.0f} s; victim: {len(answers)} requests, statuses "
                f"{sorted({s for s, _ in answers})}, median {times[len(times) // 2]:.2f} s, "
                f"worst {times[-1]:.2f} s"
            )
        finally:
            reactor.callFromThread(reactor.stop)

    threading.Thread(target=run, daemon=True).start()
    reactor.run()


if __name__ == "__main__":
    main()
