"""
L{ProxyConfig}: the one validated, frozen description of how a proxy behaves.

The command line (L{aproxy.run.tap}) and embedders both produce a L{ProxyConfig};
L{aproxy.run.service.makeService} and L{aproxy.client.protocol.ProxyFactory} only ever see one.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aproxy.access.policy import parse_host_pattern
from aproxy.upstream.routes import Router, parse_parent

__all__ = [
    "DEFAULT_HTTP_PORTS",
    "DEFAULT_PORT",
    "ProxyConfig",
    "check_proxy_protocol",
    "listen_description",
    "parse_port_list",
    "proxy_protocol_inner",
]

DEFAULT_PORT = "tcp:8080:interface=127.0.0.1"
# Squid's Safe_ports without the legacy protocols (ftp, gopher, wais, ...): the web
# ports and the unprivileged ones, where no system service such as SMTP listens.
DEFAULT_HTTP_PORTS = ((80, 80), (443, 443), (1025, 65535))
_VIA_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:\[\]]+")


def parse_port_list(text: str, option: str = "connect-ports") -> tuple[tuple[int, int], ...] | None:
    """
    Parse a C{--connect-ports} or C{--http-ports} value: comma-separated ports and
    C{low-high} ranges, or C{*} for any port.

    @param option: The option's name, for the error messages.
    @raise ValueError: For anything else, or a port outside 1..65535.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["*"]:
        return None
    if not items:
        raise ValueError(f"{option}: empty list")
    ranges = []
    for item in items:
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{option}: {item!r} is not a port or a range")
        first = int(low)
        last = int(high) if sep else first
        if not 0 < first <= last < 65536:
            raise ValueError(f"{option}: bad port range {item!r}")
        ranges.append((first, last))
    return tuple(ranges)


