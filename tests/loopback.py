"""
Loopback helpers for the integration and process tests (no test cases of its own): blocking
clients with socket timeouts shorter than any test's, and a threaded HTTP(S) origin. Test
modules import from here, never from each other.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How long stopping the threaded origin may take.
ORIGIN_STOP_TIMEOUT = 30


# Socket timeouts for the blocking clients: shorter than the test timeout, so a hang fails
# with a client-side error that says where it hung.
CLIENT_TIMEOUT = 20.0
LOCAL = "127.0.0.1"


class Response:
    """A response as a raw client read it: status, fields in order and the decoded body."""

    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        version, status, *_ = lines[0].split(b" ", 2)
        self.version = version
        self.status = int(status)
        self.fields = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.fields.append((name.lower(), value.strip(b" \t")))
        self.body = b""

    def headers(self, name: bytes) -> list[bytes]:
        """Every value of the field C{name} (case-insensitive)."""
        return [v for n, v in self.fields if n == name.lower()]

    def header(self, name: bytes) -> bytes | None:
        """The value(s) of the field C{name} joined with commas, or L{None}."""
        values = self.headers(name)
        return b", ".join(values) if values else None


class RawClient:
    """A blocking socket client that writes bytes and reads responses by HTTP/1.1 framing."""

    def __init__(self, port: int, host: str = LOCAL) -> None:
        self.sock = socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)
        self.buf = b""

    @classmethod
    def wrap(cls, sock: socket.socket) -> RawClient:
        """A client on an already connected socket (one with its own options)."""
        client = cls.__new__(cls)
        client.sock = sock
        client.buf = b""
        return client

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write C{data} completely."""
        self.sock.sendall(data)

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_head(self) -> Response:
        """Read one response head (interim or final)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise EOFError(f"connection closed before a response head: {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return Response(head)

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} body bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise EOFError("connection closed inside chunked framing")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._read_line().split(b";")[0], 16)
            if not size:
                break
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
        while self._read_line():
            pass  # trailer fields
        return b"".join(parts)

    def read_response(self, method: bytes = b"GET") -> Response:
        """Read one response (an interim one included) with its body, framed per RFC 9112."""
        resp = self.read_head()
        if resp.status < 200 or method == b"HEAD" or resp.status in (204, 304):
            return resp
        te = resp.header(b"transfer-encoding")
        cl = resp.header(b"content-length")
        if te is not None and te.lower().endswith(b"chunked"):
            resp.body = self._read_chunked()
        elif cl is not None:
            resp.body = self._read_exact(int(cl))
        else:
            resp.body = self.read_to_close()
        return resp

    def read_to_close(self) -> bytes:
        """Read until the peer closes; return everything not consumed yet."""
        while self._more():
            pass
        data, self.buf = self.buf, b""
        return data


def exchange(port: int, data: bytes, method: bytes = b"GET") -> tuple[Response, bytes]:
    """Send C{data}, read one response, then read until close; return both."""
    with RawClient(port) as c:
        c.send(data)
        resp = c.read_response(method)
        return resp, c.read_to_close()


def get(url: str, host: str = LOCAL, minor: int = 1, extra: bytes = b"") -> bytes:
    """An absolute-form GET request head for C{url}."""
    authority = url.split("/")[2].encode("ascii")
    return b"GET %s HTTP/1.%d\r\nHost: %s\r\n%s\r\n" % (
        url.encode("ascii"),
        minor,
        authority,
        extra,
    )


class _Hello(BaseHTTPRequestHandler):
    """Answers every GET with its path and the Via fields it arrived with."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        """Say hello, naming the path and the proxies on the way."""
        via = ", ".join(self.headers.get_all("Via") or ["-"])
        body = f"hello {self.path} via={via}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextmanager
def origin(cert_file: str | None = None) -> Iterator[int]:
    """An HTTP origin on 127.0.0.1 (HTTPS with C{cert_file}) for the block; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    if cert_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(ORIGIN_STOP_TIMEOUT)


def fetch_all(port: int, paths: list[str], origin_port: int) -> list[tuple[int, bytes]]:
    """GET each path of the origin through the proxy at C{port}, on one connection."""
    conn = http.client.HTTPConnection(LOCAL, port, timeout=CLIENT_TIMEOUT)
    out = []
    try:
        for path in paths:
            conn.request("GET", f"http://{LOCAL}:{origin_port}{path}")
            response = conn.getresponse()
            out.append((response.status, response.read()))
    finally:
        conn.close()
    return out
