"""
Server endpoint descriptions (C{tcp:3128:interface=127.0.0.1}, C{haproxy:tcp:3128},
C{unix:/run/aproxy.sock}), read the one way Twisted's C{serverFromString} reads them, for
the places that must look inside one before Twisted does: which listeners other machines
can reach (L{public_listeners}) and the sockets C{--workers} creates itself
(L{aproxy.run.workers.listening_socket}).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aproxy.config import ProxyConfig

__all__ = ["Endpoint", "parse_endpoint", "public_listeners"]

# What a backslash-escaped colon stands for while the description is split on colons.
_ESCAPED_COLON = "\x00"


@dataclass(frozen=True)
class Endpoint:
    """
    One endpoint description, split.

    @ivar kind: The endpoint type, lowercased (C{tcp}, C{tcp6}, C{ssl}, C{unix}, ...).
    @ivar args: Everything after the type, in order: positional arguments and
        C{key=value} options alike, with escaped colons (C{\\:}) restored.
    @ivar proxy_protocol: Whether the description was wrapped in C{haproxy:} (the
        PROXY protocol); C{kind} and C{args} are then the inner listener's.
    """

    kind: str
    args: tuple[str, ...]
    proxy_protocol: bool = False

    @property
    def first(self) -> str | None:
        """The first argument (for C{tcp:} and C{ssl:}, the port), or L{None}."""
        return self.args[0] if self.args else None

    def option(self, name: str, default: str = "") -> str:
        """The value of the option C{name=value} (the last one given), or C{default}."""
        value = default
        for arg in self.args:
            key, sep, found = arg.partition("=")
            if sep and key == name:
                value = found
        return value


def parse_endpoint(description: str) -> Endpoint:
    """
    Split a server endpoint description into its type and arguments, looking through a
    C{haproxy:} wrapper. Nothing is checked: an unknown type or a bad port is Twisted's
    to refuse.
    """
    parts = description.replace("\\:", _ESCAPED_COLON).split(":")
    proxy_protocol = parts[0].lower() == "haproxy"
    if proxy_protocol:
        parts = parts[1:]
    kind = parts[0].lower() if parts else ""
    args = tuple(part.replace(_ESCAPED_COLON, ":") for part in parts[1:])
    return Endpoint(kind, args, proxy_protocol)


def public_listeners(config: ProxyConfig) -> list[str]:
    """
    The listening descriptions in C{config} reachable from other machines: TCP and TLS
    endpoints whose interface is not a loopback address (no interface means all), the
    SOCKS5 ones too.
    """
    public = []
    for description in (*config.port, *config.socks_port):
        endpoint = parse_endpoint(description)
        if endpoint.kind not in ("tcp", "tcp6", "ssl"):
            continue
        interface = endpoint.option("interface")
        try:
            loopback = ipaddress.ip_address(interface.strip("[]")).is_loopback
        except ValueError:
            loopback = interface == "localhost"
        if not loopback:
            public.append(description)
    return public
