"""
SOCKS5 on the wire, sans-IO (RFC 1928, and RFC 1929 for username/password): the server's
side of the handshake (L{ServerHandshake}: bytes in, events out, replies encoded), the
UDP request header (L{parse_datagram}, L{datagram_header}), and which reply code answers
which refusal (L{reply_for}).

No Twisted here: the protocol that drives this (L{aproxy.socks.protocol}) feeds bytes
and reads decisions, so every message and every refusal is tested without a reactor.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from aproxy.errors import (
    BadGateway,
    Forbidden,
    GatewayTimeout,
    NotImplementedByProxy,
    ProxyError,
)
from aproxy.http.target import parse_authority

__all__ = [
    "ADDRESS_NOT_SUPPORTED",
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "COMMAND_NOT_SUPPORTED",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "METHOD_NONE",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_USERPASS",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "REPLY_TEXT",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "Credentials",
    "Datagram",
    "Greeting",
    "Request",
    "ServerHandshake",
    "SocksError",
    "datagram_header",
    "encode_address",
    "parse_datagram",
    "reply",
    "reply_for",
    "select_method",
]

# RFC 1928 section 3: authentication methods.
METHOD_NONE, METHOD_USERPASS, METHOD_NO_ACCEPTABLE = 0x00, 0x02, 0xFF
# Section 4: commands; section 5: address types.
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4
# Section 6: the reply field.
(
    SUCCEEDED,
    GENERAL_FAILURE,
    NOT_ALLOWED,
    NETWORK_UNREACHABLE,
    HOST_UNREACHABLE,
    CONNECTION_REFUSED,
    TTL_EXPIRED,
    COMMAND_NOT_SUPPORTED,
    ADDRESS_NOT_SUPPORTED,
) = range(9)

REPLY_TEXT = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_NOT_SUPPORTED: "address type not supported",
}
"""What each reply code means (RFC 1928 section 6), for logs."""

# The most bytes a client may send before its request is complete: a greeting (2 + 255),
# a login (3 + 255 + 255) and a request (6 + 1 + 255) with room to spare. Past that the
# client is not speaking SOCKS5 (or not in good faith).
_MAX_HANDSHAKE = 2048
# A host name as the HTTP side accepts it in an authority (reg-name, unreserved only).
_NAME = re.compile(rb"[A-Za-z0-9\-._~]+")

_GREETING, _CHOOSING, _LOGIN, _CHECKING, _REQUEST, _DONE, _CLOSED = range(7)


class SocksError(Exception):
    """
    A client's message that can't be served.

    @ivar reply: The reply code to answer with before closing (L{None}: close without a
        reply, for a client that is not speaking SOCKS5 at all).
    @ivar reason: Why, for the log.
    """

    def __init__(self, reply: int | None, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@dataclass(frozen=True)
class Greeting:
    """The client's version identifier/method selection message: the methods it offers."""

    methods: bytes


@dataclass(frozen=True)
class Credentials:
    """An RFC 1929 username/password request (each 1 to 255 bytes, as sent)."""

    username: bytes
    password: bytes


@dataclass(frozen=True)
class Request:
    """
    A SOCKS request (RFC 1928 section 4).

    @ivar command: L{CMD_CONNECT}, L{CMD_BIND} or L{CMD_UDP_ASSOCIATE}.
    @ivar host: An IP address in its usual text form, or a host name (lowercased).
    @ivar port: 0 to 65535 (0 is meaningful for C{UDP ASSOCIATE} only).
    @ivar address_type: L{ATYP_IPV4}, L{ATYP_DOMAIN} or L{ATYP_IPV6}, as sent.
    """

    command: int
    host: str
    port: int
    address_type: int


def select_method(offered: bytes, login_required: bool) -> int:
    """
    The method to answer a greeting with: username/password when a login is required
    and offered, no authentication when none is required and it is offered; otherwise
    L{METHOD_NO_ACCEPTABLE} (the client is then closed).
    """
    wanted = METHOD_USERPASS if login_required else METHOD_NONE
    return wanted if wanted in offered else METHOD_NO_ACCEPTABLE


