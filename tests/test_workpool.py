"""
Tests for L{aproxy.workpool}: bounded, fairly shared work with jobs dropped when their
caller gives up (issue #12, item 2).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from aproxy.workpool import FairQueue, WorkRefused, as_client, current_client


class Jobs:
    """Jobs a test finishes by hand: each start is recorded with its Deferred."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Deferred[Any]]] = []

    def job(self, label: str) -> Any:
        """A job start function that records C{label} and waits for the test."""

        def start() -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.started.append((label, d))
            return d

        return start

    def labels(self) -> list[str]:
        """The labels of the jobs started so far, in order."""
        return [label for label, _ in self.started]

    def finish(self, label: str, result: object = None) -> None:
        """Finish the running job C{label} with C{result}."""
        for name, d in self.started:
            if name == label and not d.called:
                d.callback(result)
                return
        raise AssertionError(f"{label} is not running")


class FairQueueTests(SynchronousTestCase):
    """L{FairQueue} bounds jobs per client and per name and shares slots in turn."""

    def setUp(self) -> None:
        self.jobs = Jobs()

    def test_runs_at_most_slots_jobs(self) -> None:
        """Only C{slots} jobs run at once; the next one starts when one finishes."""
        queue = FairQueue(2, 10, 5, 10)
        results = [queue.submit(self.jobs.job(str(i)), f"c{i}") for i in range(3)]
        self.assertEqual(self.jobs.labels(), ["0", "1"])
        self.jobs.finish("0", "zero")
        self.assertEqual(self.successResultOf(results[0]), "zero")
        self.assertEqual(self.jobs.labels(), ["0", "1", "2"])
        self.assertEqual((queue.running, queue.queued, queue.started), (2, 0, 3))

    def test_clients_take_turns(self) -> None:
        """
        A client with a long queue doesn't delay another: free slots go to the waiting
        clients in turn.
        """
        queue = FairQueue(1, 20, 1, 20)
        for i in range(5):
            queue.submit(self.jobs.job(f"a{i}"), "attacker")
        queue.submit(self.jobs.job("v"), "victim")
        self.assertEqual(self.jobs.labels(), ["a0"])
        self.jobs.finish("a0")
        self.assertEqual(self.jobs.labels(), ["a0", "v"])

    def test_client_running_bound(self) -> None:
        """
        A client never has more than C{client_running} jobs running, so jobs that never
        end (a stuck lookup) can't take every slot.
        """
        queue = FairQueue(4, 20, 2, 20)
        for i in range(4):
            queue.submit(self.jobs.job(f"a{i}"), "attacker")
        self.assertEqual(self.jobs.labels(), ["a0", "a1"])
        queue.submit(self.jobs.job("v"), "victim")
        self.assertEqual(self.jobs.labels(), ["a0", "a1", "v"])

    def test_name_running_bound(self) -> None:
        """At most C{name_running} jobs for one name run at once, whoever asks."""
        queue = FairQueue(4, 20, 4, 20, name_running=1)
        queue.submit(self.jobs.job("s1"), "c1", "slow.example")
        queue.submit(self.jobs.job("s2"), "c2", "slow.example")
        queue.submit(self.jobs.job("f"), "c3", "fast.example")
        self.assertEqual(self.jobs.labels(), ["s1", "f"])
        self.jobs.finish("s1")
        self.assertEqual(self.jobs.labels(), ["s1", "f", "s2"])

    def test_refusals(self) -> None:
        """Past a bound a job is refused at once with the scope of the bound."""
        queue = FairQueue(1, 3, 1, 2, name_jobs=2)
        queue.submit(self.jobs.job("a"), "a", "n1")
        queue.submit(self.jobs.job("b"), "a", "n2")
        refused = self.failureResultOf(queue.submit(self.jobs.job("c"), "a"), WorkRefused)
        self.assertEqual(refused.value.scope, "client")
        self.assertIn("for a", refused.value.reason)
        queue.submit(self.jobs.job("d"), "b", "n1")
        refused = self.failureResultOf(queue.submit(self.jobs.job("e"), "c", "n1"), WorkRefused)
        self.assertEqual(refused.value.scope, "name")
        queue.submit(self.jobs.job("f"), "c")
        refused = self.failureResultOf(queue.submit(self.jobs.job("h"), "e"), WorkRefused)
        self.assertEqual(refused.value.scope, "queue")
        self.assertEqual(self.jobs.labels(), ["a"])

    def test_cancelled_waiting_job_is_dropped(self) -> None:
        """A waiting job whose caller gave up never starts and frees its place."""
        queue = FairQueue(1, 10, 1, 2)
        queue.submit(self.jobs.job("first"), "a")
        waiting = queue.submit(self.jobs.job("gone"), "a")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual((queue.queued, queue.dropped), (0, 1))
        # Its place is free again for the same client.
        queue.submit(self.jobs.job("next"), "a")
        self.jobs.finish("first")
        self.assertEqual(self.jobs.labels(), ["first", "next"])

    def test_cancelled_running_job_keeps_its_slot(self) -> None:
        """
        A running job can't be stopped: cancelling only detaches the caller, and the
        slot stays taken until the job really ends (its result is dropped).
        """
        queue = FairQueue(1, 10, 1, 5)
        running = queue.submit(self.jobs.job("stuck"), "a")
        after = queue.submit(self.jobs.job("after"), "b")
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual(self.jobs.labels(), ["stuck"])
        self.jobs.finish("stuck", "late")
        self.assertEqual(self.jobs.labels(), ["stuck", "after"])
        self.assertNoResult(after)

    def test_failing_job(self) -> None:
        """A job that raises or fails passes its failure on and frees its slot."""
        queue = FairQueue(1, 10, 1, 5)

        def broken() -> Deferred[Any]:
            raise ValueError("boom")

        self.failureResultOf(queue.submit(broken, "a"), ValueError)
        self.assertEqual(queue.running, 0)

    def test_as_client(self) -> None:
        """L{as_client} sets L{current_client} for the call only."""
        seen = as_client("192.0.2.1", current_client.get)
        self.assertEqual(seen, "192.0.2.1")
        self.assertIsNone(current_client.get())
