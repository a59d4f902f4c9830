"""
The value forms of aproxy's settings: parsers of the command line's texts (port lists,
listening endpoints) and the coercers of L{aproxy.options.OPTIONS}.

A coercer takes the option's name (for the message) and a value in any accepted form (the
command line's text, the config file's TOML value, or the value itself) and returns the
value the proxy uses, or raises C{ValueError} with a message that starts with the name
and shows the value.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from aproxy.upstream.routes import Router, parse_parent

__all__ = [
    "DEFAULT_HTTP_PORTS",
    "DEFAULT_PORT",
    "DEFAULT_UDP_PORTS",
    "Coerce",
    "addon_spec",
    "check_proxy_protocol",
    "choice",
    "each",
    "flag",
    "format_port_list",
    "insecure_host",
    "listen_description",
    "listener",
    "listeners",
    "network",
    "number",
    "optional",
    "parent",
    "parse_port_list",
    "port_ranges",
    "proxy_protocol_inner",
    "realm",
    "routes",
    "seconds",
    "socks_listeners",
    "strings",
    "text",
    "via_name",
    "whole",
    "workers",
]

DEFAULT_PORT = "tcp:8080:interface=127.0.0.1"
# Squid's Safe_ports without the legacy protocols (ftp, gopher, wais, ...): the web
# ports and the unprivileged ones, where no system service such as SMTP listens.
DEFAULT_HTTP_PORTS = ((80, 80), (443, 443), (1025, 65535))
# SOCKS5 UDP ASSOCIATE: DNS, NTP and QUIC.
DEFAULT_UDP_PORTS = ((53, 53), (123, 123), (443, 443))
_VIA_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:\[\]]+")

PortRanges = tuple[tuple[int, int], ...] | None


def parse_port_list(text: str, option: str = "connect-ports") -> PortRanges:
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


def format_port_list(ranges: PortRanges) -> str:
    """The command-line form of port ranges: the inverse of L{parse_port_list}."""
    if ranges is None:
        return "*"
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


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
        if port is None:
            continue
        if not port.strip().isdigit():
            raise ValueError(f"the port {port!r} is not a number in {description!r}")
        if int(port) > 65535:
            raise ValueError(f"port {int(port)} is out of range in {description!r}")


Coerce = Callable[[str, Any], Any]


def number(name: str, value: Any, kind: type[int] | type[float]) -> Any:
    """A number from a number or its text; not a bool (C{True} is no timeout)."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if kind is float:
            return float(value)
        if isinstance(value, int):
            return value
    what = "a whole number" if kind is int else "a number"
    raise ValueError(f"{name} must be {what}, not {value!r}")


def seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds: every timeout must end."""
    amount: float = number(name, value, float)
    # Not infinite either: every timeout must end (nan fails "> 0" already).
    if not 0 < amount < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return amount


def whole(least: int, what: str) -> Coerce:
    """A whole number of at least C{least}; C{what} ends the message."""

    def coerce(name: str, value: Any) -> int:
        count: int = number(name, value, int)
        if count < least:
            raise ValueError(f"{name} must be {what}, not {value!r}")
        return count

    return coerce


_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def size(name: str, value: Any) -> int:
    """
    A size in bytes: a whole number, or text with a binary unit (C{"256MiB"},
    C{"1.5 GiB"}, C{"4096"}). Decimal units (C{MB}) are refused rather than guessed at.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be a size of 0 or more, not {value!r}")
        return value
    if isinstance(value, str):
        text = value.strip()
        digits = text.rstrip("BbIiKkMmGgTt ")
        unit = text[len(digits) :].strip().lower()
        try:
            amount = float(digits) if "." in digits else int(digits)
        except ValueError:
            amount = -1
        if unit in _UNITS and digits.replace(".", "", 1).isdigit() and amount >= 0:
            return int(amount * _UNITS[unit])
    raise ValueError(f"{name} must be a size such as 4096, 512KiB, 256MiB or 2GiB, not {value!r}")