class ServerHandshake:
    """
    The server's side of a SOCKS5 handshake: feed the client's bytes, take events, and
    answer each with the encoder the event calls for.

    The order is fixed by the RFCs: a L{Greeting} (answer with L{choose}), with
    username/password a L{Credentials} (answer with L{login_result}), then one
    L{Request} (answer with L{reply}); the bytes after the request are in L{rest}.
    L{next_event} returns L{None} while more bytes are needed, or while the caller has
    not answered the last event yet.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._state = _GREETING
        self.rest = b""

    def feed(self, data: bytes) -> None:
        """
        Take bytes from the client.

        @raise SocksError: If more bytes arrive before the request than a handshake takes.
        """
        self._buffer += data
        if self._state != _DONE and len(self._buffer) > _MAX_HANDSHAKE:
            raise SocksError(None, "too many bytes before the SOCKS5 request")

    def next_event(self) -> Greeting | Credentials | Request | None:
        """
        The next complete message, or L{None}.

        @raise SocksError: For a message that can't be served; its C{reply}, if any, is
            the request reply to send before closing.
        """
        state = self._state
        if state == _GREETING:
            return self._greeting()
        if state == _LOGIN:
            return self._login()
        if state == _REQUEST:
            return self._request()
        return None

    def choose(self, method: int) -> bytes:
        """Answer the greeting with C{method}; the bytes to send."""
        if self._state != _CHOOSING:
            raise ValueError("no greeting to answer")
        self._state = {
            METHOD_NONE: _REQUEST,
            METHOD_USERPASS: _LOGIN,
        }.get(method, _CLOSED)
        return bytes((5, method))

    def login_result(self, ok: bool) -> bytes:
        """Answer the credentials (RFC 1929 section 2: status 0 is success); the bytes."""
        if self._state != _CHECKING:
            raise ValueError("no credentials to answer")
        self._state = _REQUEST if ok else _CLOSED
        return b"\x01\x00" if ok else b"\x01\x01"

    def _take(self, size: int) -> bytes:
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _greeting(self) -> Greeting | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != 5:
            raise SocksError(None, f"not a SOCKS5 greeting (version byte {buf[0]})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        count = buf[1]
        message = self._take(2 + count)
        self._state = _CHOOSING
        return Greeting(message[2:])

    def _login(self) -> Credentials | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != 1:
            # RFC 1929 section 2: the subnegotiation's version is 1.
            raise SocksError(None, f"not an RFC 1929 login (version byte {buf[0]})")
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1 or len(buf) < user_end + 1 + buf[user_end]:
            return None
        username = buf[2:user_end]
        password = buf[user_end + 1 : user_end + 1 + buf[user_end]]
        self._take(user_end + 1 + buf[user_end])
        self._state = _CHECKING
        return Credentials(username, password)

    def _request(self) -> Request | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        if buf[0] != 5:
            raise SocksError(GENERAL_FAILURE, f"not a SOCKS5 request (version byte {buf[0]})")
        command, kind = buf[1], buf[3]
        parsed = _address(buf, 3)
        if parsed is None:
            return None
        host, port, end = parsed
        self._take(end)
        self._state = _DONE
        self.rest, self._buffer = self._buffer, b""
        if command not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
            raise SocksError(COMMAND_NOT_SUPPORTED, f"unknown command {command}")
        return Request(command, host, port, kind)


def _address(buf: bytes, start: int) -> tuple[str, int, int] | None:
    """
    Read ATYP, DST.ADDR and DST.PORT at C{start}: the host, the port and the offset
    after them; L{None} while incomplete.

    @raise SocksError: L{ADDRESS_NOT_SUPPORTED} for an unknown address type,
        L{HOST_UNREACHABLE} for a name no resolver could look up.
    """
    if len(buf) <= start:
        return None
    kind = buf[start]
    if kind == ATYP_IPV4:
        end = start + 1 + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(buf[start + 1 : end]))
    elif kind == ATYP_IPV6:
        end = start + 1 + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(buf[start + 1 : end]))
    elif kind == ATYP_DOMAIN:
        if len(buf) < start + 2:
            return None
        end = start + 2 + buf[start + 1]
        if len(buf) < end + 2:
            return None
        host = _host_name(buf[start + 2 : end])
    else:
        raise SocksError(ADDRESS_NOT_SUPPORTED, f"unknown address type {kind}")
    (port,) = struct.unpack_from("!H", buf, end)
    return host, port, end + 2


def _host_name(raw: bytes) -> str:
    """
    A DOMAINNAME as the HTTP side would accept it in an authority (lowercased, the DNS
    length limits checked); an IP literal sent as a name is taken as that address.

    @raise SocksError: L{HOST_UNREACHABLE} for anything else.
    """
    if _NAME.fullmatch(raw) is None:
        shown = raw[:80].decode("ascii", "backslashreplace")
        raise SocksError(HOST_UNREACHABLE, f"not a host name: {shown!r}")
    try:
        host, _ = parse_authority(raw + b":1")
    except ProxyError as e:
        raise SocksError(HOST_UNREACHABLE, e.reason) from None
    return host


def encode_address(host: str, port: int) -> bytes:
    """ATYP, ADDR and PORT for an IP address or a host name (IDNA-encoded)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if len(name) > 255:
            raise ValueError(f"host name too long for SOCKS5: {host[:80]}") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    kind = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((kind,)) + address.packed + struct.pack("!H", port)


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """
    A request reply (RFC 1928 section 6): C{code} and the bound address (for a
    refusal, all zeros).
    """
    return bytes((5, code, 0)) + encode_address(host, port)


