"""
Small HTTP/1.1 clients over plain sockets (readiness probe, CONNECT tunnel, upload) and
L{Target}: where a client connects and what it asks for.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from .settings import LOOPBACK

__all__ = ["Target", "http_fetch", "http_post_file", "parse_head", "request_bytes"]


def parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """Status, Content-Length (or None) and whether C{Connection: close} was sent."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    close = lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, close


def request_bytes(
    target: str, host: str, close: bool = False, agent: str = "aproxy-bench"
) -> bytes:
    """An HTTP/1.1 GET request head."""
    extra = "Connection: close\r\n" if close else ""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n{extra}\r\n".encode()


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head from C{s}: (head without the blank line, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise OSError(f"connection closed before a full response head ({buf[:80]!r})")
        buf += data
        if len(buf) > 1 << 20:
            raise OSError("response head larger than 1 MiB")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _open_tunnel(s: socket.socket, authority: str) -> None:
    """Send C{CONNECT authority} on C{s} and read the proxy's answer; raise unless 200."""
    s.sendall(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        "User-Agent: aproxy-bench\r\n\r\n".encode()
    )
    head, rest = _read_head(s)
    status = int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1])
    if status != 200 or rest:
        raise OSError(f"CONNECT {authority} answered {status} ({len(rest)} extra bytes)")


def http_fetch(
    port: int, target: str, host: str, timeout: float = 5.0, tunnel: bool = False
) -> tuple[int, int]:
    """
    One GET with C{Connection: close}: (status, body bytes read). Raises OSError. With
    C{tunnel}, first C{CONNECT host} through the proxy at C{port}, then GET C{target}
    (origin form) inside the tunnel.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.settimeout(timeout)
        if tunnel:
            _open_tunnel(s, host)
        s.sendall(request_bytes(target, host, close=True, agent="aproxy-bench-probe"))
        head, body = _read_head(s)
        status, length, _ = parse_head(head)
        got = len(body)
        while length is None or got < length:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        return status, got


def http_post_file(
    port: int, target: str, host: str, path: Path, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One POST of the file at C{path} (Content-Length, sendfile): (status, response body)."""
    size = path.stat().st_size
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: aproxy-bench-upload\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
        )
        with open(path, "rb") as f:
            s.sendfile(f)
        head, body = _read_head(s)
        status, length, _ = parse_head(head)
        while length is None or len(body) < length:
            data = s.recv(65536)
            if not data:
                break
            body += data
        return status, body


@dataclass(frozen=True)
class Target:
    """Where a client connects and what it asks for: direct (origin) or through aproxy."""

    name: str
    port: int
    origin_port: int
    via_proxy: bool

    @property
    def host(self) -> str:
        """The Host header: always the origin."""
        return f"{LOOPBACK}:{self.origin_port}"

    def target(self, path: str) -> str:
        """Request target: absolute form through the proxy, origin form directly."""
        return f"http://{self.host}{path}" if self.via_proxy else path
