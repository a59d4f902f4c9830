"""
A small blocking SOCKS5 client for the integration tests (no test cases of its own):
the handshake with or without a login, CONNECT, and UDP ASSOCIATE with its datagrams.
Few real clients do UDP over SOCKS, so the UDP round trip is tested with this one.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from aproxy.socks.wire import datagram_header, encode_address, parse_datagram

__all__ = ["SocksRefused", "associate", "connect", "handshake", "read_reply", "udp_exchange"]


class SocksRefused(Exception):
    """The proxy refused: C{code} is its reply code (or 0xFF for the method choice)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS5 refusal {code:#04x}")
        self.code = code


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        data += chunk
    return data


def handshake(
    port: int, host: str = "127.0.0.1", user: str | None = None, password: str = ""
) -> socket.socket:
    """A connection to the proxy past the method choice (and the login)."""
    sock = socket.create_connection((host, port), timeout=20)
    try:
        sock.sendall(b"\x05\x01\x02" if user is not None else b"\x05\x01\x00")
        answer = _read(sock, 2)
        if answer[1] == 0xFF:
            raise SocksRefused(0xFF)
        if user is not None:
            name, secret = user.encode(), password.encode()
            sock.sendall(b"\x01" + bytes([len(name)]) + name + bytes([len(secret)]) + secret)
            status = _read(sock, 2)
            if status[1] != 0:
                raise SocksRefused(0xFF)
    except BaseException:
        sock.close()
        raise
    return sock


def read_reply(sock: socket.socket) -> tuple[str, int]:
    """Read a request reply; the bound address, or raise L{SocksRefused}."""
    head = _read(sock, 4)
    kind = head[3]
    size = {1: 4, 4: 16}.get(kind)
    raw = _read(sock, size if size is not None else _read(sock, 1)[0])
    (port,) = struct.unpack("!H", _read(sock, 2))
    if head[1] != 0:
        raise SocksRefused(head[1])
    host = str(ipaddress.ip_address(raw)) if size is not None else raw.decode()
    return host, port


def connect(
    port: int,
    dest: str,
    dest_port: int,
    proxy_host: str = "127.0.0.1",
    user: str | None = None,
    password: str = "",
) -> socket.socket:
    """A tunnel through the proxy to C{dest}:C{dest_port}."""
    sock = handshake(port, proxy_host, user, password)
    try:
        sock.sendall(b"\x05\x01\x00" + encode_address(dest, dest_port))
        read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def associate(port: int, proxy_host: str = "127.0.0.1") -> tuple[socket.socket, tuple[str, int]]:
    """A UDP association (requested as 0.0.0.0:0): the control connection and the relay."""
    sock = handshake(port, proxy_host)
    try:
        sock.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        relay = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, relay


def udp_exchange(
    relay: tuple[str, int], dest: str, dest_port: int, payload: bytes, timeout: float = 10
) -> tuple[str, int, bytes]:
    """Send one datagram through C{relay} and return (source host, port, data) of the reply."""
    family = socket.AF_INET6 if ":" in relay[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.settimeout(timeout)
        udp.sendto(datagram_header(dest, dest_port) + payload, relay)
        data, _ = udp.recvfrom(65535)
    answer = parse_datagram(data)
    return answer.host, answer.port, answer.payload
