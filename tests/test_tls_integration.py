"""
Loopback integration tests for TLS and parent proxies: https:// targets with good and bad
certificates, a TLS listener, a chain of two proxies (the parent asking for credentials),
a SOCKS5 parent and an https:// parent.

Certificates are made at test time with trustme; nothing is committed. The proxies, the
origins and the SOCKS5 server run on the real reactor on ephemeral 127.0.0.1 ports; the
clients are blocking sockets in threads.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import trustme
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.tlsharness import (
    CREDENTIALS,
    PASSWORD,
    PLAIN_BODY,
    USER,
    Socks5Factory,
    TLSTestCase,
    fetch,
    fetch_twice,
    tunnel_get,
)
from tests.tunnels import (
    SOCKET_TIMEOUT,
    TLS_BODY,
    Banner,
    ReplyAtEof,
    SockReader,
    connect_head,
    dial,
)


class HttpsTargetTests(TLSTestCase):
    """Absolute-form https:// requests are forwarded over verified TLS."""

    def test_good_certificate(self) -> Deferred[None]:
        """A certificate for the host from a trusted CA: the origin's response."""
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.proxy()

        def check(result: tuple[int, dict[str, str], bytes]) -> None:
            status, fields, body = result
            self.assertEqual((status, body), (200, TLS_BODY))
            self.assertIn("aproxy", fields["via"])

        return deferToThread(fetch, port, f"https://localhost:{origin}/").addCallback(check)

    def test_ip_address_target(self) -> Deferred[None]:
        """An IP literal target is verified against the certificate's IP addresses."""
        origin, _ = self.tls_origin(self.ca.issue_cert("127.0.0.1"))
        port = self.proxy()
        d = deferToThread(fetch, port, f"https://127.0.0.1:{origin}/")
        return d.addCallback(lambda r: self.assertEqual((r[0], r[2]), (200, TLS_BODY)))

    def check_refused(
        self, result: tuple[int, dict[str, str], bytes], error_type: str, why: str
    ) -> None:
        """A 502 with the given Proxy-Status error type and the reason in the body."""
        status, fields, body = result
        self.assertEqual(status, 502, body)
        self.assertIn(f"error={error_type}", fields["proxy-status"])
        self.assertIn(why, body.decode())

    def test_expired(self) -> Deferred[None]:
        """An expired certificate: 502 tls_certificate_error saying it expired."""
        cert = self.ca.issue_cert(
            "localhost",
            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
            not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
        )
        origin, _ = self.tls_origin(cert)
        port = self.proxy()
        d = deferToThread(fetch, port, f"https://localhost:{origin}/")
        return d.addCallback(self.check_refused, "tls_certificate_error", "has expired")

    def test_wrong_host(self) -> Deferred[None]:
        """Another host's certificate: 502 saying it is not valid for this host."""
        origin, _ = self.tls_origin(self.ca.issue_cert("other.example"))
        port = self.proxy()
        d = deferToThread(fetch, port, f"https://localhost:{origin}/")
        return d.addCallback(self.check_refused, "tls_certificate_error", "not valid for localhost")

    def test_unknown_ca(self) -> Deferred[None]:
        """A certificate from a CA nobody trusts: 502 saying the issuer is unknown."""
        origin, _ = self.tls_origin(trustme.CA().issue_cert("localhost"))
        port = self.proxy()
        d = deferToThread(fetch, port, f"https://localhost:{origin}/")
        return d.addCallback(self.check_refused, "tls_certificate_error", "unknown issuer")

    def test_not_tls(self) -> Deferred[None]:
        """A server that speaks something else on the https:// port: 502 tls_protocol_error."""
        _, origin = self.start_origin(Banner)
        port = self.proxy()
        d = deferToThread(fetch, port, f"https://localhost:{origin}/")
        return d.addCallback(self.check_refused, "tls_protocol_error", "TLS handshake")

    def test_insecure_host(self) -> Deferred[None]:
        """--insecure-host skips verification for that host only."""
        origin, _ = self.tls_origin(trustme.CA().issue_cert("localhost"))
        port = self.proxy(insecure_host=("localhost",))

        def check(results: list[tuple[int, dict[str, str], bytes]]) -> None:
            insecure, verified = results
            self.assertEqual((insecure[0], insecure[2]), (200, TLS_BODY))
            self.check_refused(verified, "tls_certificate_error", "unknown issuer")

        def run() -> list[tuple[int, dict[str, str], bytes]]:
            return [
                fetch(port, f"https://localhost:{origin}/"),
                fetch(port, f"https://127.0.0.1:{origin}/"),
            ]

        return deferToThread(run).addCallback(check)

    def test_tls_connections_pooled(self) -> Deferred[None]:
        """Two requests in a row reuse one TLS connection to the origin."""
        origin, factory = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.proxy()

        def check(results: list[tuple[int, dict[str, str], bytes]]) -> None:
            self.assertEqual([(r[0], r[2]) for r in results], [(200, TLS_BODY)] * 2)
            self.assertEqual(factory.accepted, 1)

        return deferToThread(fetch_twice, port, f"https://localhost:{origin}/").addCallback(check)


