"""Proxy auto-configuration: the generated file, evaluated by a real PAC engine, and where
it is served (the proxy's own listener, before any login, and the metrics port)."""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aproxy.access.pac import generate_pac
from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.observe.metrics import Metrics, metrics_site
from aproxy.testing import RecordingConnector
from tests.sites import fetch
from tests.support import ProxyTestCase

DIRECT = ("*.corp.example", ".intra.example", "exact.example", "10.0.0.0/8")


def engine(pac: bytes) -> object:
    """A real PAC engine (pypac, JavaScript by dukpy) loaded with C{pac}."""
    try:
        from pypac.parser import PACFile  # type: ignore[import-untyped]
    except ImportError:
        raise SkipTest("pypac is not installed") from None
    return PACFile(pac.decode())


class GeneratedPacTests(SynchronousTestCase):
    """The generated FindProxyForURL, run by a PAC engine, gives the expected answers."""

    def test_answers(self) -> None:
        """Plain names, loopback and --pac-direct hosts DIRECT; the rest the proxy."""
        pac: object = engine(generate_pac("proxy.corp:3128", DIRECT))
        proxy = "PROXY proxy.corp:3128"
        cases = {
            "intranet": "DIRECT",
            "localhost": "DIRECT",
            "127.0.0.1": "DIRECT",
            "a.corp.example": "DIRECT",
            "corp.example": proxy,
            "intra.example": "DIRECT",
            "x.intra.example": "DIRECT",
            "exact.example": "DIRECT",
            "sub.exact.example": proxy,
            "10.1.2.3": "DIRECT",
            "11.1.2.3": proxy,
            "www.example.org": proxy,
            "WWW.Corp-Example.com": proxy,
        }
        for host, expected in cases.items():
            got = pac.find_proxy_for_url(f"http://{host}/", host)  # type: ignore[attr-defined]
            self.assertEqual(got, expected, host)

    def test_everything_direct(self) -> None:
        """--pac-direct '*' sends everything DIRECT."""
        pac: object = engine(generate_pac("p:1", ("*",)))
        self.assertEqual(pac.find_proxy_for_url("http://a.example/", "a.example"), "DIRECT")  # type: ignore[attr-defined]

    def test_values_are_quoted(self) -> None:
        """The proxy address is a JavaScript string, whatever the Host said."""
        pac = generate_pac('evil"); alert(1); ("x:1')
        self.assertIn(b'"PROXY evil\\"); alert(1); (\\"x:1"', pac)


class ServedPacTests(ProxyTestCase):
    """GET /proxy.pac (or /wpad.dat) to the proxy itself, even under --auth."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        users = os.path.join(self.dir, "users")
        with open(users, "w") as f:
            f.write("u:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")
        self.config = ProxyConfig(auth=users, pac_direct=("*.corp.example",))
        super().setUp()

    def test_generated_for_the_host_used(self) -> None:
        """Without --pac-proxy the file names the Host the client used; no login asked."""
        self.proto.dataReceived(b"GET /proxy.pac HTTP/1.1\r\nHost: 10.9.8.7:3128\r\n\r\n")
        value = self.client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\n"), value)
        self.assertIn(b"Content-Type: application/x-ns-proxy-autoconfig\r\n", value)
        self.assertIn(b'return "PROXY 10.9.8.7:3128";', value)
        self.assertIn(b'dnsDomainIs(host, ".corp.example")', value)
        self.assertEqual(self.connector.attempts, [])

    def test_wpad_and_head(self) -> None:
        """/wpad.dat is the same file; HEAD gets the head alone; other paths still need
        the login."""
        client, proto = self.connect_client()
        proto.dataReceived(b"HEAD /wpad.dat HTTP/1.1\r\nHost: p:1\r\n\r\n")
        self.assertTrue(client.value().endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: ", client.value())
        client, proto = self.connect_client()
        proto.dataReceived(b"GET /other HTTP/1.1\r\nHost: p:1\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 407 "), client.value())


class PacFileTests(ProxyTestCase):
    """--pac FILE is served as it is, and re-read on a reload."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "proxy.pac")
        with open(self.path, "wb") as f:
            f.write(b"function FindProxyForURL(u, h) { return 'DIRECT'; }\n")
        self.config = ProxyConfig(pac=self.path, pac_proxy="ignored:1")
        super().setUp()

    def get(self) -> bytes:
        """The body a GET /proxy.pac gets."""
        client, proto = self.connect_client()
        proto.dataReceived(b"GET /proxy.pac HTTP/1.1\r\nHost: p:1\r\n\r\n")
        return bytes(client.value().partition(b"\r\n\r\n")[2])

    def test_file_then_reload(self) -> None:
        """The file's bytes; after it changes, a reload serves the new ones."""
        self.assertEqual(self.get(), b"function FindProxyForURL(u, h) { return 'DIRECT'; }\n")
        with open(self.path, "wb") as f:
            f.write(b"// new\n")
        self.factory.reconfigure(self.config)
        self.assertEqual(self.get(), b"// new\n")

    def test_unreadable_file_is_one_line(self) -> None:
        """A --pac file that can't be read is refused at start."""
        with self.assertRaisesRegex(ValueError, "^pac: cannot read"):
            ProxyConfig(pac=os.path.join(self.dir, "missing.pac"))


class MetricsPortPacTests(SynchronousTestCase):
    """The metrics port serves the PAC file too, for the first listening address."""

    def test_served(self) -> None:
        """GET /proxy.pac on the metrics site: the proxy named by its --port."""
        clock = Clock()
        config = ProxyConfig(port=("tcp:3128:interface=10.0.0.5",))
        factory = ProxyFactory(config, clock, connector=RecordingConnector())
        site = metrics_site(Metrics(factory, clock, CollectorRegistry()), factory)
        status, headers, body = fetch(site, b"/wpad.dat")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"application/x-ns-proxy-autoconfig")
        self.assertIn(b'"PROXY 10.0.0.5:3128"', body)
