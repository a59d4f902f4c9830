"""
Loopback integration tests for TLS and parent proxies: https:// targets with good and bad
certificates, a TLS listener, a chain of two proxies (the parent asking for credentials),
a SOCKS5 parent and an https:// parent.

Certificates are made at test time with trustme; nothing is committed. The proxies, the
origins and the SOCKS5 server run on the real reactor on ephemeral 127.0.0.1 ports; the
clients are blocking sockets in threads.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
import tempfile
from typing import Any

import trustme
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.web.server import Site
from zope.interface import implementer

from aproxy.config import ProxyConfig
from tests.test_tunnel_integration import (
    SOCKET_TIMEOUT,
    TLS_BODY,
    Banner,
    ReplyAtEof,
    SockReader,
    Tracker,
    TrackingProxyFactory,
    TunnelIntegrationTestCase,
    _Body,
    _TrackingTLSFactory,
    connect_head,
    dial,
    parse_response,
    reactor,
)

USER, PASSWORD = "carol", "pa:ss w0rd"
CREDENTIALS = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PLAIN_BODY = b"hello from the plain origin\n"


class _CountingTLSFactory(_TrackingTLSFactory):
    """A tracked TLS origin that remembers the TLS connections it accepted."""

    def __init__(self, options: Any, wrapped: Any, tracker: Tracker) -> None:
        super().__init__(options, wrapped, tracker)
        self.seen: set[int] = set()

    def registerProtocol(self, p: Any) -> None:  # noqa: N802
        # (Twisted registers a TLS protocol twice as it connects: count each once.)
        super().registerProtocol(p)
        self.seen.add(id(p))

    @property
    def accepted(self) -> int:
        """How many TLS connections were accepted."""
        return len(self.seen)


class _PlainBody(_Body):
    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"text/plain")
        return PLAIN_BODY


class _TrackedSite(Site):
    """A plain HTTP origin whose connections are tracked."""

    def __init__(self, resource: Any, tracker: Tracker) -> None:
        super().__init__(resource)
        self.tracker = tracker

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        assert proto is not None
        tracker = self.tracker
        made, lost = proto.connectionMade, proto.connectionLost

        def connection_made() -> None:
            tracker.opened(proto)
            made()

        def connection_lost(reason: Any) -> None:
            lost(reason)
            tracker.closed(proto)

        proto.connectionMade = connection_made
        proto.connectionLost = connection_lost
        return proto


# -- a minimal SOCKS5 server (RFC 1928 CONNECT, RFC 1929 login) ------------------------


@implementer(IHalfCloseableProtocol)
class _Socks5Relay(Protocol):
    """The SOCKS server's outgoing connection: bytes go back to the client."""

    server: _Socks5Server
    transport: Any

    def connectionMade(self) -> None:
        self.server.factory.tracker.opened(self)
        self.server.outgoing_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.server.transport.write(data)

    def readConnectionLost(self) -> None:
        self.server.origin_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.server.transport.loseConnection()
        self.server.factory.tracker.closed(self)


