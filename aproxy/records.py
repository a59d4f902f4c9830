"""
L{Exchange}: what the proxy reports about each finished request or tunnel, for access logs
and metrics. Observers are plain callables registered with
C{ProxyFactory.observers.append(observer)}; they must return quickly and not raise.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Exchange", "ExchangeObserver"]


class Exchange:
    """
    One finished request (or tunnel) as the proxy saw it.

    @ivar time: When the request head was complete (seconds since the epoch, UTC).
    @ivar client: The client's address (C{"unix"} for a UNIX socket).
    @ivar user: The authenticated user, or L{None}.
    @ivar method: The request method, e.g. C{"GET"}.
    @ivar target: The request target as received (C{host:port} for CONNECT).
    @ivar status: The status sent to the client (0 if none was sent).
    @ivar bytes_to_client: Bytes written to the client, heads included (as Squid counts).
    @ivar bytes_to_origin: Bytes written to the origin, heads included.
    @ivar duration: Seconds from the complete request head to the end of the exchange.
    @ivar upstream: How the origin was reached: C{"direct"}, or the parent proxy's URL
        without credentials (e.g. C{"http://10.1.2.3:3128"}).
    @ivar error: The RFC 9209 C{Proxy-Status} error type, or L{None}.
    """

    __slots__ = (
        "bytes_to_client",
        "bytes_to_origin",
        "client",
        "duration",
        "error",
        "method",
        "status",
        "target",
        "time",
        "upstream",
        "user",
    )

    def __init__(
        self,
        time: float,
        client: str,
        user: str | None,
        method: str,
        target: str,
        status: int,
        bytes_to_client: int,
        bytes_to_origin: int,
        duration: float,
        upstream: str,
        error: str | None,
    ) -> None:
        self.time = time
        self.client = client
        self.user = user
        self.method = method
        self.target = target
        self.status = status
        self.bytes_to_client = bytes_to_client
        self.bytes_to_origin = bytes_to_origin
        self.duration = duration
        self.upstream = upstream
        self.error = error

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method} {self.target} {self.status} from {self.client}"
            f" {self.bytes_to_client}/{self.bytes_to_origin} bytes>"
        )


ExchangeObserver = Callable[[Exchange], None]
