"""
What every client connection needs before HTTP: admission (allowed networks and connection
limits), one lazily rescheduled timer for whichever deadline applies, and pausing the client
transport for several independent reasons. L{aproxy.client.protocol.ProxyProtocol} builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from aproxy.client.context import ProxyContext
from aproxy.config import ProxyConfig
from aproxy.errors import Forbidden, ProxyError, ServiceUnavailable
from aproxy.http.proxyheader import ProxyHeaderError, ProxyHeaderReader

__all__ = [
    "DEADLINE_CONNECT",
    "DEADLINE_HEAD",
    "DEADLINE_IDLE",
    "DEADLINE_NONE",
    "DEADLINE_READ",
    "PAUSE_DIAL",
    "PAUSE_HOLD",
    "PAUSE_UPSTREAM",
    "ClientConnection",
    "ClientPauser",
    "OutputGate",
    "Pausable",
]

# What the single per-connection timer is waiting for.
DEADLINE_NONE, DEADLINE_HEAD, DEADLINE_IDLE, DEADLINE_CONNECT, DEADLINE_READ = range(5)
# Why the client transport is paused: bits, so each reason is withdrawn on its own.
PAUSE_DIAL, PAUSE_HOLD, PAUSE_UPSTREAM = 1, 2, 4


class Pausable(TypingProtocol):
    """Something that stops and resumes reading from its client for several reasons."""

    def pause_for(self, reason: int) -> None:
        """Stop reading for C{reason}."""

    def unpause_for(self, reason: int) -> None:
        """Withdraw C{reason}."""


@implementer(IPushProducer)
class ClientPauser:
    """
    Registered as the producer of an upstream transport: when the origin can't take more
    request body, the client transport is paused (one reason among several).
    """

    __slots__ = ("_proto",)

    def __init__(self, proto: Pausable) -> None:
        self._proto = proto

    def pauseProducing(self) -> None:
        """The upstream send buffer is full: stop reading from the client."""
        self._proto.pause_for(PAUSE_UPSTREAM)

    def resumeProducing(self) -> None:
        """The upstream send buffer drained: read from the client again."""
        self._proto.unpause_for(PAUSE_UPSTREAM)

    def stopProducing(self) -> None:
        """The upstream connection ended; L{ClientConnection} handles that itself."""


@implementer(IPushProducer)
class OutputGate:
    """
    The client transport's streaming producer for the connection's whole life.

    The client transport pauses it when more than its buffer size of responses waits to
    be written to the client, and resumes it once everything was written. The gate passes
    both on to the upstream transport in flight (C{source}), so a slow reader pauses the
    origin, and remembers the state, so that no next pipelined request is started while
    the client is not reading its answers (issue #12, item 1: a client that pipelines and
    never reads then costs a bounded amount of memory, whatever it sends).
    """

    __slots__ = ("_on_drained", "paused", "source")

    def __init__(self, on_drained: Callable[[], None]) -> None:
        self._on_drained = on_drained
        self.paused = False
        self.source: Any = None

    def pauseProducing(self) -> None:
        """The client's write buffer is full: stop the origin in flight too."""
        self.paused = True
        if self.source is not None:
            self.source.pauseProducing()

    def resumeProducing(self) -> None:
        """Everything was written to the client: go on with the origin, or the next request."""
        self.paused = False
        if self.source is not None:
            self.source.resumeProducing()
        self._on_drained()

    def stopProducing(self) -> None:
        """The client connection ended; L{ClientConnection.connectionLost} handles that."""

    def attach(self, source: Any) -> None:
        """Make C{source} (an upstream transport) follow the client's pace from now on."""
        self.source = source
        if self.paused:
            source.pauseProducing()


