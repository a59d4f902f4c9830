"""
Proxy auto-configuration: the PAC file (a JavaScript C{FindProxyForURL}) that points
browsers and operating systems at this proxy, served at C{/proxy.pac} and C{/wpad.dat}.

Generated unless C{--pac FILE} gives one: plain host names (no dot) and loopback go
C{DIRECT}, and so do hosts matching C{--pac-direct PATTERN}; everything else goes
C{PROXY host:port}. Hosts the proxy refuses (C{--deny-host}) are not made direct: a
client reaches them only through the proxy, which can then refuse them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

from aproxy.access.policy import parse_host_pattern
from aproxy.config import ProxyConfig

__all__ = ["PAC_CONTENT_TYPE", "PAC_PATHS", "generate_pac", "pac_body", "read_pac"]

PAC_CONTENT_TYPE = b"application/x-ns-proxy-autoconfig"
"""The media type browsers expect a PAC file in."""

PAC_PATHS = frozenset({b"/proxy.pac", b"/wpad.dat"})
"""Where the PAC file is served (C{wpad.dat}: the name WPAD discovery asks for)."""


def _condition(pattern: str) -> str:
    """The JavaScript test of C{host} for one C{--pac-direct} pattern."""
    if pattern.strip() == "*":
        return "true"
    kind, value = parse_host_pattern(pattern)
    if kind == "address":
        assert isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network)
        if value.version == 4:
            return (
                f"isInNet(host, {json.dumps(str(value.network_address))}, "
                f"{json.dumps(str(value.netmask))})"
            )
        # IPv6: isInNetEx where the engine has it (Chrome, Windows), else exact.
        return (
            f'(typeof isInNetEx == "function" ? isInNetEx(host, {json.dumps(str(value))}) '
            f": host == {json.dumps(str(value.network_address))})"
        )
    name = json.dumps(str(value))
    dotted = json.dumps("." + str(value))
    if kind == "exact":
        return f"host == {name}"
    if kind == "subdomains":
        return f"dnsDomainIs(host, {dotted})"
    return f"(host == {name} || dnsDomainIs(host, {dotted}))"


def generate_pac(proxy: str, direct: Sequence[str] = ()) -> bytes:
    """
    The PAC file for a proxy at C{proxy} (C{host:port}).

    @param direct: C{--pac-direct} patterns (the forms of C{--deny-host}, or C{*}).
    """
    tests = [
        "isPlainHostName(host)",
        'host == "localhost"',
        'shExpMatch(host, "127.*")',
        'host == "::1"',
        'host == "[::1]"',
        *(_condition(pattern) for pattern in direct),
    ]
    body = (
        "// Proxy auto-configuration made by aproxy.\n"
        "function FindProxyForURL(url, host) {\n"
        "    host = host.toLowerCase();\n"
        "    if (" + "\n        || ".join(tests) + ") {\n"
        '        return "DIRECT";\n'
        "    }\n"
        f"    return {json.dumps('PROXY ' + proxy)};\n"
        "}\n"
    )
    return body.encode("utf-8")


def read_pac(config: ProxyConfig) -> bytes | None:
    """
    The C{--pac} file's bytes (read when a configuration is loaded, so on SIGHUP too),
    or L{None} to generate one.

    @raise ValueError: If the file can't be read (one line).
    """
    if config.pac is None:
        return None
    try:
        with open(config.pac, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise ValueError(f"pac: cannot read {config.pac}: {e.strerror or e}") from None


def pac_body(config: ProxyConfig, pac_file: bytes | None, host: str | None) -> bytes:
    """
    The PAC file to serve: C{--pac}'s, or one generated for C{--pac-proxy}, else for
    C{host} (the C{Host} the client used), else for the first listening address.
    """
    if pac_file is not None:
        return pac_file
    proxy = config.pac_proxy or host
    if not proxy:
        own = config.own_addresses
        address, port = own[0] if own else ("127.0.0.1", 8080)
        proxy = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return generate_pac(proxy, config.pac_direct)
