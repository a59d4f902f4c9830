"""
L{LoginThrottle}: how many failed proxy logins each client address may make before it is
refused for a while, so a password guesser can't try (and make the proxy hash) as fast as
it can send.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from aproxy.errors import TooManyRequests

__all__ = ["LoginThrottle"]


class LoginThrottle:
    """
    Counts failed proxy logins per client address, so that a flood of guesses from one
    address is refused before any password hash runs.

    Each address gets a window that opens with its first failure and lasts C{window}
    seconds; once it holds C{limit} failures, further attempts from that address are
    refused until the window closes (so at most C{limit} guesses per window get checked,
    each costing a slow hash). A valid login does not reset the count: with one account of
    their own a client could otherwise interleave logins to keep guessing another's.

    A guess counts from the moment its check starts (L{begin}), not when its hash ends:
    while checks run, each distinct credential being checked for an address counts
    against its limit as if it had failed, so a burst of simultaneous guesses gets at
    most C{limit} checks, not one per request. A request with the same credential as a
    check already running for that address joins it and adds nothing (a browser opening
    ten connections with one password is one guess). When the check ends (L{end}), a
    valid credential stops counting and a wrong one becomes a failure.

    At most C{max_tracked} addresses are remembered; past that, closed windows are dropped
    and then the oldest ones, so a flood from many addresses can't grow memory without
    bound (it can only make the throttle forget sooner). Checks in progress are bounded
    by the connections, one per request.
    """

    #: Requests one address may have waiting for a check in progress to end (see L{admit}).
    MAX_WAITING = 64

    def __init__(self, clock: IReactorTime, max_tracked: int = 65536) -> None:
        """
        @param clock: Time source for the windows.
        @param max_tracked: How many client addresses are remembered at most.
        """
        self._clock = clock
        self.max_tracked = max_tracked
        # address -> [window start, failures in the window]; in order of window start.
        self._windows: dict[str, list[float]] = {}
        # address -> credential key -> requests waiting on its check.
        self._pending: dict[str, dict[Hashable, int]] = {}
        # address -> requests waiting for one of its checks in progress to end (admit).
        self._waiters: dict[str, deque[Deferred[None]]] = {}

    def refused_for(
        self, address: str, limit: int, window: float, key: Hashable | None = None
    ) -> float | None:
        """
        Whether C{address} is refused now: the seconds until its window closes (or 1
        while only checks in progress fill the limit), or L{None} when it may try (always,
        when C{limit} is 0, and for a C{key} whose check is already running: it joins).
        """
        if not limit:
            return None
        pending = self._pending.get(address)
        if pending is not None and key is not None and key in pending:
            return None
        counted = len(pending) if pending is not None else 0
        entry = self._windows.get(address)
        left = 0.0
        if entry is not None:
            left = entry[0] + window - self._clock.seconds()
            if left <= 0:
                del self._windows[address]
                entry = None
            else:
                counted += int(entry[1])
        if counted < limit:
            return None
        return left if entry is not None and entry[1] >= limit else max(left, 1.0)

    def check(self, address: str, limit: int, window: float, key: Hashable | None = None) -> None:
        """
        Let C{address} try to log in (with credentials C{key}), or refuse it.

        @raise TooManyRequests: When its failures in the open window and its checks in
            progress reach C{limit}; the C{Retry-After} is the window's rest in whole
            seconds (at least 1).
        """
        left = self.refused_for(address, limit, window, key)
        if left is not None:
            wait = max(math.ceil(left), 1)
            entry = self._windows.get(address)
            if entry is not None and entry[1] >= limit:
                why = f"too many failed proxy logins from {address}"
            else:
                # Only checks still running fill the limit: say so, since they may all
                # turn out valid (many users behind one address logging in at once).
                why = f"too many proxy logins from {address} being checked at once"
            raise TooManyRequests(f"{why}: try again in {wait} s", wait)

    def admit(
        self, address: str, limit: int, window: float, key: Hashable | None = None
    ) -> Deferred[None] | None:
        """
        Like L{check}, but when only checks still in progress fill the limit (they may
        all turn out valid: many users behind one address logging in at once), wait
        instead of refusing.

        @return: L{None} to go on now; or a L{Deferred} that fires once a check in
            progress for C{address} ends, when the caller asks again (cancel it if the
            request goes away first).
        @raise TooManyRequests: When failures in the open window fill the limit, or more
            than L{MAX_WAITING} requests from C{address} wait already.
        """
        if self.refused_for(address, limit, window, key) is None:
            return None
        entry = self._windows.get(address)
        waiters = self._waiters.get(address)
        if (entry is not None and entry[1] >= limit) or (
            waiters is not None and len(waiters) >= self.MAX_WAITING
        ):
            self.check(address, limit, window, key)
        if waiters is None:
            waiters = self._waiters[address] = deque()
        queue = waiters

        def cancel(d: Deferred[None]) -> None:
            if d in queue:
                queue.remove(d)
            if not queue and self._waiters.get(address) is queue:
                del self._waiters[address]

        waiting: Deferred[None] = Deferred(cancel)
        queue.append(waiting)
        return waiting

    def _wake(self, address: str) -> None:
        """
        A check for C{address} ended: every request waiting asks again, in order (at
        most L{MAX_WAITING}); those the limit still holds back wait again.
        """
        waiters = self._waiters.pop(address, None)
        while waiters:
            waiters.popleft().callback(None)

    def begin(self, address: str, key: Hashable) -> None:
        """A request from C{address} waits for the check of credential C{key}."""
        pending = self._pending.setdefault(address, {})
        pending[key] = pending.get(key, 0) + 1

    def end(self, address: str, key: Hashable, failed: bool | None, window: float) -> None:
        """
        A request that L{begin} counted has its answer.

        @param failed: C{True} for a wrong credential (one failure for the check, however
            many requests joined it), C{False} for a valid one or a check that never ran
            (refused by a bound), L{None} when this request gave up (its client left):
            the guess then counts as failed once nobody waits for it any more.
        """
        pending = self._pending.get(address)
        waiting = pending.get(key) if pending is not None else None
        if pending is None or waiting is None:
            return  # already settled by a request that joined the same check
        if failed is None and waiting > 1:
            pending[key] = waiting - 1
            return
        del pending[key]
        if not pending:
            del self._pending[address]
        if failed is not False:
            self.failed(address, window)
        self._wake(address)

    def failed(self, address: str, window: float) -> None:
        """Count one failed login from C{address}."""
        now = self._clock.seconds()
        entry = self._windows.get(address)
        if entry is not None and now < entry[0] + window:
            entry[1] += 1
            return
        if entry is not None:
            del self._windows[address]  # re-inserted last: the order stays by window start
        elif len(self._windows) >= self.max_tracked:
            self._forget(now, window)
        self._windows[address] = [now, 1]

    def _forget(self, now: float, window: float) -> None:
        """Drop closed windows; if still full, the oldest half."""
        windows = self._windows
        for address in [a for a, (start, _) in windows.items() if start + window <= now]:
            del windows[address]
        if len(windows) >= self.max_tracked:
            for address in list(windows)[: len(windows) // 2 + 1]:
                del windows[address]
