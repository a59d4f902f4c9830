"""
Real clients through an intercepting proxy (its CA made at test time), to HTTPS origins
on loopback: requests and httpx with verify=, git clone and pip download. Each client's
inner requests are in the proxy's records as https:// exchanges.

This machine's environment may point curl, git, pip and requests at the system's CA
bundle (GIT_SSL_CAINFO, PIP_CERT, ...), which would override the CA given on the command
line: the clients run with those variables removed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest
from twisted.web.server import Site
from twisted.web.static import File

from aproxy.config import ProxyConfig
from aproxy.observe.records import Exchange
from tests.tlsharness import TLSTestCase
from tests.tunnels import TLS_BODY, TrackingProxyFactory, TrackingTLSFactory

_CA_VARIABLES = (
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIP_CONFIG_FILE",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the variables that name another CA or index."""
    env = {k: v for k, v in os.environ.items() if k not in _CA_VARIABLES}
    env.update(extra)
    return env


def make_wheel(directory: str, name: str = "demo", version: str = "1.0") -> str:
    """A minimal valid pure-Python wheel in C{directory}; return its file name."""
    filename = f"{name}-{version}-py3-none-any.whl"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
        ),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(os.path.join(directory, filename), "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return filename


class InterceptedClientsTests(TLSTestCase):
    """requests, httpx, git and pip through an intercepting proxy."""

    def setUp(self) -> None:
        super().setUp()
        self.ca_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.ca_dir, True)
        self.proxy_ca = os.path.join(self.ca_dir, "ca.pem")
        self.records: list[Exchange] = []
        factory = TrackingProxyFactory(
            ProxyConfig(
                intercept=("*",), ca_dir=self.ca_dir, ca_file=self.ca_path, connect_ports=None
            ),
            self.tracker,
        )
        factory.observers.append(self.records.append)
        self.port = self.listen(factory)
        self.proxy_url = f"http://127.0.0.1:{self.port}"

    def static_origin(self, root: str) -> int:
        """An HTTPS origin for localhost serving the files under C{root}."""
        cert = self.ca.issue_cert("localhost")
        options = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
        return self.listen(TrackingTLSFactory(options, Site(File(root)), self.tracker))

    def inner_targets(self) -> list[str]:
        """The https:// targets the proxy recorded."""
        return [r.target for r in self.records if r.target.startswith("https://")]

    def test_requests_and_httpx(self) -> Deferred[None]:
        """requests (verify=path) and httpx (verify=context) get the origin's body."""
        try:
            import httpx
            import requests
        except ImportError:
            raise SkipTest("requests or httpx is not installed") from None
        origin, _ = self.tls_origin(self.ca.issue_cert("localhost"))
        url = f"https://localhost:{origin}/"

        def run() -> tuple[bytes, bytes]:
            with requests.Session() as session:
                session.trust_env = False
                one = session.get(
                    url + "requests",
                    proxies={"https": self.proxy_url},
                    verify=self.proxy_ca,
                    timeout=20,
                ).content
            context = ssl.create_default_context(cafile=self.proxy_ca)
            with httpx.Client(proxy=self.proxy_url, verify=context, trust_env=False) as client:
                two = client.get(url + "httpx", timeout=20).content
            return one, two

        def check(bodies: tuple[bytes, bytes]) -> None:
            self.assertEqual(bodies, (TLS_BODY, TLS_BODY))
            targets = self.inner_targets()
            self.assertIn(url + "requests", targets)
            self.assertIn(url + "httpx", targets)

        return deferToThread(run).addCallback(check)

    def test_git_clone(self) -> Deferred[None]:
        """git clone over https:// (dumb HTTP) with http.sslCAInfo set to aproxy's CA."""
        if shutil.which("git") is None:
            raise SkipTest("git is not installed")
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        work = os.path.join(root, "work")
        env = clean_env(GIT_TERMINAL_PROMPT="0", HOME=root)
        quiet: dict[str, Any] = {"env": env, "check": True, "capture_output": True}
        subprocess.run(["git", "init", "-q", work], **quiet)
        with open(os.path.join(work, "README"), "w") as f:
            f.write("hello through the proxy\n")
        subprocess.run(["git", "-C", work, "add", "README"], **quiet)
        subprocess.run(
            [
                *("git", "-C", work, "-c", "user.name=t", "-c", "user.email=t@example.com"),
                *("commit", "-qm", "first"),
            ],
            **quiet,
        )
        served = os.path.join(root, "served")
        os.mkdir(served)
        bare = os.path.join(served, "repo.git")
        subprocess.run(["git", "clone", "-q", "--bare", work, bare], **quiet)
        subprocess.run(["git", "-C", bare, "update-server-info"], **quiet)
        origin = self.static_origin(served)
        clone = os.path.join(root, "clone")

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    *("git", "-c", f"http.proxy={self.proxy_url}"),
                    *("-c", f"http.sslCAInfo={self.proxy_ca}"),
                    *("clone", "-q", f"https://localhost:{origin}/repo.git", clone),
                ],
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(os.path.join(clone, "README")) as f:
                self.assertEqual(f.read(), "hello through the proxy\n")
            self.assertTrue(any("/repo.git/info/refs" in t for t in self.inner_targets()))

        return deferToThread(run).addCallback(check)

    def test_pip_download(self) -> Deferred[None]:
        """pip download from an https:// simple index with --cert aproxy's CA."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        package = os.path.join(root, "simple", "demo")
        os.makedirs(package)
        wheel = make_wheel(package)
        with open(os.path.join(package, "index.html"), "w") as f:
            f.write(f'<html><body><a href="{wheel}">{wheel}</a></body></html>\n')
        origin = self.static_origin(root)
        out = os.path.join(root, "out")
        env = clean_env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"),
                    *("--proxy", self.proxy_url, "--cert", self.proxy_ca),
                    *("--index-url", f"https://localhost:{origin}/simple", "-d", out, "demo"),
                ],
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(os.listdir(out), [wheel])
            self.assertTrue(any(t.endswith("/simple/demo/" + wheel) for t in self.inner_targets()))

        return deferToThread(run).addCallback(check)
