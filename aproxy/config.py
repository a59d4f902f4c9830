"""
L{ProxyConfig}: the one validated, frozen description of how a proxy behaves.

The command line (L{aproxy.run.tap}), the config file and embedders all produce a
L{ProxyConfig}; L{aproxy.run.service.makeService} and L{aproxy.client.factory.ProxyFactory}
only ever see one. Its fields, defaults and value forms come from the table of options,
L{aproxy.options.OPTIONS}.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

from aproxy.options import config_options
from aproxy.values import (
    DEFAULT_HTTP_PORTS,
    DEFAULT_PORT,
    check_proxy_protocol,
    listen_description,
    parse_port_list,
    proxy_protocol_inner,
)

__all__ = [
    "DEFAULT_HTTP_PORTS",
    "DEFAULT_PORT",
    "DEPRECATED_NAMES",
    "ProxyConfig",
    "check_proxy_protocol",
    "listen_description",
    "parse_port_list",
    "proxy_protocol_inner",
]

# The field names before the options table (0.1), and the names that replace them.
DEPRECATED_NAMES = {
    "ports": "port",
    "deny_hosts": "deny_host",
    "allow_hosts": "allow_host",
    "auth_file": "auth",
    "routes": "route",
    "insecure_hosts": "insecure_host",
}


def _deprecated(old: str) -> None:
    """Warn that the field name C{old} is deprecated, naming its replacement."""
    warnings.warn(
        f"ProxyConfig field {old!r} is deprecated: use {DEPRECATED_NAMES[old]!r}",
        DeprecationWarning,
        stacklevel=3,
    )


# A TCP listening description with an interface (colons in it escaped with backslashes).
_TCP_LISTEN = re.compile(r"tcp6?:(?P<port>\d+):(?:.*:)?interface=(?P<host>(?:\\:|[^:])+)")


# init=False: __init__ below takes every field by keyword, in any form the options take.
@dataclass(frozen=True, init=False)
class ProxyConfig:
    """
    Everything that decides the proxy's behaviour; safe defaults throughout.

    The fields are the options of L{aproxy.options.OPTIONS}, named as on the command line
    in snake_case (C{--deny-host} is C{deny_host}), and take the same value forms: the
    value itself (C{connect_ports=((443, 443),)}), the command line's text
    (C{connect_ports="443,8443"}, C{read_timeout="5"}) or the config file's form
    (C{allow=["10.0.0.0/8"]}; one string is a list of one). Every value is checked here,
    so that a bad one fails at start, not per request: a wrong value is one
    C{ValueError} whose message starts with the option's name and shows the value.

    L{aproxy.client.factory.ProxyFactory} honours every per-request field on its own (the
    access log and its format, authentication, the access rules, routes, timeouts,
    limits). C{port}, C{metrics} and C{shutdown_timeout} are used by
    L{aproxy.run.service.makeService}, which listens, serves the metrics site and stops
    the service; C{--workers} is the command line's alone.

    The earlier field names (C{ports}, C{deny_hosts}, C{allow_hosts}, C{auth_file},
    C{routes}, C{insecure_hosts}) are accepted as keyword arguments and readable as
    attributes for one more release, with a C{DeprecationWarning} naming the new one.

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
    @ivar cache_memory: The size of the in-memory cache in bytes, or L{None} for none.
    @ivar cache_dir: The disk cache's directory, or L{None} for none.
    @ivar cache_size: The most the disk cache holds, in bytes.
    @ivar cache_max_object: The largest response stored, in bytes.
    @ivar cache_purge_from: Client networks whose C{PURGE} requests are obeyed.
    @ivar metrics: A server endpoint description for C{/metrics} and C{/status}, or
        L{None} for none.
    @ivar route: C{PATTERN=TARGET} rules choosing a parent proxy (or C{direct}) per
        destination host, first match wins (see L{aproxy.upstream.routes.parse_route}).
    @ivar fleet_self: This proxy's URL in a fleet's member list, or L{None} to find it by
        the listening addresses.
    @ivar upstream: A parent proxy URL for everything no route matched (the same as a
        last route C{*=URL}), or L{None}.
    @ivar pac: A PAC file to serve at /proxy.pac and /wpad.dat, or L{None} to serve a
        generated one (see L{aproxy.access.pac}).
    @ivar pac_direct: Host patterns the generated PAC file sends DIRECT.
    @ivar pac_proxy: C{HOST:PORT} the generated PAC file names, or L{None} for the Host
        the client used.
    @ivar parent_check: Seconds between active checks of the parent pools' members, or
        L{None} for none.
    @ivar parent_check_target: C{HOST:PORT} the checks reach through each member with a
        CONNECT, or L{None} for a bare TCP connection.
    @ivar ca_file: A PEM file of certificate authorities trusted for TLS to origins and
        parents, in addition to the system's trust store.
    @ivar insecure_host: Hosts whose TLS certificates are not verified (named one by
        one; there is no switch for all).
    @ivar intercept: Host patterns whose CONNECT tunnels are intercepted (TLS decrypted
        with aproxy's CA); empty: none.
    @ivar no_intercept: Host patterns never intercepted.
    @ivar ca_dir: The directory of the interception CA, or L{None} for the default
        (L{aproxy.intercept.ca.default_ca_dir}).
    @ivar addon: Addons to load, as C{MODULE:NAME} or C{path/to/file.py:NAME} (see
        L{aproxy.addons.load}); loaded once, by the factory.
    @ivar addon_timeout: Seconds a request waits for a hook that answers later.
    @ivar socks_port: Server endpoint descriptions to serve SOCKS5 on (none by default).
    @ivar udp_ports: The ports SOCKS5 C{UDP ASSOCIATE} may send datagrams to, as
        inclusive (low, high) ranges; L{None} allows any port.
    """

    port: tuple[str, ...]
    connect_timeout: float
    read_timeout: float
    idle_timeout: float
    header_timeout: float
    via: str | None
    max_head_size: int
    max_request_line: int
    pool_size: int
    pool_idle_timeout: float
    pool_max_age: float
    connect_ports: tuple[tuple[int, int], ...] | None
    http_ports: tuple[tuple[int, int], ...] | None
    tunnel_idle_timeout: float
    allow: tuple[str, ...]
    proxy_protocol_from: tuple[str, ...]
    deny_host: tuple[str, ...]
    allow_host: tuple[str, ...]
    block_private: bool
    x_forwarded_for: str
    max_connections: int
    max_clients_per_ip: int
    auth: str | None
    auth_realm: str
    auth_max_failures: int
    auth_failure_window: float
    shutdown_timeout: float
    access_log: str | None
    access_log_format: str
    cache_memory: int | None
    cache_dir: str | None
    cache_size: int
    cache_max_object: int
    cache_purge_from: tuple[str, ...]
    metrics: str | None
    route: tuple[str, ...]
    fleet_self: str | None
    upstream: str | None
    pac: str | None
    pac_direct: tuple[str, ...]
    pac_proxy: str | None
    parent_check: float | None
    parent_check_target: str | None
    ca_file: str | None
    insecure_host: tuple[str, ...]
    intercept: tuple[str, ...]
    no_intercept: tuple[str, ...]
    ca_dir: str | None
    addon: tuple[str, ...]
    addon_timeout: float
    socks_port: tuple[str, ...]
    udp_ports: tuple[tuple[int, int], ...] | None

    def __init__(self, **values: Any) -> None:
        """
        Take each field by keyword (the others get their defaults), coerce it from any
        accepted form and check it.

        @raise TypeError: For an unknown field name, or a field given under both its
            new and its deprecated name.
        @raise ValueError: For a bad value, naming the option and showing the value.
        """
        for old, new in DEPRECATED_NAMES.items():
            if old in values:
                _deprecated(old)
                if new in values:
                    raise TypeError(f"ProxyConfig got both {new!r} and its old name {old!r}")
                values[new] = values.pop(old)
        rows = config_options()
        unknown = sorted(set(values) - {row.field for row in rows})
        if unknown:
            raise TypeError(f"ProxyConfig got an unexpected keyword argument {unknown[0]!r}")
        for row in rows:
            assert row.field is not None
            value = values[row.field] if row.field in values else row.default
            object.__setattr__(self, row.field, row.parse(value))
        check_proxy_protocol(self.port, self.proxy_protocol_from)

    @property
    def caching(self) -> bool:
        """Whether responses are cached (in memory, on disk or both)."""
        return bool(self.cache_memory) or self.cache_dir is not None

    @property
    def all_routes(self) -> tuple[str, ...]:
        """The routes, with C{upstream} as the last one (C{*=URL})."""
        if self.upstream is None:
            return self.route
        return (*self.route, "*=" + self.upstream)

    @property
    def own_addresses(self) -> tuple[tuple[str, int], ...]:
        """
        The (host, port) pairs this proxy answers on, as a fleet's member list would name
        it: C{fleet_self}, and each TCP listening port with its interface.
        """
        found: list[tuple[str, int]] = []
        if self.fleet_self is not None:
            from aproxy.upstream.routes import parse_parent

            me = parse_parent(self.fleet_self)
            found.append((me.host, me.port))
        for description in self.port:
            match = _TCP_LISTEN.match(description)
            if match is not None:
                found.append((match["host"].replace("\\", ""), int(match["port"])))
        return tuple(found)

    def connect_allowed(self, port: int) -> bool:
        """Whether a CONNECT tunnel may go to C{port}."""
        ranges = self.connect_ports
        if ranges is None:
            return True
        for low, high in ranges:  # (a loop, not any() over a generator: once a request)
            if low <= port <= high:
                return True
        return False

    def udp_port_allowed(self, port: int) -> bool:
        """Whether a SOCKS5 UDP datagram may go to C{port}."""
        ranges = self.udp_ports
        if ranges is None:
            return True
        return any(low <= port <= high for low, high in ranges)

    def http_port_allowed(self, port: int) -> bool:
        """Whether an absolute-form request (not a CONNECT) may go to C{port}."""
        ranges = self.http_ports
        if ranges is None:
            return True
        for low, high in ranges:
            if low <= port <= high:
                return True
        return False

    @property
    def ports(self) -> tuple[str, ...]:
        """Deprecated: L{port}."""
        _deprecated("ports")
        return self.port

    @property
    def deny_hosts(self) -> tuple[str, ...]:
        """Deprecated: L{deny_host}."""
        _deprecated("deny_hosts")
        return self.deny_host

    @property
    def allow_hosts(self) -> tuple[str, ...]:
        """Deprecated: L{allow_host}."""
        _deprecated("allow_hosts")
        return self.allow_host

    @property
    def auth_file(self) -> str | None:
        """Deprecated: L{auth}."""
        _deprecated("auth_file")
        return self.auth

    @property
    def routes(self) -> tuple[str, ...]:
        """Deprecated: L{route}."""
        _deprecated("routes")
        return self.route

    @property
    def insecure_hosts(self) -> tuple[str, ...]:
        """Deprecated: L{insecure_host}."""
        _deprecated("insecure_hosts")
        return self.insecure_host
