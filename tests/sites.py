"""An in-memory client for Twisted web sites (the metrics and status pages)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.test import iosim
from twisted.web.server import Site

__all__ = ["Collect", "fetch"]


class Collect(Protocol):
    """A client that keeps every byte it receives."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        """Keep the bytes."""
        self.data += data


def fetch(site: Site, path: bytes, method: bytes = b"GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Send one request to C{site} over in-memory transports and parse the answer.

    @return: The status code, the header fields (lower-cased names) and the body.
    """
    server = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9090))
    client = Collect()
    transport = iosim.makeFakeClient(client)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, transport, greet=False)
    transport.write(
        method + b" " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    pump.flush()
    head, _, body = client.data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body