@implementer(IHalfCloseableProtocol)
class _Socks5Server(Protocol):
    """One SOCKS5 client: method choice, login, CONNECT, then a plain relay (half-close too)."""

    factory: Socks5Factory
    transport: Any

    def __init__(self) -> None:
        self.buf = b""
        self.state = "greeting"
        self.out: _Socks5Relay | None = None
        self.client_done = self.origin_done = False

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)

    def readConnectionLost(self) -> None:
        self.client_done = True
        if self.out is None or self.origin_done:
            self.close()
        else:
            self.out.transport.loseWriteConnection()

    def origin_eof(self) -> None:
        self.origin_done = True
        if self.client_done:
            self.close()
        else:
            self.transport.loseWriteConnection()

    def close(self) -> None:
        if self.out is not None:
            self.out.transport.loseConnection()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.out is not None:
            self.out.transport.loseConnection()
        self.factory.tracker.closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            assert self.out is not None
            self.out.transport.write(data)
            return
        self.buf += data
        while self.step():
            pass

    def step(self) -> bool:
        buf = self.buf
        if self.state == "greeting":
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return False
            methods = buf[2 : 2 + buf[1]]
            self.buf = buf[2 + buf[1] :]
            if 2 in methods:
                self.state = "login"
                self.transport.write(b"\x05\x02")
            else:
                self.transport.write(b"\x05\xff")
                self.transport.loseConnection()
                return False
            return True
        if self.state == "login":
            if len(buf) < 2 or len(buf) < 3 + buf[1] or len(buf) < 3 + buf[1] + buf[2 + buf[1]]:
                return False
            ulen = buf[1]
            user = buf[2 : 2 + ulen]
            plen = buf[2 + ulen]
            password = buf[3 + ulen : 3 + ulen + plen]
            self.buf = buf[3 + ulen + plen :]
            if (user, password) != (USER.encode(), PASSWORD.encode()):
                self.transport.write(b"\x01\x01")
                self.transport.loseConnection()
                return False
            self.transport.write(b"\x01\x00")
            self.state = "request"
            return True
        if self.state == "request":
            if len(buf) < 5:
                return False
            kind = buf[3]
            if kind == 3:
                end = 5 + buf[4]
                host = buf[5:end].decode("ascii")
            elif kind == 1:
                end = 8
                host = str(ipaddress.IPv4Address(buf[4:8]))
            else:
                end = 20
                host = str(ipaddress.IPv6Address(buf[4:20]))
            if len(buf) < end + 2:
                return False
            (port,) = struct.unpack("!H", buf[end : end + 2])
            self.buf = buf[end + 2 :]
            self.factory.requests.append((kind, host, port))
            self.state = "connecting"
            self.transport.pauseProducing()
            endpoint = (
                HostnameEndpoint(reactor, host.encode("ascii"), port)
                if kind == 3
                else TCP4ClientEndpoint(reactor, host, port)
            )
            relay = Factory.forProtocol(_Socks5Relay)
            relay.buildProtocol = self._relay  # type: ignore[method-assign]
            endpoint.connect(relay).addErrback(self._failed)
            return False
        return False

    def _relay(self, addr: Any) -> _Socks5Relay:
        relay = _Socks5Relay()
        relay.server = self
        return relay

    def outgoing_ready(self, relay: _Socks5Relay) -> None:
        self.out = relay
        self.state = "relay"
        self.transport.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
        self.transport.resumeProducing()
        if self.buf:
            relay.transport.write(self.buf)
            self.buf = b""

    def _failed(self, failure: Any) -> None:
        self.transport.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
        self.transport.loseConnection()


class Socks5Factory(Factory):
    """The SOCKS5 server: records each CONNECT (address type, host, port)."""

    def buildProtocol(self, addr: Any) -> Any:
        proto = _Socks5Server()
        proto.factory = self
        return proto

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.requests: list[tuple[int, str, int]] = []


# -- blocking clients ------------------------------------------------------------------