class ClientConnection(Protocol):
    """
    A client connection's admission, deadline timer and pause reasons.

    Subclasses implement L{_deadline_passed}, L{_is_closing}, L{fail} and L{close}.

    @cvar internal: A request the proxy makes of itself (L{aproxy.client.background}):
        it takes no connection slot of its client's, and its address is not noted.
    """

    log = Logger()
    transport: Any
    internal = False

    def __init__(self, factory: ProxyContext, addr: IAddress | None = None) -> None:
        self.factory = factory
        # The runtime (configuration, policy, ...) of the request in flight, or of the
        # last one: a request takes the factory's when it starts (see Runtime).
        self.runtime = factory.runtime
        self.clock = factory.clock
        self.client_address = addr
        self._paused = 0
        self._pauser: ClientPauser | None = None
        self._timer: IDelayedCall | None = None
        self._deadline = 0.0
        self.deadline_kind = DEADLINE_NONE
        self._counted = False
        self._slot_taken = False
        self.client_ip: str | None = None
        self._proxy_header: ProxyHeaderReader | None = None

    @property
    def config(self) -> ProxyConfig:
        """The settings of the request in flight (or of the last one)."""
        return self.runtime.config

    # -- hooks ------------------------------------------------------------------------

    def _deadline_passed(self, kind: int) -> None:
        """The deadline for C{kind} passed."""
        raise NotImplementedError

    def _is_closing(self) -> bool:
        """Whether the connection is being closed (no more reading)."""
        raise NotImplementedError

    def fail(self, err: ProxyError) -> None:
        """Answer C{err} and close."""
        raise NotImplementedError

    def close(self) -> None:
        """Close without an answer."""
        raise NotImplementedError

    # -- admission --------------------------------------------------------------------

    def expect_proxy_header(self) -> None:
        """
        Read a PROXY protocol header first (the peer is a trusted load balancer; see
        L{aproxy.run.service.ProxyHeaderFactory}) and admit the client it names. Call before
        the connection is made.
        """
        self._proxy_header = ProxyHeaderReader()

    def _read_proxy_header(self, data: bytes) -> bytes | None:
        """
        Feed bytes to the PROXY header reader; once the header is complete, admit the
        client it names (a C{LOCAL} header: the load balancer itself). A connection
        whose first bytes are not an accepted header is logged and closed.

        @return: The bytes after the header once the client is admitted; L{None} while
            the header is incomplete, and when the connection was refused.
        """
        reader = self._proxy_header
        assert reader is not None
        peer = getattr(self.transport.getPeer(), "host", None)
        try:
            header = reader.feed(data)
        except ProxyHeaderError as e:
            self._proxy_header = None
            self.log.info(
                "connection from load balancer {peer} closed: {why}", peer=peer, why=str(e)
            )
            self.close()
            return None
        if header is None:
            return None
        self._proxy_header = None
        refusal = self._admit(header.source[0] if header.source is not None else peer)
        if refusal is not None:
            self.fail(refusal)
            return None
        return reader.rest

    def _admit(self, proxied: str | None = None) -> ProxyError | None:
        """
        Count this connection and check the client's address and the limits.

        @param proxied: The client's address from a PROXY header; by default, the peer's.
        @return: The refusal to answer with, or L{None} to serve the client.
        """
        factory = self.factory
        config = self.config
        factory.open_connections += 1
        self._slot_taken = True
        client_ip = (
            proxied if proxied is not None else getattr(self.transport.getPeer(), "host", None)
        )
        self.client_ip = client_ip
        if self.internal:
            return None  # (admitted with the request it repeats: no slot of its client's)
        factory.loops.note_local(self.transport.getHost())
        if client_ip is not None:
            if not self.runtime.policy.client_allowed(client_ip):
                self.log.info("client {client} refused: not in --allow", client=client_ip)
                return Forbidden(
                    "this proxy does not serve your address (see the --allow option)",
                    "http_request_denied",
                )
            count = factory.clients_per_ip.get(client_ip, 0) + 1
            factory.clients_per_ip[client_ip] = count
            self._counted = True
            if (
                count > config.max_clients_per_ip
                and client_ip not in self.runtime.dialer.router.fleet_hosts
            ):
                # (A cache fleet member carries its own clients' requests.)
                return ServiceUnavailable(
                    "too many connections from your address", "connection_limit_reached"
                )
        if factory.open_connections > config.max_connections:
            return ServiceUnavailable("too many connections", "connection_limit_reached")
        return None

    def _release_slot(self) -> None:
        """Uncount this connection (at its end)."""
        factory = self.factory
        if not self._slot_taken:
            return
        self._slot_taken = False
        factory.open_connections -= 1
        ip = self.client_ip
        if self._counted and ip is not None:
            self._counted = False
            left = factory.clients_per_ip[ip] - 1
            if left:
                factory.clients_per_ip[ip] = left
            else:
                del factory.clients_per_ip[ip]

    # -- flow control -----------------------------------------------------------------

    def pause_for(self, reason: int) -> None:
        """Stop reading from the client for C{reason} (one of several bits)."""
        if not self._paused:
            self.transport.pauseProducing()
        self._paused |= reason

    def unpause_for(self, reason: int) -> None:
        """Withdraw C{reason}; reading resumes once no reason is left."""
        paused = self._paused
        if paused & reason:
            self._paused = paused = paused & ~reason
            if not paused and not self._is_closing():
                self.transport.resumeProducing()

    # -- timers -----------------------------------------------------------------------

    def set_deadline(self, kind: int, timeout: float) -> None:
        self.deadline_kind = kind
        self._deadline = self.clock.seconds() + timeout
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(timeout, self._on_deadline)
        elif timer.getTime() > self._deadline:
            timer.reset(timeout)

    def extend_deadline(self, timeout: float) -> None:
        """
        Move the deadline in force to C{timeout} seconds from now (activity). The timer
        is not rescheduled: when it fires early it sleeps on (see L{_on_deadline}).
        """
        self._deadline = self.clock.seconds() + timeout

    def cancel_timer(self) -> None:
        self.deadline_kind = DEADLINE_NONE
        timer = self._timer
        if timer is not None:
            self._timer = None
            if timer.active():
                timer.cancel()

    def _on_deadline(self) -> None:
        self._timer = None
        kind = self.deadline_kind
        if kind == DEADLINE_NONE or self._is_closing():
            return
        remaining = self._deadline - self.clock.seconds()
        if remaining > 0:
            # The deadline moved later since the call was scheduled (activity): sleep on.
            self._timer = self.clock.callLater(remaining, self._on_deadline)
            return
        self.deadline_kind = DEADLINE_NONE
        self._deadline_passed(kind)
