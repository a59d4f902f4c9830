"""
Who may use the proxy and where they may go: L{IPolicy} and its default, L{AccessPolicy}.

Client addresses are checked when a connection is made. Destinations are checked twice:
name rules on the target as written, before any DNS lookup, and address rules on a literal
target and on every address a name resolves to, just before connecting to exactly that
address (see L{aproxy.upstream.connector.EndpointConnector}), so DNS rebinding can't slip past them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from zope.interface import Interface, implementer

from aproxy.errors import Forbidden

__all__ = [
    "AccessPolicy",
    "HostPatterns",
    "IPAddress",
    "IPolicy",
    "Network",
    "check_host_pattern",
    "embedded_ipv4",
    "is_private",
    "normalize_address",
    "parse_host_pattern",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges --block-private refuses beyond what ipaddress calls non-global: CGNAT
# (100.64.0.0/10, "shared address space", which is_global already excludes on 3.11+ but
# spelt out here for clarity) and multicast (which ipaddress counts as global).
_EXTRA_BLOCKED = (ipaddress.ip_network("100.64.0.0/10"),)


_NAME = re.compile(r"[a-z0-9\-_~]+(?:\.[a-z0-9\-_~]+)*")

# IPv6 prefixes whose last 32 bits are an IPv4 address that a packet to them reaches or
# stands for: IPv4-compatible (RFC 4291 section 2.5.5.1, deprecated, but still routed
# over an automatic tunnel where the sit driver is loaded), IPv4-mapped (section 2.5.5.2),
# SIIT's IPv4-translated addresses (RFC 2765 section 2.1) and the well-known NAT64 prefix
# (RFC 6052 section 2.1). 6to4 (RFC 3056) carries its IPv4 address in bits 16-47 instead.
_EMBEDDED_IPV4 = tuple(
    ipaddress.ip_network(prefix)
    for prefix in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
# IPv6 ranges --block-private refuses that ipaddress does not call non-global on every
# Python version: RFC 8215's local-use NAT64 prefix (whose translators reach whatever
# IPv4 networks the site chooses, private ones included) and the deprecated site-local
# unicast prefix (RFC 3879), which some networks still route internally.
_EXTRA_BLOCKED_V6 = (
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("fec0::/10"),
)


def _address(text: str) -> IPAddress:
    """Parse an address, IPv4-mapped IPv6 addresses as the IPv4 address they carry."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_address(text: str) -> IPAddress | None:
    """An address in canonical form (IPv4-mapped IPv6 as IPv4), or None if not one."""
    try:
        return _address(text.strip("[]"))
    except ValueError:
        return None


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address an IPv6 address carries, or L{None}: for IPv4-compatible
    (C{::a.b.c.d}), IPv4-mapped (C{::ffff:a.b.c.d}), SIIT (C{::ffff:0:a.b.c.d}),
    well-known NAT64 (C{64:ff9b::a.b.c.d}) and 6to4 (C{2002:AABB:CCDD::/48}) addresses.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in _EMBEDDED_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_private(address: IPAddress) -> bool:
    """
    Whether C{address} is one C{--block-private} refuses: loopback, private, link-local
    (169.254.169.254, the cloud metadata address, included), CGNAT, unique-local,
    site-local, multicast, reserved or unspecified; an IPv6 address that carries an
    IPv4 address (see L{embedded_ipv4}) is judged by that IPv4 address, and RFC 8215's
    local-use NAT64 prefix (C{64:ff9b:1::/48}) is refused whole.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_loopback or address.is_unspecified:
            return True
        embedded = embedded_ipv4(address)
        if embedded is not None:
            return is_private(embedded)
        if address.is_reserved or any(address in net for net in _EXTRA_BLOCKED_V6):
            return True
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        return True
    if any(address in net for net in _EXTRA_BLOCKED if net.version == address.version):
        return True
    return not address.is_global


def parse_host_pattern(text: str) -> tuple[str, str | Network]:
    """
    Parse a C{--deny-host}/C{--allow-host} pattern.

    @return: C{("exact", name)}, C{("subdomains", suffix)} for C{*.example.com},
        C{("domain", name)} for C{.example.com} (the domain and its subdomains), or
        C{("address", network)} for an IP address or CIDR.
    @raise ValueError: For an empty or malformed pattern.
    """
    text = text.strip().lower().rstrip(".")
    if not text:
        raise ValueError("empty host pattern")
    try:
        return "address", ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    if text.startswith("*."):
        kind, name = "subdomains", text[2:]
    elif text.startswith("."):
        kind, name = "domain", text[1:]
    else:
        kind, name = "exact", text
    if not name or _NAME.fullmatch(name) is None or any(not p for p in name.split(".")):
        # Not a network and not a host name: a typo here would otherwise become a rule
        # that silently matches nothing.
        raise ValueError(f"bad host pattern {text!r}")
    return kind, name


class IPolicy(Interface):
    """May this client use the proxy, and may it reach this destination?"""

    def client_allowed(host: str) -> bool:  # noqa: N805
        """Whether a client connecting from address C{host} may use the proxy at all."""

    def check_name(host: str) -> None:  # noqa: N805
        """
        Check a destination host as the client wrote it, before any DNS lookup.

        @raise Forbidden: If a rule refuses it.
        """

    def needs_address_check() -> bool:
        """Whether resolved addresses must be checked with L{check_address}."""

    def check_address(host: str, address: str) -> None:  # noqa: N805
        """
        Check an address a destination resolved to (or a literal target).

        @raise Forbidden: If a rule refuses it.
        """


@implementer(IPolicy)
class AccessPolicy:
    """
    The default policy, from C{--allow}, C{--deny-host}, C{--allow-host} and
    C{--block-private}: deny rules first, then, if there are allow rules, only matching
    destinations; the error names the rule.
    """

    def __init__(
        self,
        allow_clients: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        deny_hosts: Sequence[str] = (),
        allow_hosts: Sequence[str] = (),
        block_private: bool = False,
    ) -> None:
        self._clients = [ipaddress.ip_network(c, strict=False) for c in allow_clients]
        self._deny = [(text, *parse_host_pattern(text)) for text in deny_hosts]
        self._allow = [(text, *parse_host_pattern(text)) for text in allow_hosts]
        self._block_private = block_private
        self._has_allow_addresses = any(kind == "address" for _, kind, _ in self._allow)
        self._address_rules = block_private or any(
            kind == "address" for _, kind, _ in self._deny + self._allow
        )

    def client_allowed(self, host: str) -> bool:
        """Whether C{host} is inside one of the allowed client networks."""
        try:
            address = _address(host)
        except ValueError:
            return False
        return any(address in net for net in self._clients if net.version == address.version)

    def check_name(self, host: str) -> None:
        """Apply the name rules (and, for a literal address, the address rules)."""
        name = host.lower().rstrip(".")
        try:
            literal: IPAddress | None = _address(name)
        except ValueError:
            literal = None
        if literal is not None:
            self._check(name, literal)
            return
        for text, kind, value in self._deny:
            if kind != "address" and _name_matches(name, kind, value):
                raise Forbidden(
                    f"destination {host} is denied by --deny-host {text}",
                    "http_request_denied",
                    details=f"deny-host {text}",
                )
        if (
            self._allow
            and not self._has_allow_addresses
            and not any(
                kind != "address" and _name_matches(name, kind, value)
                for _, kind, value in self._allow
            )
        ):
            raise Forbidden(
                f"destination {host} matches no --allow-host rule",
                "http_request_denied",
                details="allow-host",
            )

    def needs_address_check(self) -> bool:
        """True when some rule depends on the addresses a name resolves to."""
        return self._address_rules

    def check_address(self, host: str, address: str) -> None:
        """Apply the address rules and C{--block-private} to one resolved address."""
        self._check(host.lower().rstrip("."), _address(address))

    def _check(self, name: str, address: IPAddress) -> None:
        # A deny rule for an IPv4 network also refuses the IPv6 forms that reach it.
        inner = embedded_ipv4(address)
        for text, kind, value in self._deny:
            if kind == "address" and (address in value or (inner is not None and inner in value)):
                raise Forbidden(
                    f"destination {name} ({address}) is denied by --deny-host {text}",
                    "destination_ip_prohibited",
                    details=f"deny-host {text}",
                )
        if self._block_private and is_private(address):
            raise Forbidden(
                f"destination {name} ({address}) is a private address (--block-private)",
                "destination_ip_prohibited",
                details="block-private",
            )
        if self._allow:
            for _, kind, value in self._allow:
                if kind == "address" and address in value:
                    return
                if kind != "address" and _name_matches(name, kind, value):
                    return
            raise Forbidden(
                f"destination {name} ({address}) matches no --allow-host rule",
                "destination_ip_prohibited",
                details="allow-host",
            )


def _name_matches(name: str, kind: str, value: object) -> bool:
    if kind == "exact":
        return name == value
    suffix = "." + str(value)
    if kind == "subdomains":
        return name.endswith(suffix)
    return name == value or name.endswith(suffix)


def check_host_pattern(text: str) -> None:
    """Accept C{*} (any host) or a L{parse_host_pattern} form; else raise L{ValueError}."""
    if text.strip() != "*":
        parse_host_pattern(text)


class HostPatterns:
    """
    A list of host patterns in the forms of L{parse_host_pattern}, and C{*} for any host:
    does a destination match any of them? (Routes, interception and the destination
    rules' name forms all match hosts this way.)
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self._any = any(text.strip() == "*" for text in texts)
        self._rules = [parse_host_pattern(text) for text in texts if text.strip() != "*"]

    def matches(self, host: str) -> bool:
        """Whether C{host} (a name, or an IP address without brackets) matches."""
        if self._any:
            return True
        host = host.lower().rstrip(".")
        address = normalize_address(host)
        for kind, value in self._rules:
            if kind == "address":
                if address is not None and address in value:
                    return True
            elif address is None and _name_matches(host, kind, value):
                return True
        return False
