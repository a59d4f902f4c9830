"""
The phases of a client connection and the one table of the moves between them.

A connection reads a request head (C{READING}); the request may wait for its credentials
to be checked (C{AUTHENTICATING}) and for its upstream connection (C{DIALING}); its body
and response then stream (C{FORWARDING}). Afterwards the connection reads the next
request, or first waits for the client to read what it was sent (C{WAITING}), or becomes a
raw relay (C{TUNNEL}, after a CONNECT or a 101), or closes (C{CLOSING}). A request a
stage answers later waits in C{STAGE}. Every move is
checked against L{ALLOWED} in L{check_move}, so a move the design does not foresee is a bug
that shows (the guard answers it with a 500) instead of a state that quietly goes wrong.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ALLOWED", "Phase", "PhaseError", "check_move"]


class Phase(IntEnum):
    """
    Where a client connection is in its life. (An C{IntEnum}: its members hash as ints,
    in C, where a plain C{Enum}'s hash is a Python method, and the phase table is looked
    up a few times per request.)
    """

    READING = 1
    AUTHENTICATING = 2
    DIALING = 3
    FORWARDING = 4
    WAITING = 5
    TUNNEL = 6
    CLOSING = 7
    STAGE = 8


_R, _A, _D, _F, _W, _T, _C, _S = (
    Phase.READING,
    Phase.AUTHENTICATING,
    Phase.DIALING,
    Phase.FORWARDING,
    Phase.WAITING,
    Phase.TUNNEL,
    Phase.CLOSING,
    Phase.STAGE,
)

# From each phase, the phases a connection may move to. READING -> READING and WAITING
# are the requests the proxy answers itself (Max-Forwards: 0); DIALING -> TUNNEL is a
# CONNECT; FORWARDING -> DIALING is the one retry on a fresh connection when a pooled one
# turns out closed; FORWARDING -> TUNNEL is a 101. DIALING -> READING, WAITING or STAGE is
# a cache fleet member that could not be reached, whose URL is then served here: the
# stages may answer it after all. STAGE is a request waiting for a stage's
# answer (a cache waiting for a fetch in progress): then it is answered (in one write, or
# streamed while FORWARDING) or goes upstream.
ALLOWED: dict[Phase, frozenset[Phase]] = {
    _R: frozenset({_R, _A, _D, _F, _W, _C, _S}),
    _A: frozenset({_R, _D, _F, _W, _C, _S}),
    _S: frozenset({_R, _D, _F, _W, _C}),
    _D: frozenset({_R, _F, _W, _T, _C, _S}),
    _F: frozenset({_R, _W, _D, _T, _C}),
    _W: frozenset({_R, _C}),
    _T: frozenset({_C}),
    _C: frozenset(),
}


class PhaseError(RuntimeError):
    """A move between phases that the design does not allow: a bug."""


def check_move(current: Phase, new: Phase) -> None:
    """
    Allow the move from C{current} to C{new}, or raise.

    @raise PhaseError: If L{ALLOWED} has no such move.
    """
    if new not in ALLOWED[current]:
        raise PhaseError(f"no move from {current.name.lower()} to {new.name.lower()}")
