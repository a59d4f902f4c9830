"""
L{LoginThrottle}: how many failed proxy logins each client address may make before it is
refused for a while, so a password guesser can't try (and make the proxy hash) as fast as
it can send.
"""

from __future__ import annotations

import math

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

    At most C{max_tracked} addresses are remembered; past that, closed windows are dropped
    and then the oldest ones, so a flood from many addresses can't grow memory without
    bound (it can only make the throttle forget sooner).
    """

    def __init__(self, clock: IReactorTime, max_tracked: int = 65536) -> None:
        """
        @param clock: Time source for the windows.
        @param max_tracked: How many client addresses are remembered at most.
        """
        self._clock = clock
        self.max_tracked = max_tracked
        # address -> [window start, failures in the window]; in order of window start.
        self._windows: dict[str, list[float]] = {}

    def refused_for(self, address: str, limit: int, window: float) -> float | None:
        """
        Whether C{address} is refused now: the seconds until its window closes, or
        L{None} when it may try (always, when C{limit} is 0).
        """
        entry = self._windows.get(address)
        if entry is None or not limit:
            return None
        left = entry[0] + window - self._clock.seconds()
        if left <= 0:
            del self._windows[address]
            return None
        return left if entry[1] >= limit else None

    def check(self, address: str, limit: int, window: float) -> None:
        """
        Let C{address} try to log in, or refuse it.

        @raise TooManyRequests: When it has C{limit} failures in its open window; the
            C{Retry-After} is the window's rest in whole seconds.
        """
        left = self.refused_for(address, limit, window)
        if left is not None:
            wait = math.ceil(left)
            raise TooManyRequests(
                f"too many failed proxy logins from {address}: try again in {wait} s", wait
            )

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
