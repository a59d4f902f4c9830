"""
Every setting of aproxy, declared once in L{OPTIONS}.

Each row (an L{Option}) gives a setting's name, help text, default, the kind of value it
takes and the function that turns any accepted form of that value into the one the proxy
uses. From this table come the C{twistd aproxy} command line (L{aproxy.run.tap.Options}),
the keys of the C{--config} TOML file (L{toml_kinds}) and the fields of
L{aproxy.config.ProxyConfig}, whose names are the option names in snake_case
(C{--deny-host} is C{deny_host}). So the three always agree: a value that is good on the
command line is good in the file and in C{ProxyConfig(...)} (C{connect_ports="443,8443"},
C{read_timeout="5"}), and a bad one is one C{ValueError} whose message starts with the
option's name.

The value forms themselves (parsers and coercers) are in L{aproxy.values}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aproxy import values
from aproxy.access.policy import check_host_pattern, parse_host_pattern
from aproxy.values import (
    DEFAULT_HTTP_PORTS,
    DEFAULT_PORT,
    DEFAULT_UDP_PORTS,
    Coerce,
    format_port_list,
)

__all__ = [
    "OPTIONS",
    "Option",
    "config_options",
    "option",
    "toml_kinds",
]


@dataclass(frozen=True)
class Option:
    """
    One setting: a long command-line option, a config file key and (for most) a
    L{aproxy.config.ProxyConfig} field.

    @ivar name: The long option name, also the config file key (C{"connect-ports"}).
    @ivar help: The text C{--help} shows.
    @ivar default: The value when the setting is not given, in the form the proxy uses
        (for a command-line-only option, the command line's text).
    @ivar coerce: Turns a value in any accepted form into the form the proxy uses;
        raises C{ValueError} with a message that starts with the name.
    @ivar kind: What the config file accepts: C{"float"}, C{"int"}, C{"str"}, C{"flag"},
        C{"list"} (repeatable), C{"ports"} or C{"workers"}; L{None} for no key.
    @ivar field: The L{aproxy.config.ProxyConfig} field, or L{None} for an option of the
        command line alone (C{--config}, C{--workers}, C{--no-via}).
    @ivar repeatable: Given once per value; the values make a list.
    @ivar flag: Takes no value on the command line (true when given).
    @ivar short: A one-letter synonym (C{-p} for C{--port}), or L{None}.
    @ivar negates: For a flag: the field it sets to L{None} when given (C{--no-via}).
    """

    name: str
    help: str
    default: Any
    coerce: Coerce
    kind: str | None
    field: str | None
    repeatable: bool = False
    flag: bool = False
    short: str | None = None
    negates: str | None = None

    @property
    def command_line_default(self) -> Any:
        """The value C{twistd aproxy} holds before parsing (shown by C{--help})."""
        if self.repeatable:
            return None
        if self.kind == "ports":
            return format_port_list(self.default)
        return self.default

    def parse(self, value: Any) -> Any:
        """This option's value in the form the proxy uses (see L{coerce})."""
        return self.coerce(self.name, value)


def _row(
    name: str,
    kind: str | None,
    coerce: Coerce,
    default: Any,
    help: str,
    *,
    field: bool = True,
    short: str | None = None,
    negates: str | None = None,
) -> Option:
    return Option(
        name=name,
        help=" ".join(help.split()),
        default=default,
        coerce=coerce,
        kind=kind,
        field=name.replace("-", "_") if field else None,
        repeatable=kind == "list",
        flag=kind == "flag",
        short=short,
        negates=negates,
    )


_unsigned = values.whole(0, "a whole number, 0 or more")
_positive = values.whole(1, "a whole number, 1 or more")

# The table. Its order is the order of the ProxyConfig fields (the /status page shows
# them so) and of --help.
OPTIONS: tuple[Option, ...] = (
    _row(
        "config",
        None,
        values.optional(values.text),
        None,
        """A TOML file whose keys are these long option names (e.g. connect-ports =
        [443, 8443], allow = ["10.0.0.0/8"]); options given here override it, and a
        repeatable option given here replaces the file's list. SIGHUP re-reads it.""",
        field=False,
    ),
    _row(
        "port",
        "list",
        values.listeners,
        (DEFAULT_PORT,),
        """Where to listen (repeatable): a bare port number means that port on 127.0.0.1;
        or any Twisted endpoint, e.g. tcp:8080:interface=0.0.0.0,
        tcp6:8080:interface=\\:\\:1, unix:/run/aproxy.sock. Default:
        tcp:8080:interface=127.0.0.1.""",
        short="p",
    ),
    _row(
        "connect-timeout",
        "float",
        values.seconds,
        10.0,
        "Seconds to connect to an origin before 504.",
    ),
    _row(
        "read-timeout",
        "float",
        values.seconds,
        60.0,
        "Seconds to wait for the origin's response head, and between body bytes.",
    ),
    _row(
        "idle-timeout", "float", values.seconds, 60.0, "Seconds an idle keep-alive client is kept."
    ),
    _row(
        "header-timeout",
        "float",
        values.seconds,
        10.0,
        "Seconds a client has to send a complete request head (then 408).",
    ),
    _row(
        "via",
        "str",
        values.optional(values.via_name),
        "aproxy",
        "Pseudonym used in the Via fields the proxy adds.",
    ),
    _row(
        "no-via",
        "flag",
        values.flag,
        False,
        "Do not add a Via field to forwarded messages.",
        field=False,
        negates="via",
    ),
    _row(
        "max-head-size",
        "int",
        values.whole(1024, "at least 1024 bytes"),
        65536,
        "Largest request or response head, bytes (431).",
    ),
    _row(
        "max-request-line",
        "int",
        # RFC 9112 section 3: request lines of at least 8000 octets should be accepted.
        values.whole(8000, "at least 8000 bytes"),
        16384,
        "Longest request line, bytes (414).",
    ),
    _row(
        "pool-size",
        "int",
        _unsigned,
        100,
        "Idle upstream connections kept per origin (0: none).",
    ),
    _row(
        "pool-idle-timeout",
        "float",
        values.seconds,
        30.0,
        "Seconds an idle pooled upstream connection is kept.",
    ),
    _row(
        "pool-max-age",
        "float",
        values.seconds,
        120.0,
        """Seconds after which a pooled upstream connection is no longer reused, however
        busy (a new one is made, and its address checked again).""",
    ),
    _row(
        "connect-ports",
        "ports",
        values.port_ranges,
        ((443, 443),),
        "Ports CONNECT may reach: comma-separated ports and ranges (8000-8100), or * for any.",
    ),
    _row(
        "http-ports",
        "ports",
        values.port_ranges,
        DEFAULT_HTTP_PORTS,
        """Ports plain http://, https://, ws:// and wss:// requests may reach (not
        CONNECT): comma-separated ports and ranges, or * for any.""",
    ),
    _row(
        "tunnel-idle-timeout",
        "float",
        values.seconds,
        600.0,
        "Seconds a CONNECT or Upgrade tunnel may stay silent before it is closed.",
    ),
    _row(
        "allow",
        "list",
        values.each(values.network),
        ("127.0.0.0/8", "::1/128"),
        """A client network (address or CIDR) that may use the proxy (repeatable).
        Default: 127.0.0.0/8 and ::1/128 only; other clients get 403.""",
    ),
    _row(
        "proxy-protocol-from",
        "list",
        # Checked with the listeners, by check_proxy_protocol: its message names the option.
        values.strings,
        (),
        """A load balancer network (address or CIDR) trusted to send a PROXY header
        (repeatable; required with a --port haproxy:tcp:... listener, where any other
        peer, and a trusted one's connection without a header, is closed).""",
    ),
    _row(
        "deny-host",
        "list",
        values.each(parse_host_pattern),
        (),
        """A destination to refuse (repeatable): a host name, *.example.com
        (subdomains), .example.com (the domain and its subdomains), or an IP address or
        CIDR.""",
    ),
    _row(
        "allow-host",
        "list",
        values.each(parse_host_pattern),
        (),
        """A destination to allow (repeatable; same patterns as --deny-host). With any
        --allow-host, only matching destinations are allowed.""",
    ),
    _row(
        "block-private",
        "flag",
        values.flag,
        False,
        """Refuse destinations that resolve to loopback, private, link-local (cloud
        metadata), CGNAT, unique-local, multicast or unspecified addresses.""",
    ),
    _row(
        "x-forwarded-for",
        "str",
        values.choice("add", "strip", "keep"),
        "keep",
        "add (append the client address), strip (remove incoming ones) or keep.",
    ),
    _row(
        "max-connections",
        "int",
        _positive,
        4096,
        "Client connections served at once; more get 503.",
    ),
    _row(
        "max-clients-per-ip",
        "int",
        _positive,
        256,
        "Client connections from one address at once; more get 503.",
    ),
    _row(
        "auth",
        "str",
        values.optional(values.text),
        None,
        """An Apache htpasswd file (bcrypt, $apr1$, {SHA}, $5$, $6$ entries): every
        request then needs Proxy-Authorization: Basic credentials, or gets 407. Re-read
        when it changes.""",
    ),
    _row("auth-realm", "str", values.realm, "aproxy", "The realm named in the 407 challenge."),
    _row(
        "auth-max-failures",
        "int",
        _unsigned,
        10,
        """With --auth: failed logins one client address may make within
        --auth-failure-window; then 429 until that window closes, with no password
        checked (0: no limit).""",
    ),
    _row(
        "auth-failure-window",
        "float",
        values.seconds,
        60.0,
        "Seconds from an address's first failed login during which its failures count.",
    ),
    _row(
        "shutdown-timeout",
        "float",
        values.seconds,
        30.0,
        """On stop (SIGTERM): seconds requests and tunnels in flight may take to finish;
        idle connections close at once.""",
    ),
    _row(
        "access-log",
        "str",
        values.optional(values.text),
        None,
        """Write one line per request and tunnel to this file (- for standard output);
        SIGUSR1 reopens it after rotation.""",
    ),
    _row(
        "access-log-format",
        "str",
        values.choice("combined", "squid", "json"),
        "combined",
        "combined (Apache style plus extras), squid (Squid's access.log) or json.",
    ),
    _row(
        "cache-memory",
        "size",
        values.optional(values.size),
        None,
        """Cache responses (RFC 9111, as a shared cache) in memory, up to this size,
        e.g. 256MiB. With --workers, each worker has its own memory cache of this size.
        Off by default; changing it needs a restart.""",
    ),
    _row(
        "cache-dir",
        "str",
        values.optional(values.text),
        None,
        """Cache responses on disk in this directory (created if missing; one store
        shared by every worker; it survives restarts), up to --cache-size. Off by
        default; changing it needs a restart.""",
    ),
    _row(
        "cache-size",
        "size",
        values.size,
        1 << 30,
        "The most the disk cache (--cache-dir) holds; least recently used objects go first.",
    ),
    _row(
        "cache-max-object",
        "size",
        values.size,
        256 << 20,
        """The largest response the cache stores (larger ones are relayed, not
        stored).""",
    ),
    _row(
        "cache-purge-from",
        "list",
        values.each(values.network),
        (),
        """Client networks (CIDR, repeatable) whose PURGE requests remove a URL from the
        cache; others get 403. None by default.""",
    ),
    _row(
        "metrics",
        "str",
        values.optional(values.listener),
        None,
        """Serve /metrics (Prometheus) and /status (a page) on this endpoint, e.g.
        tcp:9108:interface=127.0.0.1 (a bare number means that port on 127.0.0.1). With
        --workers, the parent serves the totals over all workers.""",
    ),
    _row(
        "workers",
        "workers",
        values.workers,
        "1",
        """Worker processes sharing the listening ports (auto: one per core). Each is a
        whole proxy; the parent restarts one that dies, passes signals on and serves
        --metrics with the workers' totals.""",
        field=False,
    ),
    _row(
        "route",
        "list",
        values.routes,
        (),
        """PATTERN=TARGET (repeatable, first match wins): send requests for hosts
        matching PATTERN (a host name, *.suffix or *) to TARGET, a parent proxy URL as for
        --upstream, direct, or hash:URL,URL,... (a cache fleet: each URL goes to the one
        member that owns it by rendezvous hashing; this proxy's own URL in the list means
        serve it here), or a parent pool STRATEGY:MEMBER,MEMBER,... where STRATEGY is rr
        (round robin), least (fewest in flight), random or client (one member per client)
        and each MEMBER a parent URL or direct, with an optional #weight=N; a member that
        fails is skipped (for 30 s, doubling to 5 min while it keeps failing) and the
        request goes to the next. E.g. --route '*.corp.example=http://10.1.2.3:3128'
        --route '*=rr:http://p1:3128,http://p2:3128'. Hosts no route matches go
        directly (or to --upstream).""",
    ),
    _row(
        "fleet-self",
        "str",
        values.optional(values.parent),
        None,
        """This proxy's own URL in the member lists of --route PATTERN=hash:URL,URL,...
        (a cache fleet), when its listening addresses don't show which member it is.""",
    ),
    _row(
        "upstream",
        "str",
        values.optional(values.upstream),
        None,
        """Send everything through a parent proxy: http://[user:pass@]host:port,
        https://... (TLS to the parent) or socks5://[user:pass@]host:port (names resolved
        by the parent); or through a pool of them, STRATEGY:MEMBER,MEMBER,... (see
        --route). The same as a last --route '*=URL'.""",
    ),
    _row(
        "pac",
        "str",
        values.optional(values.readable_file),
        None,
        """Serve this proxy auto-configuration (PAC) file at /proxy.pac and /wpad.dat
        (re-read on SIGHUP). Without it aproxy serves one it generates: plain host names,
        loopback and --pac-direct hosts DIRECT, everything else through this proxy.""",
    ),
    _row(
        "pac-direct",
        "list",
        values.each(check_host_pattern),
        (),
        """A destination the generated PAC file sends DIRECT (repeatable; the pattern
        forms of --deny-host).""",
    ),
    _row(
        "pac-proxy",
        "str",
        values.optional(values.authority),
        None,
        """HOST:PORT the generated PAC file names as the proxy. Default: the Host the
        client fetched the file with (on the metrics port: the first --port).""",
    ),
    _row(
        "parent-check",
        "float",
        values.optional(values.seconds),
        None,
        """Every this many seconds, check each member of the parent pools (see --route)
        with a TCP connection, so a member that was down comes back without costing a
        client request, and one that went down is skipped before a client meets it.
        Off by default.""",
    ),
    _row(
        "parent-check-target",
        "str",
        values.optional(values.authority),
        None,
        """HOST:PORT: with --parent-check, check each member with a CONNECT (or SOCKS5
        CONNECT) to this destination rather than a bare TCP connection, so a parent that
        accepts connections but can't reach anything counts as down.""",
    ),
    _row(
        "ca-file",
        "str",
        values.optional(values.text),
        None,
        """A PEM file of certificate authorities to trust for https:// origins and
        https:// parents, in addition to the system's trust store.""",
    ),
    _row(
        "insecure-host",
        "list",
        values.each(values.insecure_host),
        (),
        """Do not verify the TLS certificate of this origin or parent host (repeatable;
        there is no switch for all hosts). A warning is logged at start.""",
    ),
    _row(
        "intercept",
        "list",
        values.each(check_host_pattern),
        (),
        """Intercept HTTPS to hosts matching this pattern (repeatable; the pattern forms
        of --deny-host, or * for every host): CONNECT tunnels to them are decrypted with
        certificates signed by aproxy's own CA (see --ca-dir), so their requests are
        logged, filtered and cached like plain ones. Clients must trust that CA. Off
        by default.""",
    ),
    _row(
        "no-intercept",
        "list",
        values.each(check_host_pattern),
        (),
        """Never intercept hosts matching this pattern (repeatable), even when --intercept
        matches them: for clients that pin certificates.""",
    ),
    _row(
        "ca-dir",
        "str",
        values.optional(values.text),
        None,
        """Where the interception CA is kept: ca.pem (the certificate clients must
        trust) and ca-key.pem (its key, mode 0600). Made at the first start with
        --intercept. Default: ~/.local/share/aproxy. A new CA needs a restart.""",
    ),
    _row(
        "addon",
        "list",
        values.each(values.addon_spec),
        (),
        """Load an addon (repeatable, run in this order): MODULE:NAME or
        path/to/file.py:NAME, where NAME is a class or function (called with no
        arguments to make the addon) or the addon object itself. Its hooks see every
        request and response and may edit, refuse, answer or rewrite bodies as they
        stream (see the README, "Addons"). Loaded once per process (each worker has its
        own); SIGHUP keeps them, a changed list needs a restart.""",
    ),
    _row(
        "addon-timeout",
        "float",
        values.seconds,
        10.0,
        """Seconds a request waits for an addon hook that answers later (a Deferred or
        an async def) before 504; the hook is then cancelled.""",
    ),
    _row(
        "socks-port",
        "list",
        values.socks_listeners,
        (),
        """Also serve SOCKS5 (RFC 1928; with --auth, username/password of RFC 1929) here
        (repeatable; the forms of --port: a bare port number means that port on
        127.0.0.1). CONNECT follows the rules, routes and --connect-ports of HTTP
        CONNECT; UDP ASSOCIATE relays datagrams directly, to --udp-ports; BIND is
        refused. Off by default.""",
    ),
    _row(
        "udp-ports",
        "ports",
        values.port_ranges,
        DEFAULT_UDP_PORTS,
        """Ports SOCKS5 UDP ASSOCIATE may send datagrams to: comma-separated ports and
        ranges, or * for any (by default DNS, NTP and QUIC).""",
    ),
)

_BY_NAME = {row.name: row for row in OPTIONS}


def option(name: str) -> Option:
    """The row of the long option C{name}."""
    return _BY_NAME[name]


def config_options() -> tuple[Option, ...]:
    """The rows that are L{aproxy.config.ProxyConfig} fields, in field order."""
    return tuple(row for row in OPTIONS if row.field is not None)


def toml_kinds() -> dict[str, str]:
    """Each config file key (a long option name) and the kind of value it takes."""
    return {row.name: row.kind for row in OPTIONS if row.kind is not None}
