"""
The handshakes that open the way through a parent proxy before the request's own bytes
flow: an HTTP C{CONNECT} (L{HttpConnectHandshake}) or a SOCKS5 connect (L{Socks5Handshake}).
Each is a protocol layer that talks to the parent first and then hands the connection to
the layer above it (see L{aproxy.upstream.dialer}).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.errors import BadGateway, ProxyError
from aproxy.http.head import HeadReader, parse_response_head
from aproxy.http.target import format_authority
from aproxy.upstream.routes import Parent
from aproxy.upstream.tls import VerifyNote, tls_failure

__all__ = ["HttpConnectHandshake", "ParentHandshake", "Socks5Handshake"]


@implementer(IHalfCloseableProtocol)
class ParentHandshake(Protocol):
    """
    Talks to a parent proxy first, then hands the connection to the layer above it:
    that layer is connected to this transport and gets every later byte and event.

    @param max_head_size: The largest answer head accepted from the parent, in bytes
        (the C{max-head-size} setting, as for any response head); a larger one is a 502.
    @ivar parent_tls: When the parent is reached over TLS: the note and name to explain
        a failed TLS handshake with it.
    """

    transport: Any

    def __init__(
        self,
        parent: Parent,
        host: str,
        port: int,
        inner: Protocol,
        fail: Callable[[ProxyError], None],
        max_head_size: int,
    ) -> None:
        self.parent = parent
        self.max_head_size = max_head_size
        self.host = host
        self.port = port
        self._inner = inner
        self._fail = fail
        self._open = False
        self._tls_done = False
        self._buffer = b""
        self.parent_tls: tuple[VerifyNote, str] | None = None

    def handshakeCompleted(self) -> None:
        """The TLS handshake with the parent completed."""
        self._tls_done = True

    def dataReceived(self, data: bytes) -> None:
        """Parent's answer while setting up; afterwards, bytes for the layer above."""
        if self._open:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        try:
            self.received()
        except ProxyError as e:
            self.refuse(e)

    def received(self) -> None:
        """Look at the parent's bytes so far (in C{_buffer})."""
        raise NotImplementedError

    def refuse(self, err: ProxyError) -> None:
        """The parent said no (or something unreadable): fail the connection."""
        self._open = False
        self._fail(err)

    def protocol_error(self, reason: str) -> None:
        """The parent answered something unreadable: a 502 protocol error naming it."""
        self.refuse(BadGateway(reason, "http_protocol_error", details=f"parent {self.parent.name}"))

    def succeed(self, rest: bytes) -> None:
        """The parent opened the way: connect the layer above, hand over C{rest}."""
        self._open = True
        self._buffer = b""
        inner = self._inner
        inner.makeConnection(self.transport)
        if rest and self._open:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        """Pass the end on, or explain it if the parent hadn't said yes yet."""
        if self._open:
            self._inner.connectionLost(reason)
            return
        if self.parent_tls is not None and not self._tls_done:
            note, whom = self.parent_tls
            self._fail(tls_failure(reason, note, whom))
            return
        self._fail(
            BadGateway(
                f"parent proxy {self.parent.name} closed the connection before opening "
                f"the way to {format_authority(self.host, self.port)}",
                "connection_terminated",
                details=f"parent {self.parent.name}",
            )
        )

    def readConnectionLost(self) -> None:
        """A half-close from the parent: pass it on if the layer above relays it."""
        inner = IHalfCloseableProtocol(self._inner, None) if self._open else None
        if inner is not None:
            inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write side is shut: tell the layer above if it cares."""
        inner = IHalfCloseableProtocol(self._inner, None) if self._open else None
        if inner is not None:
            inner.writeConnectionLost()


class HttpConnectHandshake(ParentHandshake):
    """
    Opens a tunnel through an HTTP parent: C{CONNECT host:port} with the parent's
    credentials; any 2xx answer opens it, anything else is a 502 naming the parent.
    """

    def connectionMade(self) -> None:
        """Send the CONNECT (over TLS it waits in the TLS layer until the handshake)."""
        self._reader = HeadReader(self.max_head_size, self.max_head_size, False)
        authority = format_authority(self.host, self.port).encode("idna")
        self.transport.write(
            b"CONNECT "
            + authority
            + b" HTTP/1.1\r\nHost: "
            + authority
            + b"\r\n"
            + (self.parent.authorization or b"")
            + b"\r\n"
        )

    def received(self) -> None:
        """Parse the parent's answer once its head is complete."""
        data, self._buffer = self._buffer, b""
        try:
            raw = self._reader.feed(data)
        except ProxyError:
            self._bad("an invalid response")
            return
        if raw is None:
            return
        rest = self._reader.rest
        try:
            head = parse_response_head(raw)
        except ProxyError:
            self._bad("an invalid response")
            return
        if 200 <= head.status < 300:
            self.succeed(rest)
            return
        if 100 <= head.status < 200:
            # An interim response: the final one follows.
            self._buffer = rest
            self._reader = HeadReader(self.max_head_size, self.max_head_size, False)
            if rest:
                self.received()
            return
        status = f"{head.status} {head.reason.decode('ascii', 'replace')}"
        why = (
            "requires authentication (407): check the credentials in its URL"
            if head.status == 407
            else f"answered {status}"
        )
        self.refuse(
            BadGateway(
                f"parent proxy {self.parent.name} refused the tunnel to "
                f"{format_authority(self.host, self.port)}: {why}",
                "destination_unavailable",
                details=f"parent {self.parent.name} answered {head.status}",
            )
        )

    def _bad(self, what: str) -> None:
        self.protocol_error(f"parent proxy {self.parent.name} sent {what} to the CONNECT")


