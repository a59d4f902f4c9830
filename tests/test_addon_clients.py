"""
Addons as a new user runs them (issue #16): C{twistd -n aproxy} with the addons of
examples/addons (and an async one of the test's), on loopback, used by curl, wget,
requests, httpx and urllib3; plain http and intercepted https.

This machine's environment may name proxies or CA bundles for the clients: they run with
those variables removed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme
from twisted.trial.unittest import SkipTest, TestCase

from tests.processes import free_port, twistd, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "addons"
PAGE = b"<html><body><p>Put it in the cloud, the cloud is safe.</p></body></html>\n" * 200
REWRITTEN = PAGE.replace(b"the cloud", b"other people's computers")
_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)

ASYNC_ADDON = """
from twisted.internet import reactor
from twisted.internet.task import deferLater


class Slow:
    async def request(self, exchange):
        await deferLater(reactor, 0.05, lambda: None)
        exchange.request.fields.set("X-Slow", "waited")

    def response(self, exchange):
        echoed = exchange.response.fields.get("X-Echo-Slow")
        if echoed:
            exchange.response.fields.set("X-Slow-Seen", echoed)
"""


def clean_env() -> dict[str, str]:
    """The environment without proxy and CA variables."""
    return {k: v for k, v in os.environ.items() if k not in _VARIABLES}


class _Handler(BaseHTTPRequestHandler):
    """The origin: a gzip page sent chunked, a plain page, an executable, an echo."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("://", 1)[-1]
        path = path[path.find("/") :]
        if path == "/gzip.html":
            body = gzip.compress(PAGE)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Server", "origin/1.0")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 700):
                piece = body[i : i + 700]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/app.exe":
            body, kind = b"MZ" + b"\0" * 100, "application/x-msdownload"
        elif path == "/plain.html":
            body, kind = PAGE, "text/html"
        else:
            body, kind = b"echo\n", "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Server", "origin/1.0")
        self.send_header("X-Powered-By", "test")
        self.send_header("X-Echo-Request-Id", self.headers.get("X-Request-Id", ""))
        self.send_header("X-Echo-Slow", self.headers.get("X-Slow", ""))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def origin(context: ssl.SSLContext | None = None) -> Iterator[int]:
    """The origin on an ephemeral loopback port (TLS with C{context}) while in the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def addon_args(*names: str) -> list[str]:
    """--addon for each example, by file name and class."""
    classes = {
        "headers": "Headers",
        "rewrite_html": "RewriteHtml",
        "block_types": "BlockTypes",
        "local_page": "LocalPage",
        "count_users": "CountUsers",
    }
    args = []
    for name in names:
        args += ["--addon", f"{EXAMPLES / name}.py:{classes[name]}"]
    return args


class AddonClientTests(TestCase):
    """The examples through a real twistd, with the clients people use."""

    timeout = 120

    def run_proxy(self, *extra: str) -> int:
        """A twistd aproxy with C{extra} options, listening; its port."""
        port = free_port()
        self.work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.work, True)
        manager = twistd(["--port", f"tcp:{port}:interface=127.0.0.1", *extra], self.work)
        proc = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        wait_for_line(proc, b"starting on", 30)
        return port

    def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """curl with C{args}, its headers in the output."""
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        return subprocess.run(
            ["curl", "-sS", "-i", "--max-time", "20", *args],
            env=clean_env(),
            capture_output=True,
            timeout=30,
            check=True,
        )

    def test_examples_with_curl_and_wget(self) -> None:
        """Every example at once: rewritten gzip page, stripped fields, block, local page."""
        port = self.run_proxy(
            *addon_args("headers", "rewrite_html", "block_types", "local_page", "count_users")
        )
        proxy = f"http://127.0.0.1:{port}"
        with origin() as web:
            base = f"http://127.0.0.1:{web}"
            page = self.curl("--compressed", "-x", proxy, base + "/gzip.html").stdout
            head, _, body = page.partition(b"\r\n\r\n")
            self.assertEqual(body, REWRITTEN)
            self.assertNotIn(b"Server:", head)
            self.assertIn(b"X-Content-Type-Options: nosniff", head)
            echo = self.curl("-x", proxy, base + "/echo").stdout
            self.assertRegex(echo, rb"X-Echo-Request-Id: \d+")
            self.assertNotIn(b"X-Powered-By", echo)
            blocked = self.curl("-x", proxy, base + "/app.exe").stdout
            self.assertTrue(blocked.startswith(b"HTTP/1.1 403 "), blocked)
            local = self.curl("-x", proxy, "http://proxy.test/").stdout
            self.assertIn(b"this page comes from the proxy", local)
            counts = self.curl("-x", proxy, "http://counts.proxy.test/").stdout
            self.assertIn(b'{"127.0.0.1": 4}', counts)
            if shutil.which("wget") is not None:
                out = os.path.join(self.work, "page.html")
                env = dict(clean_env(), http_proxy=proxy)
                subprocess.run(
                    ["wget", "-q", "-O", out, base + "/plain.html"],
                    env=env,
                    timeout=30,
                    check=True,
                )
                self.assertEqual(Path(out).read_bytes(), REWRITTEN)

    def test_python_clients_and_an_async_addon(self) -> None:
        """requests, httpx and urllib3 through an async def hook and the rewrite."""
        import httpx
        import requests
        import urllib3

        path = os.path.join(tempfile.mkdtemp(), "slow.py")
        self.addCleanup(shutil.rmtree, os.path.dirname(path), True)
        Path(path).write_text(textwrap.dedent(ASYNC_ADDON))
        port = self.run_proxy("--addon", f"{path}:Slow", *addon_args("rewrite_html"))
        proxy = f"http://127.0.0.1:{port}"
        with origin() as web:
            base = f"http://127.0.0.1:{web}"
            with requests.Session() as session:
                session.trust_env = False
                got = session.get(base + "/gzip.html", proxies={"http": proxy}, timeout=20)
                self.assertEqual(got.content, REWRITTEN)
                echo = session.get(base + "/echo", proxies={"http": proxy}, timeout=20)
                self.assertEqual(echo.headers["X-Slow-Seen"], "waited")
            with httpx.Client(proxy=proxy, trust_env=False) as client:
                self.assertEqual(client.get(base + "/plain.html", timeout=20).content, REWRITTEN)
            pool = urllib3.ProxyManager(proxy)
            answer = pool.request("GET", base + "/gzip.html", timeout=20)
            self.assertEqual(answer.data, REWRITTEN)

    def test_intercepted_https(self) -> None:
        """With --intercept, hooks see and rewrite the requests inside an HTTPS tunnel."""
        import requests

        ca = trustme.CA()
        ca_file = os.path.join(tempfile.mkdtemp(), "origin-ca.pem")
        self.addCleanup(shutil.rmtree, os.path.dirname(ca_file), True)
        ca.cert_pem.write_to_path(ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(context)
        ca_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, ca_dir, True)
        port = self.run_proxy(
            *("--intercept", "*", "--ca-dir", ca_dir, "--ca-file", ca_file),
            *("--connect-ports", "1-65535"),
            *addon_args("headers", "rewrite_html"),
        )
        with origin(context) as web:
            with requests.Session() as session:
                session.trust_env = False
                got = session.get(
                    f"https://localhost:{web}/gzip.html",
                    proxies={"https": f"http://127.0.0.1:{port}"},
                    verify=os.path.join(ca_dir, "ca.pem"),
                    timeout=20,
                )
        self.assertEqual(got.content, REWRITTEN)
        self.assertEqual(got.headers["X-Content-Type-Options"], "nosniff")
        self.assertNotIn("Server", got.headers)

    def test_bad_addon_is_one_line(self) -> None:
        """A missing addon: one line on stderr naming it, exit status 2."""
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work, True)
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("twistd")),
                *("-n", "--pidfile=", "aproxy", "--addon", "nowhere_xyz:Thing"),
            ],
            cwd=work,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(proc.returncode, 2)
        lines = [line for line in proc.stderr.decode().splitlines() if "nowhere_xyz" in line]
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertNotIn(b"Traceback", proc.stderr)
