"""
The SOCKS5 listener over real loopback sockets, with real clients: curl
(C{--socks5-hostname}, C{--socks5} with C{-U}), requests with PySocks, httpx with socksio,
git through C{ALL_PROXY=socks5h://}, a UDP round trip to an echo server through
C{UDP ASSOCIATE} (a client of our own: L{tests.socksclient}), IPv6, and C{--workers}.

Clients run with the proxy and CA variables of this machine's environment removed, so
they use only the proxy they are given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data, File

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.observe.records import Exchange
from aproxy.run.service import makeService
from aproxy.socks.factory import SocksFactory
from tests.hashes import SHA1
from tests.processes import free_port, twistd, wait_for_line
from tests.socksclient import SocksRefused, associate, connect, handshake, udp_exchange
from tests.tlsharness import TLSTestCase
from tests.tunnels import TLS_BODY, TrackingProxyFactory

BODY = b"hello through socks\n"
_DROP = ("GIT_SSL_CAINFO", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without proxy and CA settings, plus C{extra}."""
    env = {
        k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in _DROP
    }
    env.update(extra, GIT_TERMINAL_PROMPT="0")
    return env


def run(args: list[str], **extra: str) -> subprocess.CompletedProcess[bytes]:
    """Run a client (bounded in time) with the clean environment."""
    return subprocess.run(args, capture_output=True, timeout=30, env=clean_env(**extra))


