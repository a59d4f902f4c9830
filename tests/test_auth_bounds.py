"""
The login throttle and the password checks under load (issue #12, items 5 and 14): a guess
counts when its check starts, checks of one credential are joined, checks whose clients
left are dropped before they run, each address has a bounded share of the hashing, and
an unknown user costs a hash of the file's own kind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from aproxy.access.auth import HtpasswdAuthenticator
from aproxy.access.htpasswd import _MD5CryptHash, decoy_for, parse_file
from aproxy.access.throttle import LoginThrottle
from aproxy.config import ProxyConfig
from aproxy.errors import ServiceUnavailable, TooManyRequests
from aproxy.testing import HalfCloseTransport
from aproxy.workpool import FairQueue, as_client
from tests.hashes import APR1, BCRYPT_2B, BCRYPT_2Y, SHA1, SHA256
from tests.support import GET_A, ProxyTestCase, basic, with_auth


class HeldHasher:
    """Stands in for the hashing threads: each hash waits until the test runs it."""

    def __init__(self) -> None:
        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.calls = 0

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        """Hold C{f(*args)} for the test."""
        self.calls += 1
        d: Deferred[Any] = Deferred()
        self.held.append((d, f, args))
        return d

    def run_all(self) -> None:
        """Run every held hash (and those they let start) until none is left."""
        while self.held:
            d, f, args = self.held.pop(0)
            d.callback(f(*args))


class _FileCase(SynchronousTestCase):
    """A temporary password file."""

    def password_file(self, text: str) -> str:
        """Write C{text} to a new password file and return its path."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "htpasswd")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class JoinAndDropTests(_FileCase):
    """L{HtpasswdAuthenticator} joins checks of one credential and drops abandoned ones."""

    def setUp(self) -> None:
        self.hasher = HeldHasher()
        path = self.password_file(f"alice:{BCRYPT_2Y}\nbob:{BCRYPT_2B}\n")
        self.auth = HtpasswdAuthenticator(path, hash_in_thread=self.hasher)
        self.hashing = self.auth.hashing

    def test_same_credential_is_one_check(self) -> None:
        """
        Ten requests with one good password, however spelled, while its check runs are
        one hash, and all ten get the user.
        """
        spellings = [
            basic("alice", "alice-secret", scheme=b"basic"),
            basic("alice", "alice-secret"),
        ]
        results = [self.auth.authenticate(spellings[i % 2]) for i in range(10)]
        self.assertEqual(self.hasher.calls, 1)
        self.hasher.run_all()
        self.assertEqual([self.successResultOf(d) for d in results], ["alice"] * 10)
        self.assertEqual(self.hasher.calls, 1)

    def test_one_waiter_leaving_keeps_the_check(self) -> None:
        """A request that gives up leaves the check to the others still waiting."""
        first = self.auth.authenticate(basic("alice", "alice-secret"))
        second = self.auth.authenticate(basic("alice", "alice-secret"))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.hasher.run_all()
        self.assertEqual(self.successResultOf(second), "alice")

    def test_abandoned_waiting_checks_never_run(self) -> None:
        """
        Checks whose requests all gave up before a thread was free are dropped: no hash
        runs for clients already gone (72 did in issue #12).
        """
        guesses = [
            as_client("192.0.2.7", self.auth.authenticate, basic("bob", f"guess{i}"))
            for i in range(6)
        ]
        running = self.hashing.client_running
        self.assertEqual(self.hasher.calls, running)
        for d in guesses:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.hashing.dropped, 6 - running)
        self.hasher.run_all()
        self.assertEqual(self.hasher.calls, running)
        self.assertEqual((self.hashing.running, self.hashing.queued), (0, 0))

    def test_client_bound(self) -> None:
        """
        One address may have a bounded number of checks waiting or running; past it the
        check fails with 429 at once and nothing is hashed.
        """
        bound = self.hashing.client_jobs
        for i in range(bound):
            as_client("192.0.2.7", self.auth.authenticate, basic("bob", f"g{i}"))
        refused = as_client("192.0.2.7", self.auth.authenticate, basic("bob", "one more"))
        failure = self.failureResultOf(refused, TooManyRequests)
        self.assertEqual(failure.value.status, 429)
        other = as_client("192.0.2.8", self.auth.authenticate, basic("bob", "x"))
        self.assertNoResult(other)

    def test_queue_bound(self) -> None:
        """When every address together fills the queue, the next check gets 503."""
        path = self.password_file(f"bob:{BCRYPT_2B}\n")
        auth = HtpasswdAuthenticator(
            path, hash_in_thread=self.hasher, hashing=FairQueue(1, 2, 1, 5)
        )
        for i in range(3):
            as_client(f"192.0.2.{i}", auth.authenticate, basic("bob", f"x{i}"))
        failure = self.failureResultOf(
            as_client("192.0.2.9", auth.authenticate, basic("bob", "y")), ServiceUnavailable
        )
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(failure.value.error_type, "proxy_internal_response")


