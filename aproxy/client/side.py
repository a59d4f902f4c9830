"""
L{ClientSide}: what an exchange asks of its client connection, as a structural type
(L{aproxy.client.protocol.ProxyProtocol} provides it), so the exchange needs no import of
the protocol that creates it.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from aproxy.client.connection import OutputGate
from aproxy.client.context import ProxyContext
from aproxy.client.phases import Phase
from aproxy.errors import ProxyError
from aproxy.upstream.protocol import UpstreamProtocol

__all__ = ["ClientSide"]


class ClientSide(Protocol):
    """What an exchange asks of its client connection (L{ProxyProtocol} provides it)."""

    transport: Any
    clock: IReactorTime
    factory: ProxyContext
    user: str | None
    client_ip: str | None
    eof: bool
    last: bool
    output: OutputGate
    deadline_kind: int
    phase: Phase

    @property
    def exchange(self) -> Any:
        """The request in flight, if any."""

    def cancel_timer(self) -> None:
        """Stop the connection's deadline timer (a wait with its own bound follows)."""

    def move(self, phase: Phase) -> None:
        """Move the connection to C{phase} (checked against the phase table)."""

    def pause_for(self, reason: int) -> None:
        """Stop reading from the client for C{reason}."""

    def unpause_for(self, reason: int) -> None:
        """Withdraw C{reason} to stop reading from the client."""

    def set_deadline(self, kind: int, timeout: float) -> None:
        """Wait at most C{timeout} seconds for C{kind}."""

    def extend_deadline(self, timeout: float) -> None:
        """Push the deadline in force to C{timeout} seconds from now (activity)."""

    def hold(self, data: bytes) -> None:
        """Keep client bytes for later (bounded: pauses the client past a limit)."""

    def stash(self, data: bytes) -> None:
        """Keep client bytes for the next step (not bounded: the caller read them)."""

    def take_pending(self) -> bytes:
        """The client bytes held so far, handed over and forgotten."""

    def fail(self, err: ProxyError) -> None:
        """Answer C{err} (or close, once a response started) and close."""

    def close(self) -> None:
        """Close the connection (after what was written)."""

    def internal_error(self, failure: Failure) -> None:
        """A bug: log it once and end the connection."""

    def open_tunnel(self, up: UpstreamProtocol, to_origin: bytes, to_client: bytes) -> None:
        """Switch the connection to a raw relay with C{up}."""

    def exchange_done(self, keep: bool) -> None:
        """The exchange ended: read the next request (C{keep}) or close."""
