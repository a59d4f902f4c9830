"""
Request loops: a request that would reach this proxy again (directly, through a name
that resolves to it, or back through other proxies) is refused with a 403 rather than
relayed until some limit breaks. L{LoopGuard} holds everything the proxy knows about
itself for that (its listening addresses and the marker in its C{Via} comment) and makes
the three checks: on the request's C{Via}, on the target as written, and on the address
a connection actually reached.
"""

from __future__ import annotations

import secrets

from twisted.internet.interfaces import IAddress

from aproxy.access.policy import IPAddress, normalize_address
from aproxy.errors import Forbidden
from aproxy.http.head import RequestHead

__all__ = ["LoopGuard", "loop_error"]


def loop_error() -> Forbidden:
    """The 403 for a request that would reach this proxy again."""
    return Forbidden("request loop: the destination is this proxy", "proxy_loop_detected")


class LoopGuard:
    """
    What this proxy knows about itself, to refuse requests that would come back to it.

    @ivar marker: A random token in this instance's C{Via} comment (see L{via}): a request
        that comes back carrying it has looped, while another aproxy instance has a
        marker of its own.
    @ivar own_addresses: The (address, port) pairs this proxy listens on or was reached
        at, addresses in canonical form (IPv4-mapped IPv6 as IPv4).
    @ivar own_ports: The ports of C{own_addresses}, to answer "not ours" at once.
    @ivar wildcard_ports: The ports listened on at an unspecified address (all
        interfaces), where any local address of this machine is the proxy.
    """

    def __init__(self) -> None:
        self.marker = b"aproxy-" + secrets.token_hex(8).encode("ascii")
        self.own_addresses: set[tuple[str, int]] = set()
        self.own_ports: set[int] = set()
        self.wildcard_ports: set[int] = set()

    def via(self, name: str | None) -> bytes | None:
        """
        The C{Via} received-by value for this proxy named C{name} (C{--via}), carrying
        the marker, or L{None} when no C{Via} is added.
        """
        if not name:
            return None
        return name.encode("ascii") + b" (" + self.marker + b")"

    def note_listening(self, address: IAddress) -> None:
        """Remember an address this proxy listens on, so requests to it are loops."""
        noted = self._note(address)
        if noted is not None and noted[0].is_unspecified:
            self.wildcard_ports.add(noted[1])

    def note_local(self, address: IAddress) -> None:
        """
        Remember the local address a client reached this proxy at (on a wildcard
        listener, one of this machine's addresses), so requests to it are loops.
        """
        self._note(address)

    def _note(self, address: IAddress) -> tuple[IPAddress, int] | None:
        """
        Add an IP address and port as this proxy's own (other kinds of address, such as
        a unix socket's, are left out).

        @return: The address in canonical form and the port, or L{None} if left out.
        """
        host = getattr(address, "host", None)
        port = getattr(address, "port", None)
        if host is None or not isinstance(port, int):
            return None
        ip = normalize_address(host)
        if ip is None:
            return None
        self.own_addresses.add((str(ip), port))
        self.own_ports.add(port)
        return ip, port

    def is_own(self, host: str, port: int, local_host: str | None = None) -> bool:
        """
        Whether C{host}:C{port} is this proxy: one of its listening addresses (however
        written: IPv4-mapped IPv6 counts as IPv4), an unspecified address (which connects
        to this machine) on a port it listens on, or, for a wildcard listener's port, a
        loopback address or the local end's own address (this machine to itself).
        """
        if port not in self.own_ports:
            return False
        ip = normalize_address(host)
        if ip is None:
            return False
        if (str(ip), port) in self.own_addresses or ip.is_unspecified:
            return True
        if port in self.wildcard_ports:
            local = normalize_address(local_host) if local_host else None
            return ip.is_loopback or ip == local
        return False

    def check_target(self, host: str, port: int) -> None:
        """
        Refuse a target, as the client wrote it, that is this proxy.

        @raise Forbidden: C{proxy_loop_detected}.
        """
        if self.is_own(host, port):
            raise loop_error()

    def check_via(self, head: RequestHead) -> None:
        """
        Refuse a request that already passed this proxy: its C{Via} carries the marker.

        @raise Forbidden: C{proxy_loop_detected}.
        """
        if b"via" in head.noted and self.marker in b" ".join(head.noted[b"via"]):
            raise Forbidden(
                "request loop: this request already passed this proxy", "proxy_loop_detected"
            )

    def check_connected(self, peer: IAddress, local: IAddress) -> None:
        """
        Refuse a connection that reached this proxy: the name it was made for led back
        here (seen only now, from the address the connection got).

        @param peer: The far end of the new upstream connection.
        @param local: Its near end (on a wildcard listener, this machine's address).
        @raise Forbidden: C{proxy_loop_detected}.
        """
        if self.is_own(
            getattr(peer, "host", ""), getattr(peer, "port", 0), getattr(local, "host", None)
        ):
            raise loop_error()
