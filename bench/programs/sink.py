"""
Upload sink for the aproxy benchmark: reads every request body to its end, discards it.

Answers each request (after its whole body: Content-Length or chunked) with 200 and the
number of body bytes received, in decimal, as the response body. A thread per connection,
recv_into a 1 MiB buffer: the kernel copy is the only per-byte cost. Run by the benchmark
as C{python sink.py PORT} on 127.0.0.1.
"""

from __future__ import annotations

import socket
import sys
import threading


def read_line(conn: socket.socket, rest: bytes) -> tuple[bytes, bytes]:
    """Read up to the next CRLF: (the line without it, the bytes after it)."""
    while b"\r\n" not in rest:
        data = conn.recv(65536)
        if not data or len(rest) > 65536:
            raise OSError("connection closed or line too long")
        rest += data
    line, _, rest = rest.partition(b"\r\n")
    return line, rest


def read_exact(conn: socket.socket, rest: bytes, n: int, view: memoryview) -> bytes:
    """Consume C{n} body bytes (first from C{rest}); return what is left of C{rest}."""
    if len(rest) >= n:
        return rest[n:]
    left = n - len(rest)
    while left:
        k = conn.recv_into(view, min(left, len(view)))
        if not k:
            raise OSError("connection closed inside a body")
        left -= k
    return b""


def read_chunked(conn: socket.socket, rest: bytes, view: memoryview) -> tuple[int, bytes]:
    """Consume a chunked body and its trailers: (body bytes, the bytes after it)."""
    total = 0
    while True:
        line, rest = read_line(conn, rest)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while True:
                line, rest = read_line(conn, rest)
                if not line:
                    return total, rest
        rest = read_exact(conn, rest, size, view)
        total += size
        line, rest = read_line(conn, rest)


def serve(conn: socket.socket) -> None:
    """Answer the requests of one connection, each after its whole body, until it closes."""
    view = memoryview(bytearray(1 << 20))
    rest = b""
    try:
        while True:
            while b"\r\n\r\n" not in rest:
                data = conn.recv(65536)
                if not data or len(rest) > 65536:
                    return
                rest += data
            head, _, rest = rest.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            close = lines[0].endswith(b"HTTP/1.0")
            length, chunked, expect = 0, False, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value
                elif name == b"connection":
                    close = b"close" in value
                elif name == b"expect":
                    expect = value == b"100-continue"
            if expect:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if chunked:
                got, rest = read_chunked(conn, rest, view)
            else:
                rest, got = read_exact(conn, rest, length, view), length
            body = str(got).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"%s\r\n%s" % (len(body), b"Connection: close\r\n" if close else b"", body)
            )
            if close:
                return
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    """Listen on 127.0.0.1:C{sys.argv[1]}, a thread per connection, until killed."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(60)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