def listen_description(text: str) -> str:
    """
    Turn a C{--port} value into a Twisted server endpoint description.

    A bare port number means that port on the loopback interface only (a safe default:
    never an open proxy by accident); anything else is taken as a full endpoint
    description such as C{tcp:8080:interface=0.0.0.0} or C{unix:/run/aproxy.sock}.

    @raise ValueError: For an empty value or a port number outside 0..65535.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty --port value")
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise ValueError(f"port {port} is out of range")
        return f"tcp:{port}:interface=127.0.0.1"
    _check_port_number(text)
    return text


def proxy_protocol_inner(description: str) -> str | None:
    """
    The listener under a C{haproxy:} (PROXY protocol) endpoint description, e.g.
    C{tcp:3128} for C{haproxy:tcp:3128}, or L{None} for another kind of description.
    """
    kind, sep, inner = description.partition(":")
    return inner if sep and kind.lower() == "haproxy" else None


def check_proxy_protocol(ports: Sequence[str], trusted: Sequence[str]) -> None:
    """
    Check the PROXY protocol settings: every C{haproxy:} listener is plain TCP, and
    C{trusted} (C{--proxy-protocol-from}) names valid networks, at least one if there is
    such a listener.

    @raise ValueError: Naming the option that is wrong.
    """
    for cidr in trusted:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(
                f"--proxy-protocol-from: {cidr!r} is not an address or CIDR network"
            ) from None
    for description in ports:
        inner = proxy_protocol_inner(description)
        if inner is None:
            continue
        if inner.partition(":")[0].lower() not in ("tcp", "tcp6"):
            # The PROXY header comes before TLS, and a unix socket's peers have no
            # address to check: only plain TCP listeners can take one safely.
            raise ValueError(f"--port {description}: haproxy: works over tcp: or tcp6: only")
        if not trusted:
            raise ValueError(
                f"--port {description} needs --proxy-protocol-from CIDR: the load "
                "balancers' addresses, the only peers trusted to send a PROXY header"
            )


def _check_port_number(description: str) -> None:
    """
    Refuse a TCP or TLS description whose port number is out of range: Twisted parses
    C{tcp:99999} without complaint and fails only when it listens, with a traceback.
    """
    parts = description.replace("\\:", "\x00").split(":")
    if parts[0].lower() == "haproxy":
        parts = parts[1:]
    if not parts or parts[0].lower() not in ("tcp", "tcp6", "ssl"):
        return
    for index, part in enumerate(parts[1:]):
        key, sep, value = part.partition("=")
        port = value if sep and key == "port" else part if index == 0 and not sep else None
        if port is not None and port.strip().isdigit() and int(port) > 65535:
            raise ValueError(f"port {int(port)} is out of range in {description!r}")


@dataclass(frozen=True)
class ProxyConfig:
    """
    Everything that decides the proxy's behaviour; safe defaults throughout.

    @ivar port: Server endpoint descriptions to listen on (see L{listen_description}).
    @ivar connect_timeout: Seconds allowed to connect to an origin (then 504).
    @ivar read_timeout: Seconds to wait for the origin's response head, and between body
        bytes in either direction while a request is in flight.
    @ivar idle_timeout: Seconds an idle keep-alive client connection is kept open.
    @ivar header_timeout: Seconds a client has to send a complete request head (then 408).
    @ivar via: The pseudonym in the C{Via} fields the proxy appends, or L{None} for none.
    @ivar max_head_size: The largest request or response head accepted, in bytes (431).
    @ivar max_request_line: The longest request line accepted, in bytes (414).
    @ivar pool_size: Idle upstream connections kept per origin for reuse (0: no reuse).
    @ivar pool_idle_timeout: Seconds an idle pooled upstream connection is kept.
    @ivar pool_max_age: Seconds after which a pooled upstream connection is not reused,
        however busy (its address is checked again on a new connection).
    @ivar connect_ports: The ports CONNECT may reach, as inclusive (low, high) ranges;
        L{None} allows any port.
    @ivar http_ports: The ports absolute-form requests (C{http}, C{https}, C{ws},
        C{wss} targets) may reach, directly or through a parent, as inclusive (low,
        high) ranges; L{None} allows any port.
    @ivar tunnel_idle_timeout: Seconds a CONNECT or Upgrade tunnel may stay silent.
    @ivar allow: Client networks (CIDR) that may use the proxy; loopback by default.
    @ivar proxy_protocol_from: The networks (CIDR) of the load balancers that may send a
        PROXY header on a C{haproxy:} listener; required with one.
    @ivar deny_host: Destination patterns refused (see L{aproxy.access.policy.parse_host_pattern}).
    @ivar allow_host: If any, only destinations matching one of these are allowed.
    @ivar block_private: Refuse destinations whose addresses are loopback, private,
        link-local, CGNAT, unique-local, site-local, multicast, reserved or unspecified
        (IPv6 forms of IPv4 addresses judged by the IPv4 address inside).
    @ivar x_forwarded_for: C{"add"} the client address, C{"strip"} incoming ones, or
        C{"keep"} them as they came.
    @ivar max_connections: Client connections served at once; more get 503.
    @ivar max_clients_per_ip: Client connections from one address at once; more get 503.
    @ivar auth: An Apache htpasswd file; when set, every request (CONNECT included)
        needs valid C{Proxy-Authorization: Basic} credentials, or gets 407.
    @ivar auth_realm: The realm named in the C{Proxy-Authenticate} challenge.
    @ivar auth_max_failures: Failed logins one client address may make within
        C{auth_failure_window} seconds; after that it gets 429 until the window closes,
        without a password check (0: no limit).
    @ivar auth_failure_window: Seconds from an address's first failed login during which
        its failures are counted.
    @ivar shutdown_timeout: Seconds requests and tunnels in flight may take to finish
        when the proxy stops, before they are closed.
    @ivar access_log: Where to write one line per request and tunnel (C{"-"} for
        standard output), or L{None} for no access log.
    @ivar access_log_format: C{"combined"}, C{"squid"} or C{"json"}.
    @ivar metrics: A server endpoint description for C{/metrics} and C{/status}, or
        L{None} for none.
    @ivar route: C{PATTERN=TARGET} rules choosing a parent proxy (or C{direct}) per
        destination host, first match wins (see L{aproxy.upstream.routes.parse_route}).
    @ivar upstream: A parent proxy URL for everything no route matched (the same as a
        last route C{*=URL}), or L{None}.
    @ivar ca_file: A PEM file of certificate authorities trusted for TLS to origins and
        parents, in addition to the system's trust store.
    @ivar insecure_host: Hosts whose TLS certificates are not verified (named one by
        one; there is no switch for all).
    """

    port: tuple[str, ...] = (DEFAULT_PORT,)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    via: str | None = "aproxy"
    max_head_size: int = 65536
    max_request_line: int = 16384
    pool_size: int = 100
    pool_idle_timeout: float = 30.0
    pool_max_age: float = 120.0
    connect_ports: tuple[tuple[int, int], ...] | None = ((443, 443),)
    http_ports: tuple[tuple[int, int], ...] | None = DEFAULT_HTTP_PORTS
    tunnel_idle_timeout: float = 600.0
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    proxy_protocol_from: tuple[str, ...] = ()
    deny_host: tuple[str, ...] = ()
    allow_host: tuple[str, ...] = ()
    block_private: bool = False
    x_forwarded_for: str = "keep"
    max_connections: int = 4096
    max_clients_per_ip: int = 256
    auth: str | None = None
    auth_realm: str = "aproxy"
    auth_max_failures: int = 10
    auth_failure_window: float = 60.0
    shutdown_timeout: float = 30.0
    access_log: str | None = None
    access_log_format: str = "combined"
    metrics: str | None = None
    route: tuple[str, ...] = ()
    upstream: str | None = None
    ca_file: str | None = None
    insecure_host: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validate every field so that a bad value fails at start, not per request."""
        try:
            object.__setattr__(self, "port", tuple(listen_description(p) for p in self.port))
        except ValueError as e:
            raise ValueError(f"port: {e}") from None
        if not self.port:
            raise ValueError("at least one --port is needed")
        for name in (
            "connect_timeout",
            "read_timeout",
            "idle_timeout",
            "header_timeout",
            "pool_idle_timeout",
            "pool_max_age",
            "tunnel_idle_timeout",
            "shutdown_timeout",
            "auth_failure_window",
        ):
            value = getattr(self, name)
            # Not infinite either: every timeout must end (nan fails "> 0" already).
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(
                    f"{name.replace('_', '-')} must be a positive, finite number of seconds, "
                    f"not {value!r}"
                )
        if self.via is not None and not _VIA_NAME.fullmatch(self.via):
            raise ValueError("via must be a token such as 'aproxy' or 'proxy.example:3128'")
        if not isinstance(self.max_head_size, int) or self.max_head_size < 1024:
            raise ValueError("max-head-size must be at least 1024 bytes")
        if not isinstance(self.max_request_line, int) or self.max_request_line < 8000:
            # RFC 9112 section 3: request lines of at least 8000 octets should be accepted.
            raise ValueError("max-request-line must be at least 8000 bytes")
        for name in ("pool_size", "auth_max_failures"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name.replace('_', '-')} must be a whole number, 0 or more")
        for cidr in self.allow:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"allow: {cidr!r} is not an address or CIDR network") from None
        check_proxy_protocol(self.port, self.proxy_protocol_from)
        for option, patterns in (("deny-host", self.deny_host), ("allow-host", self.allow_host)):
            for pattern in patterns:
                try:
                    parse_host_pattern(pattern)
                except ValueError as e:
                    raise ValueError(f"{option}: {e}") from None
        if not self.auth_realm or any(c in self.auth_realm for c in "\r\n\x00\x7f"):
            raise ValueError("auth-realm must be non-empty text without control characters")
        if self.access_log_format not in ("combined", "squid", "json"):
            raise ValueError("access-log-format must be combined, squid or json")
        if self.metrics is not None:
            try:
                object.__setattr__(self, "metrics", listen_description(self.metrics))
            except ValueError as e:
                raise ValueError(f"metrics: {e}") from None
        if self.x_forwarded_for not in ("add", "strip", "keep"):
            raise ValueError("x-forwarded-for must be add, strip or keep")
        for name in ("max_connections", "max_clients_per_ip"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a whole number, 1 or more")
        try:
            Router(self.route)
        except ValueError as e:
            raise ValueError(f"route: {e}") from None
        if self.upstream is not None:
            try:
                parse_parent(self.upstream)
            except ValueError as e:
                raise ValueError(f"upstream: {e}") from None
        for host in self.insecure_host:
            if not host.strip() or any(c in host for c in "*/ \t"):
                raise ValueError(f"insecure-host: {host!r} is not a host name or address")
        if self.connect_ports is not None:
            for low, high in self.connect_ports:
                if not 0 < low <= high < 65536:
                    raise ValueError(f"connect-ports: bad port range {low}-{high}")
        if self.http_ports is not None:
            for low, high in self.http_ports:
                if not 0 < low <= high < 65536:
                    raise ValueError(f"http-ports: bad port range {low}-{high}")

    @property
    def all_routes(self) -> tuple[str, ...]:
        """The routes, with C{upstream} as the last one (C{*=URL})."""
        if self.upstream is None:
            return self.route
        return (*self.route, "*=" + self.upstream)

    def connect_allowed(self, port: int) -> bool:
        """Whether a CONNECT tunnel may go to C{port}."""
        ranges = self.connect_ports
        if ranges is None:
            return True
        return any(low <= port <= high for low, high in ranges)

    def http_port_allowed(self, port: int) -> bool:
        """Whether an absolute-form request (not a CONNECT) may go to C{port}."""
        ranges = self.http_ports
        if ranges is None:
            return True
        return any(low <= port <= high for low, high in ranges)
