"""
One configuration per request (issue #13, item 2): a request runs on the L{Runtime} in
force when it started; a reload gives the next request, on any connection, the new one.
"""

from __future__ import annotations

from aproxy.client.runtime import Runtime
from aproxy.config import ProxyConfig
from tests.support import OK_5, ProxyTestCase

CONNECT_8443 = b"CONNECT example.com:8443 HTTP/1.1\r\nHost: example.com:8443\r\n\r\n"
GET_A = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"
GET_B = b"GET http://b.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"


class ReloadPerRequestTests(ProxyTestCase):
    """A keep-alive connection opened before a reload gets the new rules on its next request."""

    def test_port_added_by_reload_reaches_open_connection(self) -> None:
        """
        After a reload adds 8443 to connect-ports, a CONNECT to 8443 on a connection
        opened before it is dialed (it used to get 403 naming --connect-ports).
        """
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.take(self.client)
        self.factory.reconfigure(ProxyConfig(connect_ports=((443, 443), (8443, 8443))))
        self.proto.dataReceived(CONNECT_8443)
        self.assertNotIn(b"403", self.client.value())
        self.assertEqual(
            (self.connector.attempts[-1].host, self.connector.attempts[-1].port),
            ("example.com", 8443),
        )

    def test_rule_removed_by_reload(self) -> None:
        """A destination a reload stops denying is served on a connection opened before."""
        self.factory.reconfigure(ProxyConfig(deny_host=("a.example",)))
        self.factory.via = b"aproxy"
        attempt, _ = self.forward(GET_B)
        attempt.respond(OK_5)
        self.take(self.client)
        self.factory.reconfigure(ProxyConfig())
        self.proto.dataReceived(GET_A)
        self.assertEqual(self.connector.attempts[-1].host, "a.example")
        self.assertEqual(self.client.value(), b"")

    def test_rule_added_by_reload(self) -> None:
        """A destination a reload starts denying gets 403 on a connection opened before."""
        attempt, _ = self.forward(GET_A)
        attempt.respond(OK_5)
        self.take(self.client)
        self.factory.reconfigure(ProxyConfig(deny_host=("a.example",)))
        self.proto.dataReceived(GET_A)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 403 "))

    def test_request_in_flight_keeps_its_runtime(self) -> None:
        """
        A request started before a reload finishes on the runtime it started with (its
        response carries the old Via name); the next one takes the new runtime.
        """
        self.factory.reconfigure(ProxyConfig(via="old"))
        self.client, self.proto = self.connect_client()
        self.proto.dataReceived(GET_A)
        before = self.factory.runtime
        self.factory.reconfigure(ProxyConfig(via="new"))
        self.assertIsNot(self.factory.runtime, before)
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(OK_5)
        self.assertIn(b"Via: 1.1 old (", self.take(self.client))
        self.assertIs(self.proto.runtime, before)
        self.proto.dataReceived(GET_A)
        attempt.respond(OK_5)
        self.assertIn(b"Via: 1.1 new (", self.client.value())
        self.assertIs(self.proto.runtime, self.factory.runtime)

    def test_runtime_is_one_object(self) -> None:
        """The factory's settings all come from one runtime, swapped whole on reload."""
        runtime = self.factory.runtime
        self.assertIsInstance(runtime, Runtime)
        self.assertIs(self.factory.config, runtime.config)
        self.assertIs(self.factory.policy, runtime.policy)
        self.assertIs(self.factory.dialer, runtime.dialer)
        self.factory.reconfigure(ProxyConfig(block_private=True))
        self.assertIsNot(self.factory.runtime, runtime)
        self.assertIsNot(self.factory.policy, runtime.policy)

    def test_pool_and_throttle_outlive_reload(self) -> None:
        """What must outlive a reload is handed over: the pool and the login throttle."""
        pool, throttle = self.factory.pool, self.factory.login_throttle
        attempt, upstream = self.forward(GET_A)
        attempt.respond(OK_5)
        self.factory.reconfigure(ProxyConfig())
        self.assertIs(self.factory.pool, pool)
        self.assertIs(self.factory.login_throttle, throttle)
        upstream.clear()
        self.proto.dataReceived(GET_A)
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertTrue(upstream.value().startswith(b"GET / HTTP/1.1\r\n"))
