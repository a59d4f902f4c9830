"""
Raw byte relays: after a CONNECT's 200 or an Upgrade's 101, the client and upstream
transports are spliced together.

Each transport is registered as the other's streaming producer, so a side that stops reading
pauses the other and memory stays bounded. Between two plain TCP transports the bytes skip
the protocols: L{aproxy.client.wire.relay_reads} sends each side's reads straight to the other. A
half-close is passed on (the other side's write half is shut down after its buffer drains)
and relaying continues the other way; a full close or reset of one side closes the other
once what it already received has been flushed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from aproxy.client.wire import bulk_reads, relay_reads, shut_write, unrelay_reads, write_soon
from aproxy.upstream.protocol import UpstreamProtocol

__all__ = ["Tunnel"]

# The idle check runs this many times per idle timeout, so a tunnel is closed between
# 1 and 1.1 idle timeouts after its last byte.
_CHECKS_PER_TIMEOUT = 10


class Tunnel:
    """
    Two spliced connections: the client's transport and an upstream protocol's.

    @ivar to_origin: Bytes relayed from the client to the origin.
    @ivar to_client: Bytes relayed from the origin to the client.
    """

    def __init__(
        self,
        client_transport: Any,
        upstream: UpstreamProtocol,
        clock: IReactorTime,
        idle_timeout: float,
        on_close: Callable[[Tunnel], None],
    ) -> None:
        self._client = client_transport
        self._upstream = upstream
        self._origin = upstream.transport
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self.to_origin = 0
        self.to_client = 0
        self._seen = 0
        self._last_activity = clock.seconds()
        self._timer: IDelayedCall | None = None
        self._client_eof = False
        self._origin_eof = False
        self.closed = False

    def start(self, to_origin: bytes, to_client: bytes) -> None:
        """
        Splice the two connections, first relaying bytes that arrived before the switch.

        @param to_origin: Client bytes received after the CONNECT or Upgrade head.
        @param to_client: Origin bytes received after the 101 head.
        """
        upstream = self._upstream
        upstream.hand_to(self)
        bulk_reads(self._client)
        bulk_reads(self._origin)
        relay_reads(self._client, self._origin, self._relayed_to_origin)
        relay_reads(self._origin, self._client, self._relayed_to_client)
        self._client.registerProducer(self._origin, True)
        self._origin.registerProducer(self._client, True)
        self._timer = self._clock.callLater(
            self._idle_timeout / _CHECKS_PER_TIMEOUT, self._check_idle
        )
        if to_client:
            self.from_origin(to_client)
        if to_origin:
            self.from_client(to_origin)

    # The tunnel owns the upstream connection (see UpstreamOwner).

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Origin bytes (those not relayed by L{relay_reads})."""
        self.from_origin(data)

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin half-closed."""
        self.origin_eof()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """The origin connection ended."""
        self.origin_lost(up, reason)

    def from_client(self, data: bytes) -> None:
        """Relay client bytes to the origin (those not relayed by L{relay_reads})."""
        self.to_origin += len(data)
        write_soon(self._origin, data)

    def from_origin(self, data: bytes) -> None:
        """Relay origin bytes to the client (those not relayed by L{relay_reads})."""
        self.to_client += len(data)
        write_soon(self._client, data)

    def _relayed_to_origin(self, size: int) -> None:
        self.to_origin += size

    def _relayed_to_client(self, size: int) -> None:
        self.to_client += size

    def client_eof(self) -> None:
        """The client shut down its write side: shut down ours towards the origin."""
        if self.closed:
            # The origin's end closed the tunnel already (in the same reactor pass): its
            # transport is gone, and shutting down its write side would touch a closed
            # socket.
            return
        self._client_eof = True
        if self._origin_eof:
            self.close()
        else:
            shut_write(self._origin)

    def origin_eof(self) -> None:
        """The origin shut down its write side: shut down ours towards the client."""
        if self.closed:
            return
        self._origin_eof = True
        if self._client_eof:
            self.close()
        else:
            shut_write(self._client)

    def client_lost(self) -> None:
        """The client connection ended: close the origin's after flushing it."""
        self.close()

    def origin_lost(self, upstream: UpstreamProtocol, reason: Failure) -> None:
        """The origin connection ended: close the client's after flushing it."""
        self.close()

    def close(self) -> None:
        """Close both connections, each after its pending bytes are written."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        unrelay_reads(self._client)
        unrelay_reads(self._origin)
        self._client.unregisterProducer()
        if not self._upstream.lost:
            self._origin.unregisterProducer()
            self._origin.loseConnection()
        self._client.loseConnection()
        self._on_close(self)

    def _check_idle(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        total = self.to_origin + self.to_client
        if total != self._seen:
            self._seen = total
            self._last_activity = now
        if now - self._last_activity >= self._idle_timeout:
            self.close()
            return
        self._timer = self._clock.callLater(
            self._idle_timeout / _CHECKS_PER_TIMEOUT, self._check_idle
        )
