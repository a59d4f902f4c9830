"""
L{UdpRelay}: the UDP relay of one SOCKS5 C{UDP ASSOCIATE} (RFC 1928 section 7), bound for
the life of its TCP control connection.

Nothing a client sends is trusted. The relay takes datagrams from the client's IP address
only (and from its port: the one the request named, or, for C{0.0.0.0:0}, the one the
first datagram came from), drops fragments (C{FRAG} != 0) and malformed headers, and
judges each destination as a C{CONNECT} would be judged: the name rules before any
lookup, C{--udp-ports} as the port rule, the address rules on what a name resolves to,
the loop check. Datagrams go out directly only: a destination that a route sends to a
parent is dropped (a parent can't carry them). Replies are taken only from the
(address, port) pairs the client sent to, and handed back with their header. Lookups
run through the connector's bounded queue, at most L{MAX_LOOKUPS} at once per relay, and
their answers are remembered (L{MAX_NAMES}, L{NAME_TTL}); the peers remembered are
bounded too (L{MAX_PEERS}).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.access.policy import normalize_address
from aproxy.errors import ProxyError
from aproxy.socks.shared import SocksShared
from aproxy.socks.wire import SocksError, datagram_header, parse_datagram
from aproxy.workpool import as_client

__all__ = ["MAX_LOOKUPS", "MAX_NAMES", "MAX_PEERS", "NAME_TTL", "UdpRelay"]

MAX_LOOKUPS = 8
"""Name lookups one relay may have in flight; datagrams needing more are dropped."""
MAX_NAMES = 256
"""Names (and their addresses) one relay remembers."""
NAME_TTL = 60.0
"""Seconds a relay trusts a name's addresses before looking it up again."""
MAX_PEERS = 1024
"""Destinations one relay remembers, and takes replies from (the oldest go first)."""
_CHECKS_PER_TIMEOUT = 10