class DecoyTests(_FileCase):
    """An unknown user costs a hash of the kind the file's users have (item 14)."""

    def test_apr1_file_unknown_user_costs_an_apr1_hash(self) -> None:
        """
        With only C{$apr1$} users, an unknown name is checked against an apr1 hash off the
        reactor, like a known one (it was answered at once: 0.3 ms against 1.5 ms).
        """
        hasher = HeldHasher()
        path = self.password_file(f"carol:{APR1}\n")
        auth = HtpasswdAuthenticator(path, hash_in_thread=hasher)
        unknown = auth.authenticate(basic("mallory", "carol pässword"))
        known = auth.authenticate(basic("carol", "wrong"))
        self.assertEqual(hasher.calls, 2)
        self.assertEqual(
            [type(f.__self__) for _, f, _ in hasher.held], [_MD5CryptHash, _MD5CryptHash]
        )
        hasher.run_all()
        # The decoy's own password is right for carol, but never admits another name.
        self.assertIsNone(self.successResultOf(unknown))
        self.assertIsNone(self.successResultOf(known))

    def test_decoy_is_of_the_most_common_kind(self) -> None:
        """In a mixed file the decoy has the algorithm and cost most users have."""
        users = parse_file(
            "f", f"a:{BCRYPT_2Y}\nb:{APR1}\nc:{SHA256}\nd:{APR1}\ne:{SHA1}\n".encode()
        )
        self.assertIs(decoy_for(users), users["b"])
        self.assertIsNone(decoy_for({}))

    def test_sha1_file_unknown_user_costs_a_sha1(self) -> None:
        """With only C{{SHA}} users the decoy is a C{{SHA}} hash too (checked at once)."""
        users = parse_file("f", f"e:{SHA1}\n".encode())
        self.assertIs(decoy_for(users), users["e"])