def fetch(
    proxy_port: int,
    target: str,
    *,
    tls_ca: str | None = None,
    credentials: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One absolute-form GET through the proxy (over TLS to it with C{tls_ca})."""
    sock: socket.socket | ssl.SSLSocket = dial(proxy_port)
    if tls_ca is not None:
        sock = ssl.create_default_context(cafile=tls_ca).wrap_socket(
            sock, server_hostname="127.0.0.1"
        )
    auth = f"Proxy-Authorization: Basic {credentials}\r\n" if credentials else ""
    with sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()
        )
        return parse_response(SockReader(sock).read_to_eof())


def fetch_twice(proxy_port: int, target: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Two GETs on one keep-alive connection to the proxy."""
    results = []
    with dial(proxy_port) as sock:
        reader = SockReader(sock)
        for _ in range(2):
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = reader.read_until(b"\r\n\r\n")
            status, fields, _ = parse_response(head)
            body = reader.read_exact(int(fields["content-length"]))
            results.append((status, fields, body))
    return results


def tunnel_get(
    proxy_port: int, authority: str, ca: str, *, proxy_tls_ca: str | None = None
) -> bytes:
    """CONNECT through the proxy, then an HTTPS GET to C{authority}; the response body."""
    sock: socket.socket | ssl.SSLSocket = dial(proxy_port)
    if proxy_tls_ca is not None:
        sock = ssl.create_default_context(cafile=proxy_tls_ca).wrap_socket(
            sock, server_hostname="127.0.0.1"
        )
    with sock:
        sock.sendall(connect_head(authority))
        reader = SockReader(sock)
        head = reader.read_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise AssertionError(f"CONNECT refused: {head!r}")
        if proxy_tls_ca is not None:
            # TLS inside TLS: the stdlib wraps a socket only once, so use memory BIOs.
            return _tls_in_tls(sock, reader, authority, ca)
        with ssl.create_default_context(cafile=ca).wrap_socket(
            sock, server_hostname=authority.rpartition(":")[0]
        ) as tls:
            tls.sendall(
                f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
            )
            return parse_response(SockReader(tls).read_to_eof())[2]


def _tls_in_tls(outer: Any, reader: SockReader, authority: str, ca: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=ca).wrap_bio(
        incoming, outgoing, server_hostname=authority.rpartition(":")[0]
    )
    pending = reader.buf

    def pump() -> bool:
        nonlocal pending
        data = outgoing.read()
        if data:
            outer.sendall(data)
        chunk = pending or outer.recv(65536)
        pending = b""
        if not chunk:
            incoming.write_eof()
            return False
        incoming.write(chunk)
        return True

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if not pump():
                raise
    tls.write(f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while True:
        try:
            data = tls.read(65536)
        except ssl.SSLWantReadError:
            if not pump():
                break
            continue
        except ssl.SSLZeroReturnError:
            break
        if not data:
            break
        out += data
    return parse_response(out)[2]


# -- the tests -------------------------------------------------------------------------


class TLSTestCase(TunnelIntegrationTestCase):
    """A test CA, origins with its certificates, and proxies trusting it."""

    def setUp(self) -> None:
        super().setUp()
        self.ca = trustme.CA()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(_remove_tree, self.tmp)
        self.ca_path = self.write("ca.pem", self.ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        """A file in the test's temporary folder."""
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def tls_origin(self, cert: trustme.LeafCert) -> tuple[int, _CountingTLSFactory]:
        """An HTTPS origin presenting C{cert}."""
        options = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
        factory = _CountingTLSFactory(options, Site(_Body()), self.tracker)
        return self.listen(factory), factory

    def plain_origin(self) -> int:
        """A plain HTTP origin."""
        return self.listen(_TrackedSite(_PlainBody(), self.tracker))

    def proxy(self, **settings: Any) -> int:
        """A tracked proxy trusting the test CA, any CONNECT port."""
        settings.setdefault("ca_file", self.ca_path)
        settings.setdefault("connect_ports", None)
        return self.listen(TrackingProxyFactory(ProxyConfig(**settings), self.tracker))

    def tls_proxy(self, **settings: Any) -> int:
        """A tracked proxy listening over TLS with a certificate for 127.0.0.1."""
        cert = self.ca.issue_cert("127.0.0.1")
        key = self.write("proxy-key.pem", cert.private_key_pem.bytes())
        chain = self.write("proxy-cert.pem", b"".join(p.bytes() for p in cert.cert_chain_pems))
        settings.setdefault("ca_file", self.ca_path)
        settings.setdefault("connect_ports", None)
        factory = TrackingProxyFactory(ProxyConfig(**settings), self.tracker)
        return self.listen(factory, f"ssl:0:privateKey={key}:certKey={chain}:interface=127.0.0.1")

    def auth_file(self) -> str:
        """An htpasswd file with USER and PASSWORD ({SHA} entry)."""
        digest = base64.b64encode(hashlib.sha1(PASSWORD.encode()).digest()).decode()
        return self.write("users", f"{USER}:{{SHA}}{digest}\n".encode())


def _remove_tree(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


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