# RFC 1928 section 6: the reply field.
_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
_GREETING, _AUTH, _REPLY = range(3)


class Socks5Handshake(ParentHandshake):
    """
    Opens a connection through a SOCKS5 parent (RFC 1928): no authentication, or
    username/password (RFC 1929) when the parent's URL has them; the destination is sent
    as a name so that the parent resolves it.
    """

    def connectionMade(self) -> None:
        """Offer the authentication methods we can do."""
        self._state = _GREETING
        if self.parent.username is not None:
            self.transport.write(b"\x05\x02\x00\x02")
        else:
            self.transport.write(b"\x05\x01\x00")

    def received(self) -> None:
        """Advance through the method choice, the login and the CONNECT reply."""
        while not self._open and self._step():
            pass

    def _step(self) -> bool:
        """Take one complete message from the buffer; whether there may be another."""
        buf = self._buffer
        if self._state == _REPLY:
            self._reply()
            return False
        if len(buf) < 2:
            return False
        self._buffer = buf[2:]
        if self._state == _GREETING:
            if buf[0] != 5:
                self._bad("a reply that is not SOCKS5")
                return False
            if buf[1] == 0:
                return self._send_connect()
            if buf[1] == 2 and self.parent.username is not None:
                user = self.parent.username.encode()
                password = (self.parent.password or "").encode()
                self._state = _AUTH
                self.transport.write(
                    b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
                )
                return True
            self._refused(
                "accepts none of our authentication methods"
                if self.parent.username is not None
                else "requires a user name and password (put them in its URL)"
            )
            return False
        # _AUTH: RFC 1929's reply, version 1 and a status (0 is success).
        if buf[1] != 0:
            self._refused("refused the user name and password")
            return False
        return self._send_connect()

    def _send_connect(self) -> bool:
        self._state = _REPLY
        host = self.host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = host.encode("idna")
            if len(name) > 255:
                self._refused("can't take a host name over 255 bytes")
                return False
            dest = b"\x03" + bytes([len(name)]) + name
        else:
            dest = (b"\x01" if address.version == 4 else b"\x04") + address.packed
        self.transport.write(b"\x05\x01\x00" + dest + struct.pack("!H", self.port))
        return True

    def _reply(self) -> None:
        buf = self._buffer
        if len(buf) < 5:
            return
        if buf[0] != 5:
            self._bad("a reply that is not SOCKS5")
            return
        kind = buf[3]
        if kind == 1:
            size = 4 + 4 + 2
        elif kind == 4:
            size = 4 + 16 + 2
        elif kind == 3:
            size = 4 + 1 + buf[4] + 2
        else:
            self._bad("a reply with an unknown address type")
            return
        if len(buf) < size:
            return
        if buf[1] != 0:
            why = _SOCKS_REPLIES.get(buf[1], f"error {buf[1]}")
            self._refused(f"could not connect: {why}")
            return
        self.succeed(buf[size:])

    def _refused(self, why: str) -> None:
        self.refuse(
            BadGateway(
                f"SOCKS5 parent proxy {self.parent.name} {why} "
                f"(to {format_authority(self.host, self.port)})",
                "destination_unavailable",
                details=f"parent {self.parent.name}",
            )
        )

    def _bad(self, what: str) -> None:
        self.protocol_error(f"SOCKS5 parent proxy {self.parent.name} sent {what}")
