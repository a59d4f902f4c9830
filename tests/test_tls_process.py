"""
TLS and parent proxies as a user meets them: real C{twistd -n aproxy} processes, curl as
the client, origins on loopback (Python's http.server in threads, one of them over TLS
with a trustme certificate made here).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import trustme
from twisted.trial.unittest import SynchronousTestCase

from tests.loopback import origin
from tests.processes import TWISTD, free_port, start, stop, twistd, wait_for_line

TIMEOUT = 30


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run curl with only the proxy settings it is given."""
    exe = shutil.which("curl")
    assert exe is not None
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        [exe, "-q", "-sS", "--max-time", str(TIMEOUT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT + 5,
    )


class TLSProcessTests(SynchronousTestCase):
    """A TLS listener, a chain of two processes and the start-up errors."""

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        ca = trustme.CA()
        self.ca = self.path("ca.pem")
        ca.cert_pem.write_to_path(self.ca)
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.origin_pem = self.path("origin.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(self.origin_pem)
        self.key = self.path("proxy-key.pem")
        cert.private_key_pem.write_to_path(self.key)
        self.cert = self.path("proxy-cert.pem")
        cert.cert_chain_pems[0].write_to_path(self.cert)

    def path(self, name: str) -> str:
        """A file name in the test's folder."""
        return str(Path(self.tmp) / name)

    def test_tls_listener(self) -> None:
        """
        curl --proxy https://... fetches an http:// target and tunnels to an https://
        one; a Python TLS client sends an absolute https:// request.
        """
        port = free_port()
        listen = f"ssl:{port}:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1"
        args = ["--port", listen, "--ca-file", self.ca, "--connect-ports", "*"]
        with origin() as plain, origin(self.origin_pem) as secure, twistd(args, self.tmp) as proc:
            wait_for_line(proc, b"starting on")
            proxy = ["--proxy", f"https://127.0.0.1:{port}", "--proxy-cacert", self.ca]
            done = curl(*proxy, f"http://localhost:{plain}/a")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.startswith("hello /a via=1.1 aproxy"), done.stdout)
            done = curl(*proxy, "--cacert", self.ca, "-p", f"https://localhost:{secure}/b")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout, "hello /b via=-\n")
            context = ssl.create_default_context(cafile=self.ca)
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT),
                server_hostname="127.0.0.1",
            ) as tls:
                tls.sendall(
                    f"GET https://localhost:{secure}/c HTTP/1.1\r\nHost: x\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                raw = b""
                while chunk := tls.recv(65536):
                    raw += chunk
            self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw)
            self.assertIn(b"\r\n\r\nhello /c via=1.1 aproxy (", raw)

    def test_tls_listener_errors_do_not_leak_connections(self) -> None:
        """
        A 502 over a TLS listener (a refused origin) closes the client connection for
        good: three of them with --max-clients-per-ip 3 leave the address able to use the
        proxy (no 503), and SIGTERM does not wait for leftover connections.
        """
        port = free_port()
        closed = free_port()
        listen = f"ssl:{port}:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1"
        args = ["--port", listen, "--max-clients-per-ip", "3", "--shutdown-timeout", "20"]
        proxy = ["--proxy", f"https://127.0.0.1:{port}", "--proxy-cacert", self.ca]
        with origin() as plain:
            proc = start([TWISTD, "-n", "--pidfile=", "aproxy", *args], self.tmp)
            try:
                wait_for_line(proc, b"starting on")
                for _ in range(3):
                    done = curl(
                        *proxy,
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        f"http://127.0.0.1:{closed}/",
                    )
                    self.assertEqual(done.stdout, "502", done.stderr)
                # The proxy sees each curl's close a moment after curl exits: wait for
                # that (bounded); a leaked connection never goes and the answer is 503.
                deadline = time.monotonic() + 5
                while True:
                    done = curl(
                        *proxy,
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        f"http://127.0.0.1:{plain}/",
                    )
                    if done.stdout != "503" or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                self.assertEqual(done.stdout, "200", done.stderr)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(TIMEOUT)
                self.assertLess(time.monotonic() - started, 10)
            finally:
                stop(proc)

    def start_fails(self, *args: str) -> bytes:
        """Run twistd aproxy with C{args}; it must exit non-zero without a traceback."""
        proc = start([TWISTD, "-n", "--pidfile=", "aproxy", *args], self.tmp)
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            stop(proc)
        self.assertNotEqual(proc.returncode, 0)
        self.assertNotIn(b"Traceback", out)
        return out

    def test_missing_key_file(self) -> None:
        """A TLS listener whose key file is missing: one line and a non-zero exit."""
        listen = f"ssl:{free_port()}:privateKey={self.path('nope.pem')}:certKey={self.cert}"
        self.assertIn(b"nope.pem", self.start_fails("--port", listen))

    def test_missing_ca_file(self) -> None:
        """An unreadable --ca-file: one line and a non-zero exit."""
        self.assertIn(b"--ca-file", self.start_fails("--ca-file", self.path("none.pem")))

    def test_chain_with_parent_credentials(self) -> None:
        """
        A child aproxy sends everything to a parent aproxy that needs a login; plain
        requests and tunnels both work, and the parent logs the user.
        """
        digest = base64.b64encode(hashlib.sha1(b"s3cret").digest()).decode()
        users = self.path("users")
        Path(users).write_text(f"dana:{{SHA}}{digest}\n")
        parent_port, child_port = free_port(), free_port()
        log = self.path("parent.log")
        parent_args = ["--port", str(parent_port), "--auth", users, "--connect-ports", "*"]
        parent_args += ["--access-log", log, "--access-log-format", "json"]
        child_args = ["--port", str(child_port), "--connect-ports", "*"]
        child_args += ["--upstream", f"http://dana:s3cret@127.0.0.1:{parent_port}"]
        with (
            origin() as plain,
            origin(self.origin_pem) as secure,
            twistd(parent_args, self.tmp) as parent,
            twistd(child_args, self.tmp) as child,
        ):
            wait_for_line(parent, b"starting on")
            wait_for_line(child, b"starting on")
            proxy = ["-x", f"http://127.0.0.1:{child_port}"]
            done = curl(*proxy, f"http://localhost:{plain}/p")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.startswith("hello /p via=1.1 aproxy"), done.stdout)
            self.assertEqual(done.stdout.count("aproxy ("), 2, done.stdout)
            done = curl(*proxy, "-p", "--cacert", self.ca, f"https://localhost:{secure}/t")
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout, "hello /t via=-\n")
        lines = Path(log).read_text().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(all('"user":"dana"' in line for line in lines), lines)

    def test_insecure_host_warning(self) -> None:
        """--insecure-host is announced at start as a warning (and the heap is frozen)."""
        args = ["--port", str(free_port()), "--insecure-host", "self-signed.test"]
        with twistd(args, self.tmp) as proc:
            seen = wait_for_line(proc, b"NOT verified")
            wait_for_line(proc, b"start-up heap frozen")
        self.assertIn(b"self-signed.test", seen)
