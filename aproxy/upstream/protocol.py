"""
The protocol on each upstream connection (L{UpstreamProtocol}), a thin adapter that hands
bytes to the connection's current owner, and the factory that builds it.

An upstream connection has one owner at a time (L{UpstreamOwner}): the dial that is making
it, then the exchange that forwards a request on it, the pool while it is idle, or a tunnel
once it carries raw bytes. Ownership passes with L{UpstreamProtocol.hand_to}, the one way
to take a connection over; an owner that lets go hands it to L{DISCARD}.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.http.head import HeadReader

__all__ = [
    "DISCARD",
    "UpstreamFactory",
    "UpstreamOwner",
    "UpstreamProtocol",
    "abandon",
    "no_delay",
]


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on C{transport}'s TCP connection (through TLS layers, which
    pass the call down), if it has one.

    Twisted leaves it on. A proxy writes each message whole (see L{aproxy.client.wire})
    and gains nothing from it, but a small write that follows another before its ACK,
    such as the first request in a new tunnel, then waits for the peer's delayed ACK:
    about 40 ms on Linux. Measured on intercepted new connections: 101 -> 581 per second.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except (OSError, AttributeError):
            pass  # (a connection already gone, or no socket beneath)


class UpstreamOwner(TypingProtocol):
    """Whoever an upstream connection's bytes and end go to (see the module docstring)."""

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Bytes arrived on C{up}."""

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin shut down its write side of C{up} (a half-close)."""

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """C{up} ended."""


class _Discard:
    """The owner of a connection nobody needs: bytes are dropped, a half-close closes."""

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """Dropped: nobody reads this connection any more."""

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """Close: HTTP has no use for a half-closed connection."""
        if up.transport is not None:
            up.transport.loseConnection()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """Nothing to do."""


DISCARD: UpstreamOwner = _Discard()


def abandon(up: UpstreamProtocol, abort: bool) -> None:
    """Close an upstream connection nobody will read from again (abort: drop its buffer)."""
    up.hand_to(DISCARD)
    if abort:
        up.transport.abortConnection()
    else:
        up.transport.loseConnection()


"""The owner of connections nobody needs (and of new ones, until their dial takes them)."""


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """
    One connection to an origin: a thin adapter that hands received bytes and the
    connection's end to whoever owns it now (see L{UpstreamOwner} and L{hand_to}).

    @ivar key: Where the connection goes, for the pool (L{aproxy.upstream.dialer.Hop.key}).
    @ivar reader: Collects the head of each response on this connection.
    @ivar owner: Who the connection's bytes and end go to now.
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
        self.owner: UpstreamOwner = DISCARD
        self.lost = False

    def hand_to(self, owner: UpstreamOwner) -> None:
        """Make C{owner} the one owner of this connection from now on."""
        self.owner = owner

    def connectionMade(self) -> None:
        """Ready now, unless a TLS handshake beneath must complete first."""
        no_delay(self.transport)
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
        self.owner.upstream_data(self, data)

    def readConnectionLost(self) -> None:
        """The origin half-closed: tell the owner (HTTP closes, a tunnel relays it)."""
        self.owner.upstream_eof(self)

    def writeConnectionLost(self) -> None:
        """Our write side is shut down; the read side goes on until the origin closes."""

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """Tell the current owner that the origin connection ended."""
        self.lost = True
        self.owner.upstream_lost(self, reason)


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
