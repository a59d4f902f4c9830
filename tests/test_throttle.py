"""Tests for L{aproxy.access.throttle}: failed logins counted per address, in a window."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aproxy.access.throttle import LoginThrottle
from aproxy.errors import TooManyRequests


class LoginThrottleTests(SynchronousTestCase):
    """Failed logins are counted per address in a window; past the limit it is refused."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock)

    def fail_logins(self, address: str, times: int, window: float = 60.0) -> None:
        """Count C{times} failures from C{address}."""
        for _ in range(times):
            self.throttle.failed(address, window)

    def test_refused_at_the_limit_until_the_window_closes(self) -> None:
        """Below the limit an address may try; at it, it is refused for the window's rest."""
        self.fail_logins("192.0.2.1", 2)
        self.assertIsNone(self.throttle.refused_for("192.0.2.1", 3, 60.0))
        self.clock.advance(10)
        self.fail_logins("192.0.2.1", 1)
        self.assertEqual(self.throttle.refused_for("192.0.2.1", 3, 60.0), 50.0)
        self.clock.advance(49.5)
        self.assertEqual(self.throttle.refused_for("192.0.2.1", 3, 60.0), 0.5)
        self.clock.advance(0.5)
        self.assertIsNone(self.throttle.refused_for("192.0.2.1", 3, 60.0))

    def test_new_window_after_the_old_one(self) -> None:
        """A failure after the window closed opens a new window counting from one."""
        self.fail_logins("192.0.2.1", 3)
        self.clock.advance(61)
        self.fail_logins("192.0.2.1", 1)
        self.assertIsNone(self.throttle.refused_for("192.0.2.1", 2, 60.0))
        self.fail_logins("192.0.2.1", 1)
        self.assertEqual(self.throttle.refused_for("192.0.2.1", 2, 60.0), 60.0)

    def test_addresses_counted_apart(self) -> None:
        """One address's failures don't refuse another."""
        self.fail_logins("192.0.2.1", 5)
        self.assertIsNotNone(self.throttle.refused_for("192.0.2.1", 5, 60.0))
        self.assertIsNone(self.throttle.refused_for("192.0.2.2", 5, 60.0))
        self.assertIsNone(self.throttle.refused_for("2001:db8::1", 5, 60.0))

    def test_no_limit(self) -> None:
        """A limit of 0 never refuses."""
        self.fail_logins("192.0.2.1", 100)
        self.assertIsNone(self.throttle.refused_for("192.0.2.1", 0, 60.0))

    def test_memory_bounded(self) -> None:
        """Past max_tracked, closed windows go first, then the oldest addresses."""
        self.throttle = LoginThrottle(self.clock, max_tracked=4)
        self.fail_logins("192.0.2.1", 3, window=10.0)
        self.clock.advance(20)  # 192.0.2.1's window is closed now
        for n in (2, 3, 4):
            self.fail_logins(f"192.0.2.{n}", 3, window=10.0)
        self.fail_logins("192.0.2.5", 3, window=10.0)
        # The closed window made room; the open ones are all still counted.
        for n in (2, 3, 4, 5):
            self.assertIsNotNone(self.throttle.refused_for(f"192.0.2.{n}", 3, 10.0), n)
        self.fail_logins("192.0.2.6", 3, window=10.0)
        # No closed window left: the oldest half went.
        self.assertIsNone(self.throttle.refused_for("192.0.2.2", 3, 10.0))
        self.assertIsNone(self.throttle.refused_for("192.0.2.3", 3, 10.0))
        self.assertIsNone(self.throttle.refused_for("192.0.2.4", 3, 10.0))
        self.assertIsNotNone(self.throttle.refused_for("192.0.2.5", 3, 10.0))
        self.assertIsNotNone(self.throttle.refused_for("192.0.2.6", 3, 10.0))
        self.assertLessEqual(len(self.throttle._windows), 4)

    def test_check_raises_429_with_whole_seconds(self) -> None:
        """check() lets an address under the limit through and refuses one at it (429)."""
        self.fail_logins("192.0.2.1", 2)
        self.throttle.check("192.0.2.1", 3, 60.0)
        self.clock.advance(0.4)
        self.fail_logins("192.0.2.1", 1)
        error = self.assertRaises(TooManyRequests, self.throttle.check, "192.0.2.1", 3, 60.0)
        self.assertEqual((error.status, error.retry_after), (429, 60))
        self.assertIn("192.0.2.1", error.reason)
        self.throttle.check("192.0.2.1", 0, 60.0)  # no limit

    def test_checks_in_progress_say_so(self) -> None:
        """
        Refused because checks still running fill the limit (many users behind one
        address logging in at once, all of whom may be valid), the 429 says that, not
        "failed logins"; refused for real failures, it says failed.
        """
        for user in range(3):
            self.throttle.begin("192.0.2.1", ("user", user))
        error = self.assertRaises(
            TooManyRequests, self.throttle.check, "192.0.2.1", 3, 60.0, ("user", 9)
        )
        self.assertIn("being checked at once", error.reason)
        self.assertNotIn("failed", error.reason)
        self.assertEqual(error.retry_after, 1)
        for user in range(3):
            self.throttle.end("192.0.2.1", ("user", user), True, 60.0)
        error = self.assertRaises(TooManyRequests, self.throttle.check, "192.0.2.1", 3, 60.0)
        self.assertIn("too many failed proxy logins", error.reason)

    def test_admit_waits_while_checks_fill_the_limit(self) -> None:
        """
        admit() lets a login through, makes it wait while checks in progress fill the
        limit (waking it when one ends), and refuses it for real failures.
        """
        throttle = self.throttle
        self.assertIsNone(throttle.admit("192.0.2.1", 2, 60.0, "a"))
        throttle.begin("192.0.2.1", "a")
        self.assertIsNone(throttle.admit("192.0.2.1", 2, 60.0, "b"))
        throttle.begin("192.0.2.1", "b")
        waiting = throttle.admit("192.0.2.1", 2, 60.0, "c")
        assert waiting is not None
        self.assertNoResult(waiting)
        self.assertIsNone(throttle.admit("192.0.2.1", 2, 60.0, "a"))  # joins its check
        throttle.end("192.0.2.1", "a", False, 60.0)
        self.successResultOf(waiting)
        self.assertIsNone(throttle.admit("192.0.2.1", 2, 60.0, "c"))
        throttle.end("192.0.2.1", "b", True, 60.0)
        throttle.failed("192.0.2.1", 60.0)
        self.assertRaises(TooManyRequests, throttle.admit, "192.0.2.1", 2, 60.0, "d")

    def test_admit_bounds_and_forgets_waiters(self) -> None:
        """At most MAX_WAITING wait per address; a cancelled wait is forgotten."""
        throttle = self.throttle
        throttle.begin("192.0.2.1", "a")
        waits = [throttle.admit("192.0.2.1", 1, 60.0, f"w{i}") for i in range(throttle.MAX_WAITING)]
        self.assertNotIn(None, waits)
        error = self.assertRaises(TooManyRequests, throttle.admit, "192.0.2.1", 1, 60.0, "x")
        self.assertIn("being checked at once", error.reason)
        for d in waits:
            assert d is not None
            d.cancel()
            self.failureResultOf(d)
        self.assertEqual(throttle._waiters, {})
