"""
L{aproxy.run.endpoints}: endpoint descriptions split the way Twisted reads them, the one
parser that the C{--workers} sockets and the open-proxy warning share.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aproxy.run.endpoints import Endpoint, parse_endpoint


class ParseEndpointTests(SynchronousTestCase):
    """Descriptions split into a type and its arguments."""

    def test_type_lowercased_and_arguments_in_order(self) -> None:
        """The type is lowercased; positional and C{key=value} arguments keep their order."""
        self.assertEqual(
            parse_endpoint("TCP:3128:interface=127.0.0.1:backlog=5"),
            Endpoint("tcp", ("3128", "interface=127.0.0.1", "backlog=5")),
        )

    def test_escaped_colons_restored(self) -> None:
        """A backslash-escaped colon stays inside its argument (an IPv6 interface)."""
        endpoint = parse_endpoint("tcp6:8080:interface=\\:\\:1")
        self.assertEqual(endpoint.option("interface"), "::1")
        self.assertEqual(endpoint.first, "8080")

    def test_haproxy_wrapper(self) -> None:
        """A C{haproxy:} description is its inner listener, marked as PROXY protocol."""
        endpoint = parse_endpoint("haproxy:tcp:3128")
        self.assertEqual((endpoint.kind, endpoint.first), ("tcp", "3128"))
        self.assertTrue(endpoint.proxy_protocol)
        self.assertFalse(parse_endpoint("tcp:3128").proxy_protocol)

    def test_option_default_and_last_wins(self) -> None:
        """An option not given is the default; one given twice is the last value."""
        endpoint = parse_endpoint("tcp:1:interface=a:interface=b")
        self.assertEqual(endpoint.option("interface"), "b")
        self.assertEqual(endpoint.option("backlog", "50"), "50")

    def test_no_arguments(self) -> None:
        """A description without arguments has no first argument."""
        self.assertIsNone(parse_endpoint("unix").first)
        self.assertEqual(parse_endpoint("").kind, "")
