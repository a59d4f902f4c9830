"""
A reload that replaces the TLS settings reaches pooled TLS connections: over loopback, an
origin first served unverified (C{--insecure-host}) is verified again after the reload
instead of being reached over the pooled connection made without verification.
"""

from __future__ import annotations

from typing import Any

import trustme
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from aproxy.config import ProxyConfig
from tests.tlsharness import TLSTestCase, fetch
from tests.tunnels import TLS_BODY, TrackingProxyFactory


class PooledTLSReloadTests(TLSTestCase):
    """Pooled TLS connections are not reused under TLS settings a reload replaced."""

    def test_reload_removing_insecure_host_verifies_again(self) -> Deferred[None]:
        """
        With C{--insecure-host localhost} an origin with an untrusted certificate is
        served; after a reload without it, the next request gets the 502 for the unknown
        issuer although an idle pooled connection to the origin is open.
        """
        origin, origin_factory = self.tls_origin(trustme.CA().issue_cert("localhost"))
        settings = {"ca_file": self.ca_path, "connect_ports": None}
        factory = TrackingProxyFactory(
            ProxyConfig(insecure_host=("localhost",), **settings),
            self.tracker,
        )
        port = self.listen(factory)
        target = f"https://localhost:{origin}/"

        def first(result: tuple[int, dict[str, str], bytes]) -> Deferred[Any]:
            self.assertEqual((result[0], result[2]), (200, TLS_BODY))
            self.assertEqual(len(factory.pool), 1)
            factory.reconfigure(ProxyConfig(**settings))
            return deferToThread(fetch, port, target)

        def second(result: tuple[int, dict[str, str], bytes]) -> None:
            status, fields, body = result
            self.assertEqual(status, 502, body)
            self.assertIn("error=tls_certificate_error", fields["proxy-status"])
            self.assertIn("unknown issuer", body.decode())
            self.assertEqual(origin_factory.accepted, 2)

        d: Deferred[Any] = deferToThread(fetch, port, target)
        d.addCallback(first)
        d.addCallback(second)
        return d

    def test_reload_keeps_plain_pooled_connections(self) -> Deferred[None]:
        """A reload does not drop pooled connections without TLS: they are reused."""
        origin = self.plain_origin()
        factory = TrackingProxyFactory(ProxyConfig(connect_ports=None), self.tracker)
        port = self.listen(factory)
        target = f"http://127.0.0.1:{origin}/"

        def first(result: tuple[int, dict[str, str], bytes]) -> Deferred[Any]:
            self.assertEqual(result[0], 200)
            factory.reconfigure(ProxyConfig(connect_ports=None))
            return deferToThread(fetch, port, target)

        def second(result: tuple[int, dict[str, str], bytes]) -> None:
            self.assertEqual(result[0], 200)
            self.assertEqual(factory.pool.reused, 1)

        d: Deferred[Any] = deferToThread(fetch, port, target)
        d.addCallback(first)
        d.addCallback(second)
        return d
