"""
The protocol on each upstream connection (L{UpstreamProtocol}), a thin adapter that hands
bytes to the connection's current owner, and the factory that builds it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.http.head import HeadReader

__all__ = ["UpstreamFactory", "UpstreamProtocol", "ignore_data", "ignore_lost"]


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """
    One connection to an origin: a thin adapter that hands received bytes and the
    connection's end to whoever owns it now (a client's L{ProxyProtocol} or the pool).

    @ivar key: Where the connection goes, for the pool (L{aproxy.upstream.dialer.Hop.key}).
    @ivar reader: Collects the head of each response on this connection.
    @ivar on_data: Called with each received chunk of bytes.
    @ivar on_lost: Called with this protocol and the reason when the connection ends.
    @ivar on_eof: Called when the origin shuts down its write side (a half-close); by
        default that ends the connection, which is what HTTP needs. Tunnels relay it.
    @ivar on_ready: Called once when the connection can carry a request: when it is made,
        or with C{wait_handshake} when the TLS handshake beneath it completed (see
        L{aproxy.upstream.dialer}); L{None} when nobody waits.
    """

    # A TCP or TLS transport: ITransport plus IConsumer, IPushProducer and half-close;
    # no single interface says all of that, so it is typed loosely here.
    transport: Any
    key: Hashable = ("", 0)
    idle_since: float = 0.0
    # When the connection was made (on the clock of the factory that built it), for the
    # pool's maximum age; L{None} until known.
    created: float | None = None
    # The TLS settings (an L{aproxy.upstream.tls.ClientTLS}) that verified the origin or parent
    # on this connection, or L{None} without TLS: a reload replaces them, and a pooled
    # connection verified under the old ones is not reused.
    verified_by: object | None = None
    wait_handshake = False
    on_ready: Callable[[], None] | None = None

    def __init__(self, reader: HeadReader | None = None) -> None:
        self.reader = reader if reader is not None else HeadReader(65536, 65536, False)
        self.on_data: Callable[[bytes], None] = ignore_data
        self.on_lost: Callable[[UpstreamProtocol, Failure], None] = ignore_lost
        self.on_eof: Callable[[], None] = self._close
        self.lost = False

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        """Ready now, unless a TLS handshake beneath must complete first."""
        if not self.wait_handshake:
            self._now_ready()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake beneath this protocol completed (and was verified).

        Only instances under a TLS layer declare C{IHandshakeListener} (with
        C{alsoProvides}): Twisted's endpoint wrapper (26.10) keeps just the last of the
        optional interfaces a protocol provides, which would hide C{IHalfCloseableProtocol}.
        """
        self._now_ready()

    def _now_ready(self) -> None:
        ready, self.on_ready = self.on_ready, None
        if ready is not None:
            ready()

    def dataReceived(self, data: bytes) -> None:
        """Hand the bytes to the current owner."""
        self.on_data(data)

    def readConnectionLost(self) -> None:
        """The origin half-closed: tell the owner (HTTP closes, a tunnel relays it)."""
        self.on_eof()

    def writeConnectionLost(self) -> None:
        """Our write side is shut down; the read side goes on until the origin closes."""

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Tell the current owner that the origin connection ended."""
        self.lost = True
        self.on_lost(self, reason)


def ignore_data(data: bytes) -> None:
    """Bytes before an owner is attached are impossible; ignore them."""


def ignore_lost(proto: UpstreamProtocol, reason: Failure) -> None:
    """A connection lost before an owner is attached needs no action."""


class UpstreamFactory(Factory):
    """Builds an L{UpstreamProtocol} for each new origin connection."""

    protocol = UpstreamProtocol
    noisy = False

    def __init__(self, max_head_size: int = 65536, clock: IReactorTime | None = None) -> None:
        self.max_head_size = max_head_size
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> UpstreamProtocol:
        """
        Make the protocol for one origin connection, with its response-head reader, and
        note when it was made (with a clock) for the pool's maximum age.
        """
        proto = UpstreamProtocol(HeadReader(self.max_head_size, self.max_head_size, False))
        proto.factory = self
        if self.clock is not None:
            proto.created = self.clock.seconds()
        return proto
