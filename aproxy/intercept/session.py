"""
Intercepting a C{CONNECT} tunnel: which ones (L{Interceptor}), the look at the client's
first bytes (L{Peek}), and the decrypted session (L{InterceptedSession}), whose requests
become ordinary exchanges for C{https://host[:port]/path}.

The flow for a C{CONNECT} to a host C{--intercept} matches:

    1. The proxy answers C{200 Connection established} at once and reads what the
       client sends first (L{Peek}), for at most L{PEEK_TIMEOUT} seconds.
    2. A TLS ClientHello offering C{http/1.1} (or nothing) for a host to intercept: the
       connection's bytes go to a TLS server layer presenting a leaf certificate for the
       name, and the decrypted bytes to a second L{ProxyProtocol} of the same factory,
       which reads origin-form requests (L{InterceptedSession.absolutize}).
    3. Anything else (another protocol, silence because the server speaks first, only
       C{h2} offered, a name C{--no-intercept} exempts) is relayed as a blind tunnel,
       the bytes read so far first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.access.policy import HostPatterns, normalize_address
from aproxy.client.phases import Phase
from aproxy.errors import BadRequest, Forbidden, MisdirectedRequest, ProxyError
from aproxy.http.head import RequestHead
from aproxy.http.target import format_authority, parse_absolute_target, parse_authority
from aproxy.intercept.hello import NOT_TLS, Hello, read_hello
from aproxy.intercept.leaves import LeafContexts

__all__ = ["PEEK_TIMEOUT", "InterceptedSession", "Interceptor", "Peek", "peek"]

PEEK_TIMEOUT = 2.0
"""Seconds to wait for a client's first bytes in a tunnel that may be intercepted; a
client still silent then (a protocol where the server speaks first) gets a blind tunnel."""

_log = Logger()


class Interceptor:
    """
    Which tunnels are intercepted, and the certificates for them.

    @ivar leaves: The leaf certificates (and the CA behind them).
    """

    def __init__(self, leaves: LeafContexts, intercept: HostPatterns, exempt: HostPatterns) -> None:
        self.leaves = leaves
        self._intercept = intercept
        self._exempt = exempt

    def wants(self, host: str) -> bool:
        """
        Whether a C{CONNECT} to C{host} may be intercepted (so the client's first bytes
        are read): a matching name, or an IP address (its SNI may name a matching host).
        """
        if self._exempt.matches(host):
            return False
        return normalize_address(host) is not None or self._intercept.matches(host)

    def name_for(self, connect_host: str, hello: Hello) -> str | None:
        """
        The name to intercept a tunnel to C{connect_host} as, given its ClientHello; or
        L{None} for a blind tunnel.

        @raise Forbidden: If the SNI names another host than a C{CONNECT} host name.
        """
        sni = hello.server_name
        by_address = normalize_address(connect_host) is not None
        if sni is not None and not by_address and sni != connect_host.lower().rstrip("."):
            raise Forbidden(f"TLS server name {sni} in a CONNECT to {connect_host}")
        if hello.protocols and b"http/1.1" not in hello.protocols:
            _log.info(
                "tunnel to {host} relayed, not intercepted: the client offers only {offered}",
                host=connect_host,
                offered=b", ".join(hello.protocols).decode("ascii", "replace"),
            )
            return None
        name = sni if sni is not None and by_address else connect_host.lower().rstrip(".")
        if self._exempt.matches(name) or not self._intercept.matches(name):
            return None
        return name


_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def peek(x: Any, interceptor: Interceptor, host: str, port: int) -> None:
    """
    Take over the C{CONNECT} exchange C{x} to C{host:port}, which C{interceptor} may
    intercept: answer 200 now and read what the client sends first (L{Peek}).
    """
    conn = x.conn
    x.established = True
    x.to_client += len(_ESTABLISHED)
    conn.transport.write(_ESTABLISHED)
    conn.move(Phase.DIALING)
    x.connecting = Peek(x, interceptor, host, port).start(conn.take_pending())


class Peek:
    """
    Reads a client's first bytes in a tunnel to decide (see the module docstring). Its
    L{Deferred} is the exchange's C{connecting}: cancelling it (the client left) stops
    the wait.

    @param x: The exchange of the C{CONNECT} (a L{aproxy.client.exchange.ClientExchange}).
    """

    def __init__(self, x: Any, interceptor: Interceptor, host: str, port: int) -> None:
        self.x = x
        self.conn = x.conn
        self.interceptor = interceptor
        self.host = host
        self.port = port
        self.buffer = b""
        self._timer: IDelayedCall | None = None
        self.deferred: Deferred[None] = Deferred(lambda d: self._stop())

    def start(self, first: bytes) -> Deferred[None]:
        """Read the client's bytes from now on (C{first}: those already read)."""
        self.conn.dataReceived = self.feed
        self._timer = self.conn.clock.callLater(PEEK_TIMEOUT, self._silent)
        if first:
            self.feed(first)
        return self.deferred

    def _stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if "dataReceived" in vars(self.conn):
            del self.conn.dataReceived

    def feed(self, data: bytes) -> None:
        """Client bytes: decide once they show what they are (at most L{MAX_HELLO})."""
        self.buffer += data
        self._decide_safely(None)

    def _silent(self) -> None:
        self._timer = None
        self._decide_safely(NOT_TLS)

    def _decide_safely(self, result: Hello | str | None) -> None:
        """Decide on C{result}, or on what the bytes so far show (L{None})."""
        # (Called by the reactor, as the connection's dataReceived or a timer: a bug here
        # ends this connection, not the reactor's loop.)
        try:
            if result is None:
                result = read_hello(self.buffer)
                if result is None:
                    return
            self._decide(result)
        except Exception:
            self._stop()
            self.conn.internal_error(Failure())

    def _decide(self, result: Hello | str) -> None:
        self._stop()
        x, conn = self.x, self.conn
        name: str | None = None
        if isinstance(result, Hello):
            try:
                name = self.interceptor.name_for(self.host, result)
                if name is not None and name != self.host:
                    conn.factory.check_destination(name, self.port, x.runtime)
            except ProxyError as e:
                _log.info(
                    "tunnel to {host}:{port} refused: {why}",
                    host=self.host,
                    port=self.port,
                    why=e.reason,
                )
                x.emit(403, e.error_type)
                conn.close()
                return
        if x.connecting is self.deferred:
            x.connecting = None
        if name is None:
            conn.stash(self.buffer)
            x.dial_tunnel()
            return
        session = InterceptedSession(
            conn, self.interceptor.leaves.context_for(name), name, self.port
        )
        conn.adopt_tunnel(session, self.buffer)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """The server side of one intercepted connection: a context's certificate."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        """A new TLS server connection with the leaf certificate."""
        return SSL.Connection(self.context, None)


class _One(Factory):
    """A factory that hands out one protocol already built."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        """The protocol."""
        return self.proto


class InterceptedSession:
    """
    A decrypted tunnel: the client's TLS ends here, and its requests are read by an inner
    L{ProxyProtocol}. It stands where a L{aproxy.client.tunnel.Tunnel} would in the
    client connection (the same methods), so the outer connection's end ends it.

    @ivar name: The host the session is for (the leaf certificate's name).
    @ivar port: The port of the C{CONNECT}.
    @ivar authority: C{name[:port]} as requests' targets carry it.
    @ivar client_ip: The client's address (from the outer connection).
    @ivar user: The user the C{CONNECT} authenticated as, if any.
    @ivar to_origin: Client bytes received (encrypted).
    @ivar to_client: Always 0: the inner exchanges count what they send.
    """

    def __init__(self, conn: Any, context: SSL.Context, name: str, port: int) -> None:
        self.conn = conn
        self.name = name
        self.port = port
        authority = format_authority(name, port)
        self.authority = authority.removesuffix(":443") if port == 443 else authority
        self.client_ip: str | None = conn.client_ip
        self.user: str | None = conn.user
        self.to_origin = 0
        self.to_client = 0
        self.closed = False
        self.on_close: Callable[[Any], None] | None = None
        inner = conn.inner_protocol(self)
        factory = TLSMemoryBIOFactory(_ServerTLS(context), False, _One(inner))
        self.tls: TLSMemoryBIOProtocol = factory.buildProtocol(conn.transport.getPeer())

    # -- the tunnel interface ---------------------------------------------------------

    def start(self, to_origin: bytes, to_client: bytes) -> None:
        """Begin the TLS handshake with what the client sent so far."""
        self.tls.makeConnection(self.conn.transport)
        if to_origin:
            self.from_client(to_origin)

    def from_client(self, data: bytes) -> None:
        """Encrypted client bytes: to the TLS layer."""
        self.to_origin += len(data)
        self.tls.dataReceived(data)

    def client_eof(self) -> None:
        """
        The client half-closed: a TLS session has no half-close, so the connection ends
        (once what is queued for the client is written).
        """
        self.conn.transport.loseConnection()

    def client_lost(self) -> None:
        """The connection ended: end the TLS layer (and the inner protocol)."""
        if self.closed:
            return
        self.closed = True
        if not getattr(self.tls, "_handshakeDone", True) and self.to_origin:
            _log.info(
                "client {client} did not complete TLS with aproxy's certificate for {name}: "
                "it may not trust aproxy's CA, or pin the certificate (--no-intercept {name})",
                client=self.client_ip,
                name=self.name,
            )
        self.tls.connectionLost(Failure(ConnectionDone()))
        if self.on_close is not None:
            self.on_close(self)

    # -- the requests inside ----------------------------------------------------------

    def absolutize(self, head: RequestHead) -> None:
        """
        Turn a request read inside the session into the absolute form the rest of the
        proxy reads: C{https://authority/path}.

        @raise MisdirectedRequest: If it names another host (its C{Host}, or an
            absolute target) than the session's (421).
        @raise BadRequest: For a C{CONNECT} or an asterisk-form target inside.
        """
        target = head.target
        if head.method == b"CONNECT" or not target or target == b"*":
            raise BadRequest("not a request an intercepted connection carries")
        if target.startswith(b"/"):
            hosts = head.values(b"host")
            if hosts and parse_authority(hosts[0], 443) != (self.name, self.port):
                raise MisdirectedRequest(f"this connection is for {self.name}:{self.port}")
            head.target = b"https://" + self.authority.encode("ascii") + target
            return
        parsed = parse_absolute_target(target, head.method)
        if parsed.scheme != b"https" or (parsed.host, parsed.port) != (self.name, self.port):
            raise MisdirectedRequest(f"this connection is for {self.name}:{self.port}")
