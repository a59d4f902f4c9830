"""
Requests the proxy makes of itself: a cache's background revalidation (RFC 5861
C{stale-while-revalidate}) goes through the whole proxy as one more client request, so
it is routed, authorised, forwarded, logged and stored like any other, with nothing of
that done twice. Its answer goes to a L{SinkTransport}, which drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.client.stages import StageRequest

__all__ = ["SinkTransport", "background_request", "revalidation_request"]

# Fields of the client's request a revalidation leaves out: its own directives,
# preconditions and range (the revalidation asks for the whole response, afresh), and
# the fields about the client's connection and body.
_LEFT_OUT = frozenset(
    {b"cache-control", b"pragma", b"range", b"connection", b"proxy-connection", b"keep-alive"}
    | {b"te", b"upgrade", b"transfer-encoding", b"content-length", b"expect", b"trailer"}
)


@implementer(ITransport)
class SinkTransport:
    """
    The connection of a request the proxy makes of itself: what the proxy writes is
    dropped, and closing it ends the protocol in the next reactor turn, as a socket would.
    """

    disconnecting = False
    connected = True
    TLS = False

    def __init__(
        self, reactor: IReactorTime, peer: IAddress, host: IAddress, done: Callable[[], None]
    ) -> None:
        self.reactor = reactor
        self._peer = peer
        self._host = host
        self._done = done
        self.protocol: Any = None
        self.producer: Any = None
        self.written = 0

    def write(self, data: bytes) -> None:
        """Dropped (counted)."""
        self.written += len(data)

    def writeSequence(self, seq: Any) -> None:
        """Dropped (counted)."""
        for data in seq:
            self.written += len(data)

    def loseConnection(self) -> None:
        """End the connection: the protocol's C{connectionLost} follows."""
        if not self.disconnecting:
            self.disconnecting = True
            self.reactor.callLater(0, self._lost)

    abortConnection = loseConnection
    loseWriteConnection = loseConnection

    def _lost(self) -> None:
        self.connected = False
        try:
            if self.protocol is not None:
                self.protocol.connectionLost(Failure(ConnectionDone()))
        finally:
            self._done()

    def getPeer(self) -> IAddress:
        """The client the request is made for."""
        return self._peer

    def getHost(self) -> IAddress:
        """The proxy's side of the connection."""
        return self._host

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Nothing is ever held: the producer is never paused."""
        self.producer = producer

    def unregisterProducer(self) -> None:
        """See L{registerProducer}."""
        self.producer = None

    def pauseProducing(self) -> None:
        """The proxy pausing its client: there is nothing more to read anyway."""

    def resumeProducing(self) -> None:
        """See L{pauseProducing}."""

    def stopProducing(self) -> None:
        """Close."""
        self.loseConnection()


def revalidation_request(request: StageRequest) -> bytes | None:
    """
    The request that revalidates what C{request} asked for: a C{GET} of the same
    absolute URL with the client's fields (its C{Vary} variant, its credentials), less
    its own directives, preconditions and range, with C{Cache-Control: max-age=0}.

    @return: The request bytes, or L{None} when the request was not in absolute form.
    """
    head = request.head
    target = head.target
    if not target[:8].lower().startswith((b"http://", b"https://")):
        return None
    lines = [b"GET " + target + b" HTTP/1.1\r\n"]
    for name, value in head.fields:
        lname = name.lower()
        if lname in _LEFT_OUT or lname.startswith(b"if-"):
            continue
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"Cache-Control: max-age=0\r\nConnection: close\r\n\r\n")
    return b"".join(lines)


def background_request(
    factory: Factory, reactor: IReactorTime, request: StageRequest, done: Callable[[], None]
) -> bool:
    """
    Make the revalidation of C{request} (see L{revalidation_request}) through C{factory},
    as if from the same client; C{done} is called when it ends.

    @return: Whether it was started.
    """
    data = revalidation_request(request)
    client = request.client
    if data is None or client == "unix":
        return False
    if request.user is not None and not any(
        name.lower() == b"proxy-authorization" for name, _ in request.head.fields
    ):
        # (A request of an intercepted session: its user logged in with the CONNECT,
        # which a plain request can't repeat.)
        return False
    family: Any = IPv6Address if ":" in client else IPv4Address
    peer = family("TCP", client, 0)
    proto: Any = factory.buildProtocol(peer)
    if proto is None:
        return False
    proto.internal = True
    transport = SinkTransport(reactor, peer, UNIXAddress(None), done)
    transport.protocol = proto

    def start() -> None:
        proto.makeConnection(transport)
        if not transport.disconnecting:
            proto.dataReceived(data)

    # (Once the client's own request is answered: not from inside the cache's lookup.)
    reactor.callLater(0, start)
    return True
