"""
The PROXY protocol header (versions 1 and 2) a load balancer sends before the client's
bytes, read sans-IO: feed bytes, get the header once it is complete, or an error.

Only what a TCP forward proxy can use is accepted: a v1 C{TCP4}/C{TCP6} line, a v2
C{PROXY} command for an IPv4 or IPv6 stream connection, and a v2 C{LOCAL} command (the
load balancer's own connection, e.g. a health check). Everything else is refused rather
than guessed at: v1 C{UNKNOWN} and v2 C{UNSPEC} (no client address to check), v2
C{AF_UNIX} (the same), datagram transports, malformed addresses and ports. The format is
HAProxy's "The PROXY protocol, versions 1 & 2" (doc/proxy-protocol.txt).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["ProxyHeader", "ProxyHeaderError", "ProxyHeaderReader", "parse_v1"]

# Version 1: one text line of at most 107 bytes, CRLF included (section 2.1).
_V1_PREFIX = b"PROXY "
_V1_MAX = 107
# Version 2: a 12-byte signature, then version/command, family/transport and a 16-bit
# length of what follows (section 2.2).
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_TCP4, _V2_TCP6 = 0x11, 0x21
_V2_ADDRESS_SIZE = {_V2_TCP4: 12, _V2_TCP6: 36}
_V2_FAMILY_NAMES = {0x0: "UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this proxy accepts (the reason says why)."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A complete PROXY header.

    @ivar version: 1 or 2.
    @ivar source: The client's (address, port), or L{None} for a v2 C{LOCAL} command:
        the connection is the load balancer's own, so its real peer address applies.
    @ivar destination: The address and port the client connected to, or L{None}.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyHeaderReader:
    """
    Reads one PROXY header from the start of a connection.

    L{feed} buffers bytes until the header is complete (at most 107 bytes for v1, 16 plus
    the announced length for v2), then returns it; the bytes after it are in L{rest}.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.rest = b""

    @property
    def pending(self) -> bool:
        """Whether part of a header has arrived, and not the rest."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """
        Take more bytes from the connection.

        @return: The header once it is complete, L{None} while more bytes are needed.
        @raise ProxyHeaderError: As soon as the bytes can't be an accepted header.
        """
        buffer = self._buffer = self._buffer + data
        if not buffer:
            return None
        if buffer[:1] == _V1_PREFIX[:1]:
            return self._feed_v1(buffer)
        if buffer[:1] == _V2_SIGNATURE[:1]:
            return self._feed_v2(buffer)
        raise ProxyHeaderError("no PROXY header")

    def _done(self, header: ProxyHeader, size: int) -> ProxyHeader:
        self.rest = self._buffer[size:]
        self._buffer = b""
        return header

    def _feed_v1(self, buffer: bytes) -> ProxyHeader | None:
        if not buffer.startswith(_V1_PREFIX[: len(buffer)]):
            raise ProxyHeaderError("no PROXY header")
        end = buffer.find(b"\r\n", 0, _V1_MAX)
        if end < 0:
            if len(buffer) >= _V1_MAX or b"\n" in buffer:
                raise ProxyHeaderError("PROXY v1 line is malformed or longer than 107 bytes")
            return None
        return self._done(parse_v1(buffer[:end]), end + 2)

    def _feed_v2(self, buffer: bytes) -> ProxyHeader | None:
        if not buffer.startswith(_V2_SIGNATURE[: len(buffer)]):
            raise ProxyHeaderError("no PROXY header")
        if len(buffer) < _V2_FIXED:
            return None
        size = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
        command, family = buffer[12], buffer[13]
        # Check what is known before waiting for the rest of a long header.
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"PROXY v2 version/command 0x{command:02x} is not supported")
        if command == _V2_PROXY:
            _check_v2_family(family, size - _V2_FIXED)
        if len(buffer) < size:
            return None
        if command == _V2_LOCAL:
            return self._done(ProxyHeader(2, None, None), size)
        block = buffer[_V2_FIXED:size]
        if family == _V2_TCP4:
            header = ProxyHeader(
                2,
                (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big")),
                (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big")),
            )
        else:
            header = ProxyHeader(
                2,
                (str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big")),
                (str(ipaddress.IPv6Address(block[16:32])), int.from_bytes(block[34:36], "big")),
            )
        return self._done(header, size)


def _check_v2_family(family: int, length: int) -> None:
    """Refuse a v2 PROXY command whose addresses are not an IPv4/IPv6 stream's."""
    needed = _V2_ADDRESS_SIZE.get(family)
    if needed is None:
        kind, transport = family >> 4, family & 0x0F
        if kind in (0x0, 0x3):
            name = _V2_FAMILY_NAMES[kind]
            raise ProxyHeaderError(f"PROXY v2 {name} addresses carry no client address")
        if kind in (0x1, 0x2) and transport == 0x2:
            raise ProxyHeaderError("PROXY v2 datagram connections are not supported")
        raise ProxyHeaderError(f"PROXY v2 family/transport 0x{family:02x} is not supported")
    if length < needed:
        raise ProxyHeaderError("PROXY v2 address block is too short")


def parse_v1(line: bytes) -> ProxyHeader:
    """
    Parse a v1 header line without its CRLF: C{PROXY TCP4|TCP6 SRC DST SPORT DPORT}.

    @raise ProxyHeaderError: For C{UNKNOWN}, or anything that is not exactly that form
        with addresses of the named family and decimal ports in 0..65535.
    """
    fields = line.split(b" ")
    if len(fields) < 2 or fields[0] != b"PROXY":
        raise ProxyHeaderError("no PROXY header")
    if fields[1] == b"UNKNOWN":
        raise ProxyHeaderError("PROXY v1 UNKNOWN carries no client address")
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 line is malformed")
    kind = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
    if b"%" in fields[2] or b"%" in fields[3]:
        # Python accepts IPv6 scope ids ("fe80::1%eth0"); the format has none.
        raise ProxyHeaderError("PROXY v1 address is malformed")
    try:
        source = kind(fields[2].decode("ascii"))
        destination = kind(fields[3].decode("ascii"))
    except ValueError:
        raise ProxyHeaderError("PROXY v1 address is malformed") from None
    return ProxyHeader(
        1, (str(source), _v1_port(fields[4])), (str(destination), _v1_port(fields[5]))
    )


def _v1_port(text: bytes) -> int:
    # Decimal without sign or leading zeros (the format allows nothing else).
    if not text.isdigit() or len(text) > 5 or (text[:1] == b"0" and text != b"0"):
        raise ProxyHeaderError("PROXY v1 port is malformed")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1 port is out of range")
    return port