class ThrottleAtStartTests(ProxyTestCase):
    """Through the proxy: guesses count when their check starts (item 5)."""

    config = ProxyConfig(auth_max_failures=10, auth_failure_window=60.0)

    def setUp(self) -> None:
        super().setUp()
        self.hasher = HeldHasher()
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "htpasswd")
        with open(path, "w") as f:
            f.write(f"alice:{BCRYPT_2Y}\n")
        self.factory.authenticator = HtpasswdAuthenticator(
            path, clock=self.clock, hash_in_thread=self.hasher, hashing=FairQueue(4, 500, 4, 500)
        )
        self.clients: list[HalfCloseTransport] = []

    def send(self, credentials: bytes, peer: str = "127.0.0.66") -> Any:
        """One request on a new connection from C{peer}; returns its protocol."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", peer, 5000))
        proto.makeConnection(client)
        proto.dataReceived(with_auth(GET_A, credentials))
        self.clients.append(client)
        return proto

    def statuses(self) -> list[bytes]:
        """The status code each client got so far (b"" for none yet)."""
        return [c.value()[9:12] for c in self.clients]

    def test_burst_of_wrong_guesses_gets_limit_checks(self) -> None:
        """
        250 simultaneous wrong passwords from one address start 10 checks (the limit);
        64 more wait for those to end and the other 176 get 429 at once; once the 10
        have failed, the waiting ones get 429 too, unchecked. (Counted after the hash,
        178 ran.)
        """
        for i in range(250):
            self.send(basic("alice", f"guess-{i}"))
        started = self.factory.authenticator.hashing.started  # type: ignore[union-attr]
        queued = self.factory.authenticator.hashing.queued  # type: ignore[union-attr]
        self.assertEqual(started + queued, 10)
        self.assertEqual(self.statuses().count(b"429"), 250 - 10 - LoginThrottle.MAX_WAITING)
        self.hasher.run_all()
        self.assertEqual(self.statuses().count(b"407"), 10)
        self.assertEqual(self.statuses().count(b"429"), 240)
        self.assertEqual(self.hasher.calls, 10)

    def test_distinct_valid_logins_wait_their_turn(self) -> None:
        """Five different valid users, limit 3: three checks run, two wait, all get in."""
        self.factory.config = ProxyConfig(auth_max_failures=3)
        users = [(f"user{i}", f"secret-{i}") for i in range(5)]
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "htpasswd")
        with open(path, "w") as f:
            for user, password in users:
                digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
                f.write(f"{user}:{digest}\n")
        self.factory.authenticator = HtpasswdAuthenticator(
            path, clock=self.clock, hash_in_thread=self.hasher, hashing=FairQueue(8, 500, 8, 500)
        )
        for user, password in users:
            self.send(basic(user, password))
        self.assertEqual(self.hasher.calls, 3)
        self.assertNotIn(b"429", self.statuses())
        self.hasher.run_all()
        self.assertEqual(self.hasher.calls, 5)
        self.assertEqual(len(self.connector.attempts), 5)
        self.assertNotIn(b"429", self.statuses())

    def test_check_outlasting_the_timer_is_answered(self) -> None:
        """
        A request whose password check does not end before the connection's timer is
        answered 503 (not closed silently as an idle connection would be).
        """
        self.send(basic("alice", "guess-1"))
        self.clock.advance(self.config.idle_timeout)
        self.assertEqual(self.statuses(), [b"503"])
        self.assertIn(b"could not check your credentials in time", self.clients[0].value())

    def test_waiting_login_dropped_when_client_leaves(self) -> None:
        """A request waiting for a check slot whose client leaves is forgotten."""
        self.factory.config = ProxyConfig(auth_max_failures=2)
        self.send(basic("alice", "guess-1"))
        self.send(basic("alice", "guess-2"))
        waiting = self.send(basic("alice", "guess-3"))
        self.assertEqual(self.hasher.calls, 2)
        waiting.connectionLost()
        self.hasher.run_all()
        self.assertEqual(self.hasher.calls, 2)
        self.assertEqual(self.statuses(), [b"407", b"407", b""])

    def test_ten_connections_one_good_password(self) -> None:
        """
        A browser opening ten connections with one good password is one check and no
        failure, even with a limit below ten.
        """
        self.factory.config = ProxyConfig(auth_max_failures=3)
        for i in range(10):
            scheme = b"Basic" if i % 2 else b"basic"
            self.send(basic("alice", "alice-secret", scheme=scheme))
        self.assertEqual(self.hasher.calls, 1)
        self.assertNotIn(b"429", self.statuses())
        self.hasher.run_all()
        self.assertEqual(len(self.connector.attempts), 10)
        self.assertIsNone(self.factory.login_throttle.refused_for("127.0.0.66", 1, 60.0))

    def test_departed_clients_hashes_dropped(self) -> None:
        """Clients that leave while their check waits cost no hash."""
        protos = [self.send(basic("alice", f"guess-{i}")) for i in range(8)]
        self.assertEqual(self.hasher.calls, 4)
        for proto in protos:
            proto.connectionLost()
        self.hasher.run_all()
        self.assertEqual(self.hasher.calls, 4)
        # The abandoned guesses still count: leaving doesn't buy more tries.
        left = self.factory.login_throttle.refused_for("127.0.0.66", 8, 60.0)
        self.assertIsNotNone(left)

    def test_clients_closing_drop_their_waiting_hashes(self) -> None:
        """
        Clients that close (a FIN: the proxy sees a half-close) while their checks wait
        for a thread cost no hash, and their guesses still count.
        """
        self.factory.authenticator.hashing = FairQueue(4, 500, 2, 500)  # type: ignore[union-attr]
        protos = [self.send(basic("alice", f"guess-{i}")) for i in range(8)]
        self.assertEqual(self.hasher.calls, 2)
        for proto in protos:
            proto.readConnectionLost()
        self.hasher.run_all()
        self.assertEqual(self.hasher.calls, 2)
        self.assertIsNotNone(self.factory.login_throttle.refused_for("127.0.0.66", 8, 60.0))

    def test_valid_login_does_not_reset(self) -> None:
        """A valid login between wrong guesses leaves the failures counted."""
        for i in range(9):
            self.send(basic("alice", f"guess-{i}"))
        self.hasher.run_all()
        self.send(basic("alice", "alice-secret"))
        self.hasher.run_all()
        self.send(basic("alice", "guess-x"))
        self.hasher.run_all()
        self.send(basic("alice", "alice-secret"))
        self.assertEqual(self.statuses()[-1], b"429")

    def test_refusal_by_the_hash_bound_is_answered(self) -> None:
        """A check refused by the per-address bound gets 429 and counts no failure."""
        self.factory.config = ProxyConfig(auth_max_failures=0)
        hashing = HtpasswdAuthenticator.default_hashing()
        hashing.slots = hashing.client_running = 1
        hashing.client_jobs = 2
        self.factory.authenticator.hashing = hashing  # type: ignore[union-attr]
        for i in range(3):
            self.send(basic("alice", f"guess-{i}"))
        self.assertEqual(self.statuses(), [b"", b"", b"429"])
        self.assertIn(b"too many password checks pending for 127.0.0.66", self.clients[2].value())


class SharedAcrossReloadTests(_FileCase):
    """A reload keeps the bounds: new authenticator and connector use the same queues."""

    def test_reconfigure_keeps_queues(self) -> None:
        """After SIGHUP's reconfigure, password checks and lookups count in the same queues."""
        from twisted.internet.testing import MemoryReactorClock

        from aproxy.client.factory import ProxyFactory
        from aproxy.upstream.connector import EndpointConnector

        path = self.password_file(f"alice:{BCRYPT_2Y}\n")
        factory = ProxyFactory(ProxyConfig(auth=path), MemoryReactorClock())
        hashing, lookups = factory.hashing, factory.lookups
        factory.reconfigure(ProxyConfig(auth=path, block_private=True))
        assert isinstance(factory.authenticator, HtpasswdAuthenticator)
        assert isinstance(factory.connector, EndpointConnector)
        self.assertIs(factory.authenticator.hashing, hashing)
        self.assertIs(factory.connector.lookups, lookups)
