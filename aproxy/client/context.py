"""
L{ProxyContext}: what the client side asks of the factory that built it, as a structural
type. The client protocol and its exchanges are typed against this, not against
L{aproxy.client.factory.ProxyFactory}, so that the factory can import them without an
import cycle, and so that what they depend on is written down in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from aproxy.access.loops import LoopGuard
from aproxy.access.throttle import LoginThrottle
from aproxy.client.runtime import Runtime
from aproxy.http.target import Target
from aproxy.observe.records import ExchangeObserver
from aproxy.upstream.dialer import Hop
from aproxy.upstream.pool import UpstreamPool
from aproxy.upstream.protocol import UpstreamProtocol

__all__ = ["ProxyContext"]


class ProxyContext(Protocol):
    """
    What every client connection shares (see L{aproxy.client.factory.ProxyFactory}).

    @ivar runtime: The configuration in force; a request takes it when it starts.
    @ivar clock: Time, for every timer.
    @ivar pool: Idle upstream connections kept for reuse (outlives reloads).
    @ivar login_throttle: Failed logins per client address (outlives reloads).
    @ivar observers: Called with each finished exchange's record.
    @ivar connect_observers: Called with the seconds each new upstream connection took.
    @ivar loops: What the proxy knows of its own addresses and Via marker (loops).
    @ivar connections: The client connections open now.
    @ivar open_connections: How many client connections are admitted now.
    @ivar clients_per_ip: Admitted connections per client address.
    @ivar tunnels: Open tunnels (CONNECT and Upgrade).
    """

    runtime: Runtime
    clock: IReactorTime
    pool: UpstreamPool
    login_throttle: LoginThrottle
    observers: list[ExchangeObserver]
    connect_observers: list[Callable[[float], None]]
    loops: LoopGuard
    connections: set[Any]
    open_connections: int
    clients_per_ip: dict[str, int]
    tunnels: int

    def parse_target(self, raw: bytes, method: bytes) -> Target:
        """The absolute-form target C{raw}, split (cached)."""

    def check_destination(self, host: str, port: int, runtime: Runtime | None = None) -> None:
        """Refuse a destination the rules or the loop check forbid (Forbidden)."""

    def reuse(self, hop: Hop, runtime: Runtime | None = None) -> UpstreamProtocol | None:
        """An idle pooled connection for C{hop}, checked against C{runtime}'s rules."""

    def connection_gone(self, proto: Any) -> None:
        """A client connection ended."""