class _Echo(DatagramProtocol):
    """Sends every datagram back to its sender, prefixed."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(b"echo:" + data, addr)


class SocksIntegrationTests(TestCase):
    """Real clients through a SOCKS5 listener on loopback."""

    timeout = 60

    def setUp(self) -> None:
        self.records: list[Exchange] = []
        self.origins: list[WrappingFactory] = []

    def start_proxy(self, host: str = "127.0.0.1", **settings: Any) -> int:
        """A proxy with C{settings} serving SOCKS5 on an ephemeral port of C{host}."""
        settings.setdefault("connect_ports", None)
        factory = ProxyFactory(ProxyConfig(**settings), reactor)
        factory.observers.append(self.records.append)
        self.proxy = factory
        kind = "tcp6" if ":" in host else "tcp"
        description = f"{kind}:0:interface={host.replace(':', chr(92) + ':')}"
        port = self.listen(SocksFactory(factory, reactor), description)
        self.addCleanup(self.settle, factory)
        return port

    def listen(self, factory: Any, description: str = "tcp:0:interface=127.0.0.1") -> int:
        listening = self.successResultOf(serverFromString(reactor, description).listen(factory))
        self.addCleanup(listening.stopListening)
        number: int = listening.getHost().port
        return number

    def start_origin(self, resource: Resource) -> int:
        """A web origin on 127.0.0.1 whose connections cleanup waits for."""
        if isinstance(resource, Data):
            resource.isLeaf = True  # (every path is the body)
        wrapped = WrappingFactory(Site(resource))
        self.origins.append(wrapped)
        return self.listen(wrapped)

    @inlineCallbacks
    def settle(self, factory: ProxyFactory) -> Any:
        """Wait (bounded) until the proxy's and origins' connections have all ended."""
        deadline = time.monotonic() + 10
        while factory.connections or any(o.protocols for o in self.origins):
            if time.monotonic() > deadline:
                break
            yield deferLater(reactor, 0.01, lambda: None)

    def settled(self, d: Deferred[Any]) -> Deferred[Any]:
        """C{d}'s result, once the proxy has ended (and recorded) every session."""

        def wait(result: Any) -> Deferred[Any]:
            return self.settle(self.proxy).addCallback(lambda _: result)

        return d.addCallback(wait)

    def test_curl_socks5_hostname(self) -> Deferred[None]:
        """curl --socks5-hostname: the name goes to the proxy, which resolves it."""
        origin = self.start_origin(Data(BODY, "text/plain"))
        port = self.start_proxy()
        url = f"http://localhost:{origin}/"
        d = deferToThread(run, ["curl", "-sS", "--socks5-hostname", f"127.0.0.1:{port}", url])

        def check(result: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(result.stdout, BODY, result.stderr)
            [record] = self.records
            self.assertEqual((record.method, record.target), ("CONNECT", f"localhost:{origin}"))
            self.assertEqual((record.version, record.status), ("SOCKS5", 200))

        return self.settled(d).addCallback(check)

    def test_curl_socks5_login(self) -> Deferred[None]:
        """curl --socks5 -U: logged in against --auth; a wrong password is refused."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        passwd = os.path.join(tmp, "htpasswd")
        with open(passwd, "w") as f:
            f.write(f"erin:{SHA1}\n")
        origin = self.start_origin(Data(BODY, "text/plain"))
        port = self.start_proxy(auth=passwd)
        url = f"http://127.0.0.1:{origin}/"
        base = ["curl", "-sS", "--socks5", f"127.0.0.1:{port}"]

        def both() -> tuple[Any, Any]:
            good = run([*base, "-U", "erin:erin-secret", url])
            bad = run([*base, "-U", "erin:wrong", url])
            return good, bad

        def check(results: tuple[Any, Any]) -> None:
            good, bad = results
            self.assertEqual(good.stdout, BODY, good.stderr)
            self.assertNotEqual(bad.returncode, 0)
            self.assertEqual(
                sorted((r.status, r.user) for r in self.records), [(200, "erin"), (407, None)]
            )

        return self.settled(deferToThread(both)).addCallback(check)

    def test_requests_and_httpx(self) -> Deferred[None]:
        """requests (PySocks, socks5h://) and httpx (socksio, socks5://) get the body."""
        try:
            import httpx
            import requests
        except ImportError:
            raise SkipTest("requests or httpx is not installed") from None
        if find_spec("socks") is None or find_spec("socksio") is None:
            raise SkipTest("PySocks or socksio is not installed")
        origin = self.start_origin(Data(BODY, "text/plain"))
        port = self.start_proxy()
        url = f"http://127.0.0.1:{origin}/"

        def fetch() -> tuple[bytes, bytes]:
            session = requests.Session()
            session.trust_env = False
            proxy = f"socks5h://127.0.0.1:{port}"
            first = session.get(url, proxies={"http": proxy, "https": proxy}, timeout=20).content
            session.close()
            with httpx.Client(proxy=f"socks5://127.0.0.1:{port}", trust_env=False) as client:
                second = client.get(url, timeout=20).content
            return first, second

        def check(bodies: tuple[bytes, bytes]) -> None:
            self.assertEqual(bodies, (BODY, BODY))
            self.assertEqual([r.status for r in self.records], [200, 200])

        return self.settled(deferToThread(fetch)).addCallback(check)

    def test_git_clone(self) -> Deferred[None]:
        """git clone over dumb HTTP with ALL_PROXY=socks5h://."""
        if shutil.which("git") is None:
            raise SkipTest("git is not installed")
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        work, bare = os.path.join(tmp, "work"), os.path.join(tmp, "serve", "repo.git")
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
        for args in (
            ["init", "-q", work],
            ["-C", work, "commit", "-q", "--allow-empty", "-m", "first"],
            ["clone", "-q", "--bare", work, bare],
            ["-C", bare, "update-server-info"],
        ):
            subprocess.run([*git, *args], check=True, capture_output=True, timeout=30)
        origin = self.start_origin(File(os.path.join(tmp, "serve")))
        port = self.start_proxy()
        target = os.path.join(tmp, "clone")
        d = deferToThread(
            run,
            [*git, "clone", "-q", f"http://localhost:{origin}/repo.git", target],
            ALL_PROXY=f"socks5h://127.0.0.1:{port}",
        )

        def check(result: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(result.returncode, 0, result.stderr)
            log = run(["git", "-C", target, "log", "--format=%s"])
            self.assertEqual(log.stdout, b"first\n")
            self.assertTrue(self.records)
            self.assertTrue(all(r.version == "SOCKS5" and r.status == 200 for r in self.records))

        return self.settled(d).addCallback(check)

    def udp_round_trip(self, host: str) -> Deferred[None]:
        echo = reactor.listenUDP(0, _Echo(), interface=host)  # type: ignore[attr-defined]
        self.addCleanup(echo.stopListening)
        echo_port = echo.getHost().port
        port = self.start_proxy(host, udp_ports="*")

        def exchange() -> tuple[str, int, bytes]:
            control, relay = associate(port, host)
            with control:
                self.assertEqual(relay[0], host)
                return udp_exchange(relay, host, echo_port, b"ping")

        def check(answer: tuple[str, int, bytes]) -> None:
            self.assertEqual(answer, (host, echo_port, b"echo:ping"))
            [record] = self.records
            self.assertEqual(record.method, "UDP_ASSOCIATE")
            self.assertEqual(record.datagrams, 2)
            self.assertEqual(record.bytes_to_origin, 4)

        return self.settled(deferToThread(exchange)).addCallback(check)

    def test_udp_round_trip(self) -> Deferred[None]:
        """A datagram to an echo server and its answer, through UDP ASSOCIATE."""
        return self.udp_round_trip("127.0.0.1")

    def test_udp_round_trip_ipv6(self) -> Deferred[None]:
        """The same on ::1: the relay listens on the IPv6 address the client used."""
        return self.udp_round_trip("::1")

    def test_ipv6_listener_connect(self) -> Deferred[None]:
        """A SOCKS5 listener on ::1 tunnels to an IPv4 origin; an unlisted port is 0x02."""
        origin = self.start_origin(Data(BODY, "text/plain"))
        port = self.start_proxy("::1", connect_ports=f"{origin}")

        def fetch() -> tuple[bytes, int]:
            with connect(port, "127.0.0.1", origin, "::1") as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            try:
                connect(port, "127.0.0.1", origin + 1 if origin < 65535 else 1, "::1")
            except SocksRefused as e:
                return data, e.code
            return data, 0

        def check(result: tuple[bytes, int]) -> None:
            data, code = result
            self.assertTrue(data.endswith(BODY))
            self.assertEqual(code, 2)

        return deferToThread(fetch).addCallback(check)

    def test_login_required(self) -> Deferred[None]:
        """With --auth, a client that offers no login gets 0xFF."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        passwd = os.path.join(tmp, "htpasswd")
        with open(passwd, "w") as f:
            f.write(f"erin:{SHA1}\n")
        port = self.start_proxy(auth=passwd)

        def attempt() -> int:
            try:
                handshake(port).close()
            except SocksRefused as e:
                return e.code
            return 0

        return deferToThread(attempt).addCallback(self.assertEqual, 0xFF)


class SocksServiceTests(TestCase):
    """makeService serves --socks-port beside --port, with metrics and a graceful stop."""

    timeout = 30

    @inlineCallbacks
    def test_service(self) -> Any:
        """
        A SOCKS5 tunnel through makeService's listener shows in the metrics; stopping
        the service waits for it, and ends once the client closes.
        """
        origin = WrappingFactory(Site(Data(BODY, "text/plain")))
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(origin)
        self.addCleanup(listening.stopListening)
        config = ProxyConfig(
            port=["tcp:0:interface=127.0.0.1"],
            socks_port=["tcp:0:interface=127.0.0.1"],
            metrics="tcp:0:interface=127.0.0.1",
            connect_ports=None,
            shutdown_timeout=10,
        )
        service = makeService(config, reactor)
        service.startService()
        ports = {s.name: s.port.getHost().port for s in service if s.name}  # type: ignore[attr-defined]
        socks = ports["socks tcp:0:interface=127.0.0.1"]
        metrics = ports["metrics tcp:0:interface=127.0.0.1"]
        sock = yield deferToThread(connect, socks, "127.0.0.1", listening.getHost().port)
        page = yield deferToThread(run, ["curl", "-sS", f"http://127.0.0.1:{metrics}/metrics"])
        self.assertIn(b"aproxy_socks_sessions 1.0", page.stdout)
        self.assertIn(b"aproxy_tunnels 1.0", page.stdout)
        stopped = service.stopService()
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(stopped.called)  # (the tunnel is let finish)
        sock.close()
        yield stopped


class SocksWorkersTests(TestCase):
    """--socks-port shared by --workers, like --port."""

    timeout = 90

    def test_workers_serve_socks(self) -> Deferred[None]:
        """A real twistd with two workers serves SOCKS5 (to a refused port: 0x02)."""
        if sys.platform != "linux":
            raise SkipTest("the workers test runs on Linux")
        http, socks = free_port(), free_port()

        def go() -> list[int]:
            args = ["--port", str(http), "--socks-port", str(socks), "--workers", "2"]
            with tempfile.TemporaryDirectory() as tmp, twistd(args, tmp) as proc:
                wait_for_line(proc, b"worker running")
                wait_for_line(proc, b"worker running")
                codes: list[int] = []
                deadline = time.monotonic() + 20
                while len(codes) < 6:
                    try:
                        connect(socks, "127.0.0.1", 9).close()
                        codes.append(0)
                    except SocksRefused as e:
                        codes.append(e.code)
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                return codes

        return deferToThread(go).addCallback(self.assertEqual, [2] * 6)


class SocksInterceptTests(TLSTestCase):
    """--intercept applies to SOCKS5 CONNECTs as to HTTP ones."""

    def test_curl_intercepted(self) -> Deferred[None]:
        """curl through SOCKS5 to an HTTPS origin, trusting aproxy's CA: decrypted."""
        ca_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, ca_dir, True)
        records: list[Exchange] = []
        config = ProxyConfig(
            intercept=("*",), ca_dir=ca_dir, ca_file=self.ca_path, connect_ports=None
        )
        factory = TrackingProxyFactory(config, self.tracker)
        factory.observers.append(records.append)
        port = self.listen(SocksFactory(factory, reactor))
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        url = f"https://localhost:{origin}/inside"
        proxy_ca = os.path.join(ca_dir, "ca.pem")
        args = ["curl", "-sS", "--socks5-hostname", f"127.0.0.1:{port}", "--cacert", proxy_ca]

        def check(result: subprocess.CompletedProcess[bytes]) -> Deferred[None]:
            self.assertEqual(result.stdout, TLS_BODY, result.stderr)
            return _wait_for(lambda: not factory.connections).addCallback(records_seen)

        def records_seen(ignored: object) -> None:
            self.assertIn(url, [r.target for r in records])
            self.assertIn(("CONNECT", "SOCKS5"), [(r.method, r.version) for r in records])

        return deferToThread(run, [*args, url]).addCallback(check)


@inlineCallbacks
def _wait_for(condition: Any, seconds: float = 10) -> Any:
    """Poll C{condition} on the reactor until it holds (bounded)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        yield deferLater(reactor, 0.01, lambda: None)