class TLSListenerTests(TLSTestCase):
    """A proxy listening over TLS serves http://, https:// and CONNECT."""

    def test_http_https_and_connect(self) -> Deferred[None]:
        """Each kind of request works through a TLS listener."""
        plain = self.plain_origin()
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        port = self.tls_proxy()

        def run() -> list[Any]:
            return [
                fetch(port, f"http://localhost:{plain}/", tls_ca=self.ca_path),
                fetch(port, f"https://localhost:{origin}/", tls_ca=self.ca_path),
                tunnel_get(port, f"localhost:{origin}", self.ca_path, proxy_tls_ca=self.ca_path),
            ]

        def check(results: list[Any]) -> None:
            http, https, tunnelled = results
            self.assertEqual((http[0], http[2]), (200, PLAIN_BODY))
            self.assertEqual((https[0], https[2]), (200, TLS_BODY))
            self.assertEqual(tunnelled, TLS_BODY)

        return deferToThread(run).addCallback(check)


class HttpParentTests(TLSTestCase):
    """A chain of two proxies: the child sends everything to a parent needing a login."""

    def chain(self, password: str = PASSWORD, parent_tls: bool = False) -> int:
        """A parent with --auth (plain or TLS) and a child whose --upstream logs in."""
        parent = (self.tls_proxy if parent_tls else self.proxy)(auth=self.auth_file())
        scheme = "https" if parent_tls else "http"
        url = f"{scheme}://{USER}:{password.replace(':', '%3A')}@127.0.0.1:{parent}"
        return self.proxy(upstream=url)

    def test_http_https_and_connect(self) -> Deferred[None]:
        """Plain, https:// and CONNECT requests all make it through the parent."""
        plain = self.plain_origin()
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        child = self.chain()

        def run() -> list[Any]:
            return [
                fetch(child, f"http://localhost:{plain}/"),
                fetch(child, f"https://localhost:{origin}/"),
                tunnel_get(child, f"localhost:{origin}", self.ca_path),
            ]

        def check(results: list[Any]) -> None:
            http, https, tunnelled = results
            self.assertEqual((http[0], http[2]), (200, PLAIN_BODY))
            # Both proxies added their Via.
            self.assertEqual(http[1]["via"].count("1.1 aproxy"), 2)
            self.assertEqual((https[0], https[2]), (200, TLS_BODY))
            self.assertEqual(tunnelled, TLS_BODY)

        return deferToThread(run).addCallback(check)

    def test_client_credentials_not_sent_to_parent(self) -> Deferred[None]:
        """
        The client's own Proxy-Authorization (here the parent's valid login) is not
        passed on: with a wrong password in the child's URL the parent refuses.
        """
        plain = self.plain_origin()
        child = self.chain(password="wrong")

        def run() -> list[Any]:
            return [
                fetch(child, f"http://localhost:{plain}/", credentials=CREDENTIALS),
                _connect_status(child, f"localhost:{plain}"),
            ]

        def check(results: list[Any]) -> None:
            http, connect = results
            self.assertEqual(http[0], 502)
            self.assertIn("requires authentication (407)", http[2].decode())
            self.assertIn(b"502", connect)

        return deferToThread(run).addCallback(check)

    def test_https_parent(self) -> Deferred[None]:
        """An https:// parent: TLS to the parent, then plain and tunnelled requests."""
        plain = self.plain_origin()
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        child = self.chain(parent_tls=True)

        def run() -> list[Any]:
            return [
                fetch(child, f"http://localhost:{plain}/"),
                fetch(child, f"https://localhost:{origin}/"),
            ]

        def check(results: list[Any]) -> None:
            http, https = results
            self.assertEqual((http[0], http[2]), (200, PLAIN_BODY))
            self.assertEqual((https[0], https[2]), (200, TLS_BODY))

        return deferToThread(run).addCallback(check)

    def test_unreachable_parent(self) -> Deferred[None]:
        """A parent nobody listens on: 502 naming it."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        child = self.proxy(upstream=f"http://127.0.0.1:{dead}")

        def check(result: tuple[int, dict[str, str], bytes]) -> None:
            status, fields, body = result
            self.assertEqual(status, 502)
            self.assertIn(f"parent proxy http://127.0.0.1:{dead}", body.decode())
            self.assertIn("error=connection_refused", fields["proxy-status"])

        return deferToThread(fetch, child, "http://localhost:1025/").addCallback(check)


def _connect_status(proxy_port: int, authority: str) -> bytes:
    with dial(proxy_port) as sock:
        sock.sendall(connect_head(authority))
        return SockReader(sock).read_until(b"\r\n")


class Socks5ParentTests(TLSTestCase):
    """A SOCKS5 parent with a login: the destination name goes to it unresolved."""

    def test_http_https_and_connect(self) -> Deferred[None]:
        """All three kinds of request go through the SOCKS5 server, by name."""
        socks = Socks5Factory(self.tracker)
        socks_port = self.listen(socks)
        plain = self.plain_origin()
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        user = f"{USER}:{PASSWORD.replace(':', '%3A').replace(' ', '%20')}"
        proxy = self.proxy(upstream=f"socks5://{user}@127.0.0.1:{socks_port}")

        def run() -> list[Any]:
            return [
                fetch(proxy, f"http://localhost:{plain}/"),
                fetch(proxy, f"https://localhost:{origin}/"),
                tunnel_get(proxy, f"localhost:{origin}", self.ca_path),
            ]

        def check(results: list[Any]) -> None:
            http, https, tunnelled = results
            self.assertEqual((http[0], http[2]), (200, PLAIN_BODY))
            self.assertEqual((https[0], https[2]), (200, TLS_BODY))
            self.assertEqual(tunnelled, TLS_BODY)
            self.assertEqual(
                socks.requests,
                [(3, "localhost", plain), (3, "localhost", origin), (3, "localhost", origin)],
            )

        return deferToThread(run).addCallback(check)

    def test_wrong_login(self) -> Deferred[None]:
        """A refused SOCKS5 login is a 502 naming the parent."""
        socks_port = self.listen(Socks5Factory(self.tracker))
        proxy = self.proxy(upstream=f"socks5://{USER}:nope@127.0.0.1:{socks_port}")

        def check(result: tuple[int, dict[str, str], bytes]) -> None:
            status, _, body = result
            self.assertEqual(status, 502)
            self.assertIn("refused the user name and password", body.decode())

        return deferToThread(fetch, proxy, "http://localhost:1025/").addCallback(check)

    def test_half_close_through_socks(self) -> Deferred[None]:
        """A client's half-close crosses the SOCKS hop; the origin's reply still arrives."""
        socks_port = self.listen(Socks5Factory(self.tracker))
        origin_factory, origin = self.start_origin(ReplyAtEof)
        user = f"{USER}:{PASSWORD.replace(':', '%3A').replace(' ', '%20')}"
        proxy = self.proxy(upstream=f"socks5://{user}@127.0.0.1:{socks_port}")

        def run() -> bytes:
            with dial(proxy) as sock:
                sock.sendall(connect_head(f"127.0.0.1:{origin}") + b"ping")
                reader = SockReader(sock)
                reader.read_until(b"\r\n\r\n")
                sock.settimeout(SOCKET_TIMEOUT)
                sock.shutdown(socket.SHUT_WR)
                return reader.read_to_eof()

        return deferToThread(run).addCallback(self.assertEqual, b"reply:ping")