class UdpRelay(DatagramProtocol):
    """
    The relay of one association (see the module docstring).

    @param session: The control connection (a L{aproxy.socks.protocol.SocksProtocol}).
    @param client_ip: The client's IP address (the control connection's peer).
    @param client_port: The port the request named (0: learn it from the first datagram).
    @param socks: The listener's factory, whose UDP counters this relay adds to.
    @ivar datagrams: Datagrams relayed, both ways.
    @ivar bytes_to_origin: Payload bytes sent to destinations.
    @ivar bytes_to_client: Bytes sent to the client (headers included).
    @ivar dropped: Datagrams dropped.
    """

    log = Logger()
    transport: Any

    def __init__(self, session: Any, client_ip: str, client_port: int, socks: SocksShared) -> None:
        self.session = session
        self.client_ip = client_ip
        self.client_port = client_port
        self.socks = socks
        self.datagrams = 0
        self.bytes_to_origin = 0
        self.bytes_to_client = 0
        self.dropped = 0
        self._port: Any = None
        self._address: tuple[str, int] | None = None
        self._peers: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._names: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lookups: dict[str, Deferred[Any]] = {}
        self._clock = session.clock
        self._seen = 0
        self._last = self._clock.seconds()
        self._timer: IDelayedCall | None = None

    def start(self, reactor: Any, local: str) -> tuple[str, int]:
        """
        Listen on an ephemeral port of C{local}, the address the client reached the
        proxy on; return the address to reply with. An IPv4 client of a dual-stack
        listener shows as C{::ffff:a.b.c.d}, and gets a relay (and a reply) on a.b.c.d.
        """
        address = normalize_address(local)
        interface = str(address) if address is not None else local
        self._port = reactor.listenUDP(0, self, interface=interface)
        host = self._port.getHost()
        self._address = (host.host, host.port)
        timeout = self.session.config.tunnel_idle_timeout
        self._timer = self._clock.callLater(timeout / _CHECKS_PER_TIMEOUT, self._check_idle)
        return self._address

    def stop(self) -> None:
        """Stop relaying: the port is closed, lookups in flight are dropped."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        for d in list(self._lookups.values()):
            d.cancel()
        self._lookups.clear()
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()

    def _check_idle(self) -> None:
        self._timer = None
        try:
            self._idle_round()
        except Exception:
            # A bug ends this association, never the reactor's loop.
            self.log.failure("SOCKS5 UDP relay for {client}", client=self.client_ip)
            self.session.udp_ended("internal error")

    def _idle_round(self) -> None:
        timeout = self.session.config.tunnel_idle_timeout
        now = self._clock.seconds()
        if self.datagrams != self._seen:
            self._seen = self.datagrams
            self._last = now
        if now - self._last >= timeout:
            self.session.udp_ended("idle")
            return
        self._timer = self._clock.callLater(timeout / _CHECKS_PER_TIMEOUT, self._check_idle)

    # -- datagrams --------------------------------------------------------------------

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        """A datagram from the client (to relay out) or from a peer (to relay back)."""
        try:
            host, port = str(addr[0]), int(addr[1])
            source = (host, port)
            if self._from_client(source):
                self._outgoing(data)
            elif source in self._peers:
                self._incoming(data, source)
            else:
                self._drop("stranger")
        except Exception:
            # A bug costs this datagram, never the reactor's loop.
            self.log.failure("SOCKS5 UDP relay for {client}", client=self.client_ip)

    def _from_client(self, source: tuple[str, int]) -> bool:
        host, port = source
        if self.client_port:
            return port == self.client_port and _same(host, self.client_ip)
        if _same(host, self.client_ip) and source not in self._peers:
            # RFC 1928 section 7: the client's port is learned from its first datagram.
            self.client_port = port
            return True
        return False

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self.socks.drop_udp(why)

    def _outgoing(self, data: bytes) -> None:
        try:
            datagram = parse_datagram(data)
        except SocksError:
            self._drop("malformed")
            return
        if datagram.frag != 0:
            # Section 7: fragmentation is optional; an implementation without it drops
            # any datagram whose FRAG field is not 0.
            self._drop("fragment")
            return
        host, port, payload = datagram.host, datagram.port, datagram.payload
        rt = self.session.factory.runtime
        try:
            self.session.factory.check_destination(host, port, rt)
        except ProxyError:
            self._drop("denied")
            return
        if not port or not rt.config.udp_port_allowed(port):
            self._drop("port")
            return
        hop = rt.dialer.plan(b"", host, port, True)
        router = rt.dialer.router
        if hop.parent is not None or (router.pools and router.pool_for(host) is not None):
            self._drop("routed")
            return
        if normalize_address(host) is not None:
            self._send(host, host, port, payload)
            return
        known = self._names.get(host)
        if known is not None and known[0] > self._clock.seconds():
            self._send(host, known[1], port, payload)
            return
        self._lookup(host, port, payload)

    def _lookup(self, host: str, port: int, payload: bytes) -> None:
        if host in self._lookups or len(self._lookups) >= MAX_LOOKUPS:
            # One lookup per name at a time, a few in all: a datagram is cheap to lose
            # (its sender retries), a lookup per datagram is not.
            self._drop("lookups")
            return
        lookup: Callable[[str, int], Deferred[list[str]]] | None = getattr(
            self.session.factory.runtime.connector, "lookup", None
        )
        if lookup is None:
            self._drop("lookups")
            return
        d = as_client(self.client_ip, lookup, host, port)
        self._lookups[host] = d
        d.addCallbacks(
            self._resolved,
            self._not_resolved,
            callbackArgs=(host, port, payload),
            errbackArgs=(host,),
        )
        d.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("SOCKS5 UDP relay for {client}", failure, client=self.client_ip)

    def _resolved(self, addresses: list[str], host: str, port: int, payload: bytes) -> None:
        self._lookups.pop(host, None)
        if self._port is None:
            return
        rt = self.session.factory.runtime
        for address in addresses:
            if rt.address_check:
                try:
                    rt.policy.check_address(host, address)
                except ProxyError:
                    continue
            names = self._names
            if len(names) >= MAX_NAMES:
                names.popitem(last=False)
            names[host] = (self._clock.seconds() + NAME_TTL, address)
            self._send(host, address, port, payload)
            return
        self._drop("denied")

    def _not_resolved(self, failure: Failure, host: str) -> None:
        self._lookups.pop(host, None)
        if failure.check(CancelledError):
            return
        self._drop("unresolved" if not isinstance(failure.value, ProxyError) else "lookups")

    def _send(self, host: str, address: str, port: int, payload: bytes) -> None:
        if self._port is None:
            return
        rt = self.session.factory.runtime
        if rt.address_check and host == address:
            try:
                rt.policy.check_address(host, address)
            except ProxyError:
                self._drop("denied")
                return
        peer = (address, port)
        if (
            self._address is not None
            and _same(address, self._address[0])
            and port == self._address[1]
        ):
            self._drop("loop")
            return
        peers = self._peers
        if peer in peers:
            peers.move_to_end(peer)
        else:
            if len(peers) >= MAX_PEERS:
                peers.popitem(last=False)
            peers[peer] = None
        try:
            self.transport.write(payload, peer)
        except OSError:
            self._drop("unsent")
            return
        self.datagrams += 1
        self.bytes_to_origin += len(payload)
        self.socks.count_udp("to_origin", len(payload))

    def _incoming(self, data: bytes, source: tuple[str, int]) -> None:
        out = datagram_header(source[0], source[1]) + data
        try:
            self.transport.write(out, (self.client_ip, self.client_port))
        except OSError:
            self._drop("unsent")
            return
        self.datagrams += 1
        self.bytes_to_client += len(out)
        self.socks.count_udp("to_client", len(data))


def _same(one: str, other: str) -> bool:
    """Whether two address texts are the same address (IPv6 forms differ in text)."""
    if one == other:
        return True
    a, b = normalize_address(one), normalize_address(other)
    return a is not None and a == b