def text(name: str, value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {value!r}")
    return value


def optional(coerce: Coerce) -> Coerce:
    """L{None} (the setting is off), or what C{coerce} accepts."""

    def optional(name: str, value: Any) -> Any:
        return None if value is None else coerce(name, value)

    return optional


def choice(*choices: str) -> Coerce:
    """One of C{choices}."""
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def choice(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be {words}, not {value!r}")
        return str(value)

    return choice


def flag(name: str, value: Any) -> bool:
    """True or false (a flag on the command line)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def strings(name: str, value: Any) -> tuple[str, ...]:
    """A repeatable option's values: a list (numbers allowed), or one string for one."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
    ):
        return tuple(str(v) for v in value)
    raise ValueError(f"{name} must be a string or a list of strings, not {value!r}")


def each(check: Callable[[str], object]) -> Coerce:
    """A repeatable option's values, each checked by C{check} (ValueError: message)."""

    def each(name: str, value: Any) -> tuple[str, ...]:
        items = strings(name, value)
        for item in items:
            try:
                check(item)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return items

    return each


def network(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or CIDR network") from None


def insecure_host(host: str) -> None:
    if not host.strip() or any(c in host for c in "*/ \t"):
        raise ValueError(f"{host!r} is not a host name or address")


def listeners(name: str, value: Any) -> tuple[str, ...]:
    """C{--port}: endpoint descriptions (see L{listen_description}), at least one."""
    try:
        ports = tuple(listen_description(p) for p in strings(name, value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if not ports:
        raise ValueError("at least one --port is needed")
    return ports


def socks_listeners(name: str, value: Any) -> tuple[str, ...]:
    """
    C{--socks-port}: endpoint descriptions as for C{--port} (a bare number is that port
    on 127.0.0.1), none by default; not behind C{haproxy:} (the SOCKS front end reads no
    PROXY header).
    """
    try:
        ports = tuple(listen_description(p) for p in strings(name, value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    for description in ports:
        if proxy_protocol_inner(description) is not None:
            raise ValueError(f"{name}: {description!r}: haproxy: is for --port only")
    return ports


def listener(name: str, value: Any) -> str:
    """One endpoint description (see L{listen_description})."""
    try:
        return listen_description(text(name, value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def port_ranges(name: str, value: Any) -> PortRanges:
    """
    Ports and ranges: the command line's text (C{"443,8000-8100"}, C{"*"}), the config
    file's list (C{[443, "8000-8100"]}), (low, high) pairs, or L{None} for any port.
    """
    if value is None or isinstance(value, str):
        return None if value is None else parse_port_list(value, name)
    if isinstance(value, list | tuple):
        if all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
        ):
            return parse_port_list(",".join(str(v) for v in value), name)
        if all(isinstance(v, list | tuple) and len(v) == 2 for v in value):
            ranges = []
            for low, high in value:
                if (
                    not isinstance(low, int)
                    or not isinstance(high, int)
                    or not 0 < low <= high < 65536
                ):
                    raise ValueError(f"{name}: bad port range {low}-{high}")
                ranges.append((low, high))
            return tuple(ranges)
    raise ValueError(
        f'{name} must be ports and ranges such as "443,8000-8100" or "*", not {value!r}'
    )


def via_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _VIA_NAME.fullmatch(value):
        raise ValueError(
            f"{name} must be a token such as 'aproxy' or 'proxy.example:3128', not {value!r}"
        )
    return value


def realm(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n\x00\x7f"):
        raise ValueError(f"{name} must be non-empty text without control characters, not {value!r}")
    return value


def routes(name: str, value: Any) -> tuple[str, ...]:
    routes = strings(name, value)
    try:
        Router(routes)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return routes


def readable_file(name: str, value: Any) -> str:
    """The path of a file this process can read."""
    path = text(name, value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path}: {e.strerror or e}") from None
    return path


def addon_spec(text: str) -> None:
    """An addon as C{MODULE:NAME} or C{path/to/file.py:NAME} (checked for its form only)."""
    where, sep, name = text.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"expected MODULE:NAME or path/to/file.py:NAME, not {text!r}")


def authority(name: str, value: Any) -> str:
    """C{HOST:PORT}, as a C{CONNECT} names its destination."""
    from aproxy.errors import ProxyError
    from aproxy.http.target import parse_authority

    try:
        parse_authority(text(name, value).encode("ascii"))
    except (ValueError, UnicodeError, ProxyError):
        raise ValueError(f"{name} must be HOST:PORT, not {value!r}") from None
    return str(value)


def upstream(name: str, value: Any) -> str:
    """C{--upstream}: a parent proxy URL, or a pool (C{STRATEGY:MEMBER,...})."""
    try:
        Router(("*=" + text(name, value),))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return str(value)


def parent(name: str, value: Any) -> str:
    try:
        parse_parent(text(name, value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return str(value)


def workers(name: str, value: Any) -> str:
    """C{--workers}: a count or C{auto}, kept as text (the command line counts the cores)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return text(name, value)
