"""
Fallback benchmark origin (no nginx): serves the files of one directory over HTTP/1.1.

Run by the benchmark as C{python origin.py PORT DIR [MAX_AGE]} on 127.0.0.1 when nginx is
not installed (or C{--no-nginx}); standard library only. With C{MAX_AGE} every 200 answer
says C{Cache-Control: max-age=MAX_AGE} (bench/cache_bench.py's cacheable origin, as nginx's
C{expires}); a query string is ignored when looking up the file (as nginx's C{$uri}), so
C{/100k?n=1} and C{/100k?n=2} are distinct URLs for a cache but the same file.
"""

from __future__ import annotations

import asyncio
import os
import sys


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, root: str, cache: bytes
) -> None:
    """
    Answer the requests of one connection with the files in C{root} (404 otherwise);
    C{cache} is an extra header line for 200 answers (or empty).
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            close = version == b"HTTP/1.0"
            for line in lines[1:]:
                field, _, value = line.partition(b":")
                if field.strip().lower() == b"connection":
                    close = b"close" in value.lower()
            if target.startswith(b"http://"):
                target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
            name = target.split(b"?", 1)[0].decode("ascii", "replace").lstrip("/")
            path = os.path.join(root, name)
            conn = b"Connection: close\r\n" if close else b""
            if "/" in name or not name or not os.path.isfile(path):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n" + conn + b"\r\n")
            else:
                size = os.path.getsize(path)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n%s%s\r\n" % (size, cache, conn)
                )
                if method != b"HEAD":
                    with open(path, "rb") as f:
                        if size > 65536:
                            await writer.drain()
                            await loop.sendfile(writer.transport, f)
                        else:
                            writer.write(f.read())
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    """Serve C{sys.argv[2]} on 127.0.0.1:C{sys.argv[1]} until killed."""
    port, root = int(sys.argv[1]), sys.argv[2]
    cache = b"Cache-Control: max-age=%d\r\n" % int(sys.argv[3]) if len(sys.argv) > 3 else b""
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, root, cache), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
