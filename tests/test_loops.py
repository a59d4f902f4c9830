"""
L{aproxy.access.loops.LoopGuard} on its own: what the proxy knows about itself and the
three loop checks (the request's C{Via}, the target as written, the address reached).
The same checks through a whole proxy are in C{tests/test_policy.py}.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from aproxy.access.loops import LoopGuard
from aproxy.errors import Forbidden
from aproxy.http.head import HeadReader, RequestHead, parse_request_head


def head_with(via: bytes) -> RequestHead:
    """A parsed GET request head carrying C{via} as its Via field line(s)."""
    raw = HeadReader(65536, 65536).feed(
        b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n" + via + b"\r\n"
    )
    assert raw is not None
    return parse_request_head(raw)


class LoopGuardTests(SynchronousTestCase):
    """One guard, fed addresses as the listeners and connections would."""

    def setUp(self) -> None:
        self.loops = LoopGuard()

    def assert_loop(self, call: object, *args: object) -> None:
        """C{call(*args)} raises the 403 C{proxy_loop_detected}."""
        err = self.assertRaises(Forbidden, call, *args)
        self.assertEqual((err.status, err.error_type), (403, "proxy_loop_detected"))

    def test_via_value_carries_marker(self) -> None:
        """The Via value names the proxy and carries its marker; no name, no Via."""
        self.assertEqual(self.loops.via("aproxy"), b"aproxy (" + self.loops.marker + b")")
        self.assertIsNone(self.loops.via(None))
        self.assertNotEqual(LoopGuard().marker, self.loops.marker)

    def test_check_via(self) -> None:
        """A request whose Via carries this guard's marker is a loop; another's is not."""
        self.loops.check_via(head_with(b"Via: 1.1 aproxy (" + LoopGuard().marker + b")\r\n"))
        self.loops.check_via(head_with(b""))
        self.assert_loop(
            self.loops.check_via, head_with(b"Via: 1.0 x, 1.1 y (" + self.loops.marker + b")\r\n")
        )

    def test_check_target_after_listening(self) -> None:
        """A listening address, however written, is a loop once noted; before, it is not."""
        self.loops.check_target("127.0.0.1", 8080)
        self.loops.note_listening(IPv4Address("TCP", "127.0.0.1", 8080))
        self.assert_loop(self.loops.check_target, "127.0.0.1", 8080)
        self.assert_loop(self.loops.check_target, "::ffff:127.0.0.1", 8080)
        self.loops.check_target("127.0.0.1", 8081)
        self.loops.check_target("a.example", 8080)

    def test_wildcard_listener(self) -> None:
        """On a wildcard listener's port, loopback and the unspecified address are loops."""
        self.loops.note_listening(IPv6Address("TCP", "::", 3128))
        self.assert_loop(self.loops.check_target, "127.0.0.2", 3128)
        self.assert_loop(self.loops.check_target, "0.0.0.0", 3128)
        self.loops.check_target("192.0.2.1", 3128)

    def test_note_local(self) -> None:
        """The address a client reached the proxy at becomes one of its own."""
        self.loops.note_local(IPv4Address("TCP", "192.0.2.7", 3128))
        self.assert_loop(self.loops.check_target, "192.0.2.7", 3128)

    def test_check_connected(self) -> None:
        """
        A connection whose far end is this proxy is a loop, including this machine's own
        address on a wildcard listener's port (the near end tells which it is).
        """
        self.loops.note_listening(IPv4Address("TCP", "0.0.0.0", 3128))
        local = IPv4Address("TCP", "192.0.2.7", 40000)
        self.assert_loop(self.loops.check_connected, IPv4Address("TCP", "192.0.2.7", 3128), local)
        self.loops.check_connected(IPv4Address("TCP", "192.0.2.8", 3128), local)
        self.loops.check_connected(IPv4Address("TCP", "192.0.2.7", 80), local)
