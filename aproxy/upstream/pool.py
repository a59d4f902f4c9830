"""
The pool of idle upstream connections (L{UpstreamPool}), reused per origin or parent.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.upstream.protocol import DISCARD, UpstreamProtocol

__all__ = ["UpstreamPool"]


class UpstreamPool:
    """
    Idle upstream connections kept for reuse, per key (see L{aproxy.upstream.dialer.Hop.key}: the
    origin, or the parent proxy, and whether it speaks TLS).

    A connection is put back only after its response was read completely and neither side
    asked to close. While idle it must stay silent: any byte or a close from the origin
    removes it. Idle connections older than C{idle_timeout} are closed by a sweep that runs
    only while the pool holds something.

    A connection is also never reused once it is C{max_age} seconds old, however busy it
    is (each use resets the idle clock, not this one): its address was checked against
    the rules when it was made, and a name may have moved since. The age counts from
    when the connection was made (L{UpstreamProtocol.created}), or from its first return
    to the pool when that is unknown.

    @param clock: Measures the idle time and age, and runs the sweep.
    @param max_per_key: Idle connections kept per key; more are closed.
    @param idle_timeout: Seconds an idle connection is kept.
    @param max_age: Seconds after which a connection is not reused.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        max_per_key: int,
        idle_timeout: float,
        max_age: float = 120.0,
    ) -> None:
        self._clock = clock
        self._max = max_per_key
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        self._idle: dict[Hashable, list[UpstreamProtocol]] = {}
        self._sweeper: IDelayedCall | None = None
        self.reused = 0

    def __len__(self) -> int:
        """The number of idle connections held."""
        return sum(len(v) for v in self._idle.values())

    def reconfigure(self, max_per_key: int, idle_timeout: float, max_age: float) -> None:
        """
        Apply new limits (a reload) to the connections held now and to later ones:
        connections over the new count per key or past the new times are closed at once.
        """
        self._max = max_per_key
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        for key, conns in list(self._idle.items()):
            while len(conns) > max_per_key:
                # The least recently used go first (acquire takes from the end).
                self._discard(conns.pop(0))
            if not conns:
                del self._idle[key]
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._sweep()

    def _too_old(self, proto: UpstreamProtocol, now: float) -> bool:
        created = proto.created
        return created is not None and now - created >= self._max_age

    def acquire(self, key: Hashable) -> UpstreamProtocol | None:
        """
        Take the most recently used idle connection to C{key} that is still open and
        younger than the maximum age, if there is one (older ones are closed).
        """
        conns = self._idle.get(key)
        while conns:
            proto = conns.pop()
            if proto.lost:
                continue
            if self._too_old(proto, self._clock.seconds()):
                self._discard(proto)
                continue
            self.reused += 1
            # The caller takes it over (or closes it).
            proto.hand_to(DISCARD)
            return proto
        return None

    def release(self, proto: UpstreamProtocol) -> None:
        """
        Keep C{proto} for reuse, or close it if the pool for its key is full or it has
        reached the maximum age.
        """
        if proto.lost or proto.transport is None:
            return
        now = self._clock.seconds()
        if proto.created is None:
            proto.created = now
        conns = self._idle.setdefault(proto.key, [])
        if len(conns) >= self._max or self._too_old(proto, now):
            if not conns:
                del self._idle[proto.key]
            proto.transport.loseConnection()
            return
        proto.idle_since = now
        proto.hand_to(self)
        conns.append(proto)
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._sweep_delay(), self._sweep)

    def _sweep_delay(self) -> float:
        return min(self._idle_timeout, self._max_age)

    # The pool owns its idle connections (see UpstreamOwner).

    def upstream_data(self, up: UpstreamProtocol, data: bytes) -> None:
        """
        An idle origin connection must be silent; bytes now would be read as the
        response to the next request. Drop it.
        """
        self._remove(up)
        up.hand_to(DISCARD)
        up.transport.loseConnection()

    def upstream_eof(self, up: UpstreamProtocol) -> None:
        """The origin half-closed an idle connection: it is of no use any more."""
        self._remove(up)
        up.hand_to(DISCARD)
        up.transport.loseConnection()

    def upstream_lost(self, up: UpstreamProtocol, reason: Failure) -> None:
        """An idle connection ended (the origin closed it)."""
        self._remove(up)

    def _remove(self, proto: UpstreamProtocol) -> None:
        conns = self._idle.get(proto.key)
        if conns and proto in conns:
            conns.remove(proto)

    def _discard(self, proto: UpstreamProtocol) -> None:
        """Close an idle connection taken out of the pool."""
        proto.hand_to(DISCARD)
        proto.transport.loseConnection()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._clock.seconds()
        limit = now - self._idle_timeout
        left = 0
        for key, conns in list(self._idle.items()):
            keep = []
            for proto in conns:
                if proto.idle_since <= limit or self._too_old(proto, now):
                    self._discard(proto)
                else:
                    keep.append(proto)
            if keep:
                self._idle[key] = keep
                left += len(keep)
            else:
                del self._idle[key]
        if left:
            self._sweeper = self._clock.callLater(self._sweep_delay() / 2, self._sweep)

    def close(self) -> None:
        """Close every idle connection (at service stop)."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for conns in self._idle.values():
            for proto in conns:
                self._discard(proto)
        self._idle.clear()
