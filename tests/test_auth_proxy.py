"""Proxy authentication end to end: 407 challenges, credentials checked, never forwarded."""

from __future__ import annotations

import base64
import shutil
import socket
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from aproxy.access.auth import IAuthenticator
from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.testing import HalfCloseTransport
from tests.hashes import APR1, BCRYPT_2Y, SHA1, SHA256, SHA512
from tests.support import GET_A, OK_5, ProxyTestCase, with_auth


def basic(user: str, password: str) -> bytes:
    """A Proxy-Authorization value for C{user} and C{password}."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@implementer(IAuthenticator)
class FakeAuthenticator:
    """Knows one credential; can hold its answer back to test the asynchronous path."""

    realm = "test realm"

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.pending: list[tuple[Deferred[str | None], bytes | None]] = []
        self.checked = 0

    def authenticate(self, credentials: bytes | None) -> Deferred[str | None]:
        """Accept C{basic("u", "p")} only."""
        self.checked += 1
        user = "u" if credentials == basic("u", "p") else None
        if not self.hold:
            return succeed(user)
        d: Deferred[str | None] = Deferred()
        self.pending.append((d, credentials))
        return d


class AuthProtocolTests(ProxyTestCase):
    """ProxyProtocol asks the authenticator before doing anything with a request."""

    def setUp(self) -> None:
        super().setUp()
        self.auth = FakeAuthenticator()
        self.factory.authenticator = self.auth

    def test_missing_credentials_get_407(self) -> None:
        """A request without credentials gets 407 with a challenge, and nothing is dialed."""
        self.proto.dataReceived(GET_A)
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"))
        self.assertIn(b'Proxy-Authenticate: Basic realm="test realm"', value)
        self.assertEqual(self.connector.attempts, [])
        self.assertTrue(self.client.disconnecting)

    def test_wrong_or_malformed_credentials_get_407(self) -> None:
        """Wrong, malformed or repeated credentials all get 407, never a 500."""
        for credentials in (basic("u", "x"), b"Basic !!!", b"Bearer abc", b""):
            client, proto = self.connect_client()
            proto.dataReceived(with_auth(GET_A, credentials))
            self.assertTrue(client.value().startswith(b"HTTP/1.1 407 "), credentials)
        client, proto = self.connect_client()
        twice = with_auth(with_auth(GET_A, basic("u", "p")), basic("u", "p"))
        proto.dataReceived(twice)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 407 "))

    def test_valid_credentials_forwarded_without_them(self) -> None:
        """Valid credentials let the request through, and they never reach the origin."""
        attempt, upstream = self.forward(with_auth(GET_A, basic("u", "p")))
        self.assertNotIn(b"Proxy-Authorization", upstream.value())
        attempt.respond(OK_5)
        self.assertTrue(self.client.value().endswith(b"hello"))
        self.assertEqual(self.proto.user, "u")

    def test_connect_needs_credentials(self) -> None:
        """CONNECT is authenticated like any request."""
        self.proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 407 "))
        client, proto = self.connect_client()
        proto.dataReceived(
            with_auth(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", basic("u", "p"))
        )
        self.assertEqual(len(self.connector.attempts), 1)

    def test_slow_check_holds_bytes(self) -> None:
        """
        While credentials are checked off-thread the client's next bytes are held, not
        acted on, and the client is still read (so a client that leaves is noticed).
        """
        self.auth.hold = True
        self.proto.dataReceived(with_auth(GET_A, basic("u", "p")))
        self.assertEqual(self.client.producerState, "producing")
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.connector.attempts, [])
        [(d, _)] = self.auth.pending
        d.callback("u")
        attempt = self.connector.attempts[0]
        attempt.succeed()
        self.assertEqual(self.client.producerState, "producing")
        attempt.respond(OK_5)
        # The held pipelined request is read next; it has no credentials.
        [_, (d2, credentials)] = self.auth.pending
        self.assertIsNone(credentials)

    def test_held_bytes_bounded_during_check(self) -> None:
        """Past the hold bound the client is paused until the check is answered."""
        self.auth.hold = True
        self.proto.dataReceived(with_auth(GET_A, basic("u", "p")))
        self.proto.dataReceived(b"x" * 70000)
        self.assertEqual(self.client.producerState, "paused")

    def test_half_close_during_check_drops_it(self) -> None:
        """
        A client that closes while its credentials wait to be checked is taken as gone:
        the check is cancelled (a queued hash never runs) and the connection closed.
        """
        self.auth.hold = True
        self.proto.dataReceived(with_auth(GET_A, basic("u", "p")))
        [(d, _)] = self.auth.pending
        self.proto.readConnectionLost()
        # Cancelled: fired (with CancelledError, which the proxy consumed).
        self.assertTrue(d.called)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.value(), b"")

    def test_client_gone_during_check(self) -> None:
        """A client that leaves while its credentials are checked is simply forgotten."""
        self.auth.hold = True
        self.proto.dataReceived(with_auth(GET_A, basic("u", "p")))
        self.proto.connectionLost()
        [(d, _)] = self.auth.pending
        d.callback("u")
        self.assertEqual(self.connector.attempts, [])


class LoginThrottleProtocolTests(ProxyTestCase):
    """Too many failed logins from one address get 429 without a password check."""

    config = ProxyConfig(auth_max_failures=3, auth_failure_window=60.0)

    def setUp(self) -> None:
        super().setUp()
        self.auth = FakeAuthenticator()
        self.factory.authenticator = self.auth

    def attempt(self, credentials: bytes | None, peer: str = "127.0.0.1") -> bytes:
        """One request on a new connection from C{peer}; what the proxy answered."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", peer, 5000))
        proto.makeConnection(client)
        request = GET_A if credentials is None else with_auth(GET_A, credentials)
        proto.dataReceived(request)
        value: bytes = client.value()
        return value

    def test_refused_after_the_limit(self) -> None:
        """The attempt after 3 failures gets 429 with Retry-After, and no check runs."""
        for _ in range(3):
            self.assertTrue(self.attempt(basic("u", "x")).startswith(b"HTTP/1.1 407 "))
        self.clock.advance(10)
        checked = self.auth.checked
        answer = self.attempt(basic("u", "p"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer)
        self.assertIn(b"\r\nRetry-After: 50\r\n", answer)
        self.assertIn(b"too many failed proxy logins from 127.0.0.1", answer)
        self.assertEqual(self.auth.checked, checked)
        self.assertEqual(self.connector.attempts, [])

    def test_other_addresses_unaffected(self) -> None:
        """Another client address still gets its credentials checked."""
        for _ in range(3):
            self.attempt(basic("u", "x"))
        answer = self.attempt(basic("u", "p"), peer="127.0.0.2")
        self.assertFalse(answer.startswith(b"HTTP/1.1 429 "), answer)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_window_closes(self) -> None:
        """Once the window has passed, the address may log in again."""
        for _ in range(3):
            self.attempt(basic("u", "x"))
        self.clock.advance(60)
        self.attempt(basic("u", "p"))
        self.assertEqual(len(self.connector.attempts), 1)

    def test_challenge_step_not_counted(self) -> None:
        """Requests without credentials (the first step of every login) are not failures."""
        for _ in range(10):
            self.assertTrue(self.attempt(None).startswith(b"HTTP/1.1 407 "))
        self.attempt(basic("u", "p"))
        self.assertEqual(len(self.connector.attempts), 1)

    def test_valid_login_does_not_reset(self) -> None:
        """A valid login in between does not give a guesser a fresh count."""
        for _ in range(2):
            self.attempt(basic("u", "x"))
        self.attempt(basic("u", "p"))
        self.attempt(basic("u", "x"))
        self.assertTrue(self.attempt(basic("u", "p")).startswith(b"HTTP/1.1 429 "))

    def test_counted_when_client_left_during_check(self) -> None:
        """A guess whose client left before the answer still counts."""
        self.auth.hold = True
        for _ in range(3):
            proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
            proto.makeConnection(
                HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
            )
            proto.dataReceived(with_auth(GET_A, basic("u", "x")))
            proto.connectionLost()
        for d, _ in self.auth.pending:
            d.callback(None)
        self.auth.hold = False
        self.assertTrue(self.attempt(basic("u", "p")).startswith(b"HTTP/1.1 429 "))


class NoLoginThrottleTests(LoginThrottleProtocolTests):
    """With auth_max_failures=0 nothing is refused."""

    config = ProxyConfig(auth_max_failures=0)

    def test_refused_after_the_limit(self) -> None:
        """Any number of failures, and the next valid login still goes through."""
        for _ in range(20):
            self.attempt(basic("u", "x"))
        self.attempt(basic("u", "p"))
        self.assertEqual(len(self.connector.attempts), 1)

    def test_valid_login_does_not_reset(self) -> None:
        """Nothing to reset: never refused."""
        for _ in range(5):
            self.attempt(basic("u", "x"))
        self.assertFalse(self.attempt(basic("u", "p")).startswith(b"HTTP/1.1 429 "))

    def test_counted_when_client_left_during_check(self) -> None:
        """Not counted against anything: the next valid login works."""
        self.test_valid_login_does_not_reset()


class _Origin(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")  # type: ignore[union-attr]


def fetch(proxy_port: int, origin_port: int, credentials: bytes | None) -> bytes:
    """Send one GET through the proxy with optional credentials; return the status line."""
    auth = b"Proxy-Authorization: " + credentials + b"\r\n" if credentials else b""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as sock:
        sock.sendall(
            b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\n%bConnection: close\r\n\r\n"
            % (origin_port, auth)
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


class AuthIntegrationTests(TestCase):
    """A real proxy with a real htpasswd file, one user per hash format."""

    timeout = 60

    @inlineCallbacks
    def test_each_hash_format_end_to_end(self) -> Generator[Any, Any, None]:
        """Every supported format admits its user with the right password only."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = Path(tmp) / "htpasswd"
        users = {
            "alice": ("alice-secret", BCRYPT_2Y),
            "carol": ("carol pässword", APR1),
            "erin": ("erin-secret", SHA1),
            "frank": ("frank-secret", SHA256),
            "grace": ("grace-secret", SHA512),
        }
        path.write_text("".join(f"{u}:{h}\n" for u, (_, h) in users.items()))
        origin = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(_Origin)
        )
        self.addCleanup(origin.stopListening)
        factory = ProxyFactory(ProxyConfig(auth=str(path)), reactor)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.pool.close)
        pport, oport = port.getHost().port, origin.getHost().port
        for user, (password, _) in users.items():
            ok = yield deferToThread(fetch, pport, oport, basic(user, password))
            self.assertEqual(ok, b"HTTP/1.1 200 OK", user)
            bad = yield deferToThread(fetch, pport, oport, basic(user, password + "x"))
            self.assertEqual(bad, b"HTTP/1.1 407 Proxy Authentication Required", user)
        none = yield deferToThread(fetch, pport, oport, None)
        self.assertEqual(none, b"HTTP/1.1 407 Proxy Authentication Required")

    @inlineCallbacks
    def test_guessing_refused(self) -> Generator[Any, Any, None]:
        """A real proxy: after 2 wrong passwords the third attempt gets 429."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = Path(tmp) / "htpasswd"
        path.write_text(f"erin:{SHA1}\n")
        origin = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(_Origin)
        )
        self.addCleanup(origin.stopListening)
        config = ProxyConfig(auth=str(path), auth_max_failures=2)
        factory = ProxyFactory(config, reactor)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.pool.close)
        pport, oport = port.getHost().port, origin.getHost().port
        ok = yield deferToThread(fetch, pport, oport, basic("erin", "erin-secret"))
        self.assertEqual(ok, b"HTTP/1.1 200 OK")
        for _ in range(2):
            bad = yield deferToThread(fetch, pport, oport, basic("erin", "guess"))
            self.assertEqual(bad, b"HTTP/1.1 407 Proxy Authentication Required")
        refused = yield deferToThread(fetch, pport, oport, basic("erin", "erin-secret"))
        self.assertEqual(refused, b"HTTP/1.1 429 Too Many Requests")
