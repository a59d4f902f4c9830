"""
Request targets (RFC 9112 section 3.2): the absolute form a forward proxy receives, split
into what it connects to and what it forwards, and the authority form of CONNECT.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from aproxy.errors import BadRequest

__all__ = ["Target", "format_authority", "parse_absolute_target", "parse_authority"]

_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#]*)([^#]*)")
_REG_NAME = re.compile(rb"[A-Za-z0-9\-._~]+")


class Target:
    """
    An absolute-form request target split for forwarding.

    @ivar scheme: C{b"http"} or C{b"https"}, lowercased (C{ws} and C{wss} become these).
    @ivar host: The host to connect to: a lowercased name, an IPv4 address or an IPv6
        address without brackets.
    @ivar port: The port, the scheme's default when the target has none.
    @ivar authority: The authority exactly as written, used as the forwarded C{Host}.
    @ivar path: The origin-form target (path and query, untouched; at least C{b"/"}).
    """

    __slots__ = ("authority", "host", "path", "port", "scheme")

    def __init__(self, scheme: bytes, host: str, port: int, authority: bytes, path: bytes) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.authority = authority
        self.path = path


_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}
# WebSocket URIs (RFC 6455 section 3) are reached as their HTTP counterparts: aiohttp, for
# one, sends "GET ws://host/path" with the Upgrade fields to a proxy.
_AS_HTTP: Final = {b"ws": b"http", b"wss": b"https"}


def format_authority(host: str, port: int) -> str:
    """
    Write C{host:port} as it goes in a request-target or a message: the inverse of
    L{parse_authority}.

    @return: C{host:port}, with brackets around an IPv6 address.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: bytes, default_port: int | None = None) -> tuple[str, int]:
    """
    Split C{host[:port]} into a host and a port.

    @param authority: E.g. C{b"example.com:8080"} or C{b"[::1]:8443"}.
    @param default_port: The port when none is given; L{None} makes the port mandatory.
    @return: The host (lowercased; IPv6 literals without brackets) and the port.
    @raise BadRequest: On userinfo, a bad host or a port outside 1..65535.
    """
    if b"@" in authority:
        raise BadRequest("userinfo in the request target is not allowed")
    if authority.startswith(b"["):
        close = authority.find(b"]")
        if close < 0:
            raise BadRequest("malformed IPv6 literal in the request target")
        literal = authority[1:close].decode("ascii", "replace")
        if "%" in literal:
            # An IPv6 zone ID is not part of the URI syntax (RFC 3986 section 3.2.2) and
            # would let a client pick the proxy's network interface.
            raise BadRequest("malformed IPv6 literal in the request target")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise BadRequest("malformed IPv6 literal in the request target") from None
        rest = authority[close + 1 :]
        if rest and not rest.startswith(b":"):
            raise BadRequest("malformed authority in the request target")
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_part = authority.partition(b":")
        if not name or _REG_NAME.fullmatch(name) is None:
            raise BadRequest("malformed host in the request target")
        host = name.decode("ascii").lower()
        _check_name(host)
        port_text = port_part if sep else None
    if not port_text:
        if default_port is None:
            raise BadRequest("the request target has no port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5:
        raise BadRequest("bad port in the request target")
    port = int(port_text)
    if not 0 < port < 65536:
        raise BadRequest("bad port in the request target")
    return host, port


def _check_name(host: str) -> None:
    """
    Refuse a host name that DNS can't carry (RFC 1035 section 2.3.4: labels of 1 to 63
    octets, 253 in all), before it reaches a resolver or an IDNA encoder that would fail
    on it later.
    """
    labels = host[:-1].split(".") if host.endswith(".") and len(host) > 1 else host.split(".")
    if len(host) > 254 or any(not 0 < len(label) < 64 for label in labels):
        shown = host if len(host) <= 80 else host[:77] + "..."
        raise BadRequest(
            f"bad host name in the request target: {shown} "
            "(a label is empty or longer than 63 characters, or the name is too long)"
        )


def parse_absolute_target(target: bytes, method: bytes) -> Target:
    """
    Split an absolute-form target (RFC 9112 section 3.2.2) for forwarding.

    @raise BadRequest: For a target that is not absolute-form, an unknown scheme, userinfo
        or a bad host or port.
    """
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        if target.startswith(b"/") or target == b"*":
            raise BadRequest(
                "this is a forward proxy: send the absolute URI as the request target,"
                " e.g. GET http://example.com/ HTTP/1.1"
            )
        raise BadRequest("malformed request target")
    scheme, authority, path = m.groups()
    scheme = scheme.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is None:
        raise BadRequest("unsupported scheme in the request target")
    scheme = _AS_HTTP.get(scheme, scheme)
    host, port = parse_authority(authority, default)
    if not path:
        path = b"*" if method == b"OPTIONS" else b"/"
    elif path[:1] != b"/":
        # "http://host?query": the path is empty, the query starts at once.
        path = b"/" + path
    return Target(scheme, host, port, authority, path)
