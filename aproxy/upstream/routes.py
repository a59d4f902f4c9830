"""
Parent proxies and routes: C{--upstream URL} and C{--route PATTERN=TARGET}.

A route sends the requests for matching destination hosts either directly or through a
parent proxy: an HTTP proxy (C{http://}, or C{https://} with TLS to the parent) or a SOCKS5
proxy (C{socks5://}, RFC 1928, with RFC 1929 username/password). The first matching route
wins; a destination no route matches goes directly.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from aproxy.access.policy import parse_host_pattern

__all__ = ["Parent", "Router", "parse_parent", "parse_route", "without_credentials"]

_DEFAULT_PARENT_PORTS = {"http": 80, "https": 443, "socks5": 1080}


@dataclass(frozen=True)
class Parent:
    """
    A parent proxy.

    @ivar scheme: C{"http"}, C{"https"} (TLS to the parent) or C{"socks5"}.
    @ivar host: Its host name or address (IPv6 without brackets).
    @ivar port: Its port.
    @ivar username: The user name to log in with, or L{None}.
    @ivar password: The password (with C{username}).
    """

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """How errors and logs name the parent: its URL without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def authorization(self) -> bytes | None:
        """The C{Proxy-Authorization} field line for an HTTP parent, or L{None}."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return b"Proxy-Authorization: Basic " + base64.b64encode(pair) + b"\r\n"


_USERINFO = re.compile(r"(?<=://)[^/@]*@")


def without_credentials(text: str) -> str:
    """A parent URL or a route with any C{user:password@} replaced, for display."""
    return _USERINFO.sub("***@", text)


def parse_parent(url: str) -> Parent:
    """
    Parse a parent proxy URL: C{http://[user:pass@]host:port}, C{https://...} or
    C{socks5://...} (C{socks5h://} is the same: names are always resolved by the parent).
    User name and password may be percent-encoded.

    @raise ValueError: For anything else (one line, naming the URL without credentials).
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"parent proxy URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme == "socks5h":
        scheme = "socks5"
    shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{port}" if port else "")
    if scheme not in _DEFAULT_PARENT_PORTS:
        raise ValueError(f"parent proxy {shown}: the scheme must be http, https or socks5")
    if not parts.hostname:
        raise ValueError(f"parent proxy {shown}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"parent proxy {shown}: a parent URL has no path or query")
    host = parts.hostname.lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host.encode("idna")
        except UnicodeError:
            raise ValueError(f"parent proxy {shown}: bad host name") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme == "socks5" and username is not None:
        # RFC 1929: each is 1 to 255 bytes.
        if not 0 < len(username.encode()) < 256 or not 0 < len((password or "").encode()) < 256:
            raise ValueError(
                f"parent proxy {shown}: SOCKS5 user name and password must be 1-255 bytes"
            )
    if any(c in (username or "") + (password or "") for c in "\r\n\x00"):
        raise ValueError(f"parent proxy {shown}: control characters in the credentials")
    return Parent(scheme, host, port or _DEFAULT_PARENT_PORTS[scheme], username, password)


def parse_route(text: str) -> tuple[str, Parent | None]:
    """
    Parse a C{--route PATTERN=TARGET} value: PATTERN is a host name, C{*.suffix} (its
    subdomains), C{.suffix} (the domain and its subdomains) or C{*} (anything); TARGET a
    parent proxy URL or C{direct}.

    @return: The pattern and the parent (L{None} for C{direct}).
    @raise ValueError: For a malformed value.
    """
    pattern, sep, target = text.partition("=")
    pattern = pattern.strip().lower()
    target = target.strip()
    if not sep or not pattern or not target:
        raise ValueError(f"{text.split('@')[-1]!r} is not PATTERN=TARGET")
    if pattern != "*":
        try:
            parse_host_pattern(pattern)
        except ValueError as e:
            raise ValueError(str(e)) from None
    if target.lower() == "direct":
        return pattern, None
    return pattern, parse_parent(target)


class Router:
    """
    Picks the route for a destination host: the first pattern that matches, else direct.

    @param routes: C{PATTERN=TARGET} strings as for L{parse_route}, in order.
    """

    def __init__(self, routes: tuple[str, ...] = ()) -> None:
        self._rules: list[tuple[str, str, Parent | None]] = []
        for text in routes:
            pattern, parent = parse_route(text)
            if pattern == "*":
                self._rules.append(("any", "", parent))
                continue
            kind, value = parse_host_pattern(pattern)
            self._rules.append((kind, str(value), parent))
        self.parents: tuple[Parent, ...] = tuple(
            {p: None for _, _, p in self._rules if p is not None}
        )

    def __bool__(self) -> bool:
        """Whether any route is configured (if not, everything goes directly)."""
        return bool(self._rules)

    def parent_for(self, host: str) -> Parent | None:
        """The parent for C{host} (as the client wrote it), or L{None} for direct."""
        host = host.lower().rstrip(".")
        for kind, value, parent in self._rules:
            if kind == "any" or (kind == "exact" and host == value):
                return parent
            if kind == "subdomains" and host.endswith("." + value):
                return parent
            if kind == "domain" and (host == value or host.endswith("." + value)):
                return parent
            if kind == "address":
                try:
                    if ipaddress.ip_address(host) in ipaddress.ip_network(value):
                        return parent
                except ValueError:
                    continue
        return None
