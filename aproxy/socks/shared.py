"""
L{SocksShared}: what every SOCKS5 session of a listener shares: the reactor its UDP relays
listen on, and the figures the metrics read (L{aproxy.socks.factory.SocksCollector}).
A class of its own, so that the sessions and relays need no import of the factory that
builds them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SocksShared"]


class SocksShared:
    """
    The SOCKS5 sessions' shared reactor and figures.

    @ivar reactor: Listens for each association's UDP relay.
    @ivar sessions: SOCKS5 connections open now.
    @ivar udp_datagrams: Datagrams relayed, by direction (C{to_origin}, C{to_client}).
    @ivar udp_bytes: Payload bytes relayed, by direction.
    @ivar udp_dropped: Datagrams dropped, by reason.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.sessions = 0
        self.udp_datagrams = {"to_origin": 0, "to_client": 0}
        self.udp_bytes = {"to_origin": 0, "to_client": 0}
        self.udp_dropped: dict[str, int] = {}

    def count_udp(self, direction: str, size: int) -> None:
        """One datagram of C{size} payload bytes relayed in C{direction}."""
        self.udp_datagrams[direction] += 1
        self.udp_bytes[direction] += size

    def drop_udp(self, why: str) -> None:
        """One datagram dropped, for C{why}."""
        self.udp_dropped[why] = self.udp_dropped.get(why, 0) + 1