@dataclass(frozen=True)
class Datagram:
    """
    A UDP request header and its data (RFC 1928 section 7).

    @ivar frag: The fragment number (0: a whole datagram).
    @ivar host: The destination (as in L{Request}).
    @ivar port: The destination port.
    @ivar payload: The user data.
    """

    frag: int
    host: str
    port: int
    payload: bytes


def parse_datagram(data: bytes) -> Datagram:
    """
    Split a datagram from the client into its header and its data.

    @raise SocksError: For a truncated or malformed header (the datagram is dropped).
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SocksError(None, "not a SOCKS5 UDP request header")
    parsed = _address(data, 3)
    if parsed is None:
        raise SocksError(None, "truncated SOCKS5 UDP request header")
    host, port, end = parsed
    return Datagram(data[2], host, port, data[end:])


def datagram_header(host: str, port: int) -> bytes:
    """The header of a datagram relayed to the client from C{host}:C{port}."""
    return b"\x00\x00\x00" + encode_address(host, port)


def reply_for(err: ProxyError) -> int:
    """
    The reply code for a request the proxy refused or could not serve, from the error
    the HTTP side would answer (RFC 1928 section 6): rules are L{NOT_ALLOWED}, a name
    that does not resolve or a host that can't be reached L{HOST_UNREACHABLE}, a
    refused connection L{CONNECTION_REFUSED}, a timeout L{TTL_EXPIRED}, what the proxy
    does not do L{COMMAND_NOT_SUPPORTED}, and the rest
    (limits, internal errors, a parent's failures) L{GENERAL_FAILURE}.
    """
    if isinstance(err, Forbidden):
        return NOT_ALLOWED
    if isinstance(err, NotImplementedByProxy):
        return COMMAND_NOT_SUPPORTED
    if isinstance(err, GatewayTimeout) or err.error_type == "connection_timeout":
        return TTL_EXPIRED
    if isinstance(err, BadGateway):
        kind = err.error_type
        if kind == "connection_refused":
            return CONNECTION_REFUSED
        if kind in ("dns_error", "destination_unavailable"):
            return HOST_UNREACHABLE
    return GENERAL_FAILURE
