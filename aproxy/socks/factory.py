"""
L{SocksFactory}: the listening factory of every C{--socks-port}. It builds a
L{aproxy.socks.protocol.SocksProtocol} per connection on top of the proxy's own
L{aproxy.client.factory.ProxyFactory}, so that SOCKS5 and HTTP clients share one
configuration, one set of limits and counts, one login throttle, one access log and one
graceful stop; and it keeps the SOCKS5 figures (L{SocksCollector}, for C{--metrics}).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory

from aproxy.client.context import ProxyContext
from aproxy.socks.protocol import SocksProtocol
from aproxy.socks.shared import SocksShared

__all__ = ["SocksCollector", "SocksFactory"]


class SocksFactory(Factory, SocksShared):
    """
    Builds a L{SocksProtocol} per SOCKS5 connection (see the module docstring); its
    sessions share it as their L{SocksShared}.

    @param proxy: The proxy's factory: its runtime, counts and observers are shared.
    @param reactor: Listens for each association's UDP relay.
    """

    noisy = False

    def __init__(self, proxy: ProxyContext, reactor: Any) -> None:
        SocksShared.__init__(self, reactor)
        self.proxy = proxy

    def buildProtocol(self, addr: IAddress | None) -> SocksProtocol:
        """The protocol of one SOCKS5 connection."""
        return SocksProtocol(self.proxy, self, addr)

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """How the log names this listener ("SOCKS5 starting on 1080")."""
        return "SOCKS5"

    def startFactory(self) -> None:
        """Start the proxy's factory with the listener (it counts its listeners)."""
        doStart = getattr(self.proxy, "doStart", None)  # noqa: N806
        if doStart is not None:
            doStart()

    def stopFactory(self) -> None:
        """Stop the proxy's factory with the listener."""
        doStop = getattr(self.proxy, "doStop", None)  # noqa: N806
        if doStop is not None:
            doStop()


class SocksCollector:
    """The SOCKS5 figures, read at scrape time (register it with the metrics' registry)."""

    def __init__(self, socks: SocksFactory) -> None:
        self._socks = socks

    def describe(self) -> list[Metric]:
        """The metric names this collector yields, for the registry's duplicate check."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        socks = self._socks
        yield GaugeMetricFamily(
            "aproxy_socks_sessions", "Open SOCKS5 connections.", value=socks.sessions
        )
        datagrams = CounterMetricFamily(
            "aproxy_socks_udp_datagrams",
            "Datagrams relayed by SOCKS5 UDP associations, by direction.",
            labels=["direction"],
        )
        size = CounterMetricFamily(
            "aproxy_socks_udp_bytes",
            "Payload bytes relayed by SOCKS5 UDP associations, by direction.",
            labels=["direction"],
        )
        for direction in ("to_origin", "to_client"):
            datagrams.add_metric([direction], socks.udp_datagrams[direction])
            size.add_metric([direction], socks.udp_bytes[direction])
        yield datagrams
        yield size
        dropped = CounterMetricFamily(
            "aproxy_socks_udp_dropped",
            "Datagrams SOCKS5 UDP associations dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(socks.udp_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
