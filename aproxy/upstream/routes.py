"""
Parent proxies and routes: C{--upstream URL} and C{--route PATTERN=TARGET}.

A route sends the requests for matching destination hosts either directly or through a
parent proxy: an HTTP proxy (C{http://}, or C{https://} with TLS to the parent) or a SOCKS5
proxy (C{socks5://}, RFC 1928, with RFC 1929 username/password). The first matching route
wins; a destination no route matches goes directly.

A route to C{hash:URL,URL,...} makes a cache fleet (L{Fleet}): each URL has one owner
among the members, by rendezvous (highest random weight) hashing, so every member sends
a given URL to the same one and the fleet caches it once.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from aproxy.access.policy import HostPatterns, parse_host_pattern

__all__ = [
    "FLEET_DOWN",
    "FLEET_FIELD",
    "FLEET_LOOP",
    "RETRY",
    "RETRY_MAX",
    "STRATEGIES",
    "Fleet",
    "Member",
    "Parent",
    "Pool",
    "Router",
    "fleet_forwarded",
    "fleet_key",
    "parse_parent",
    "parse_pool",
    "parse_route",
    "without_credentials",
]

FLEET_DOWN = 30.0
"""Seconds a fleet member that refused or timed out is skipped (only its share moves)."""

FLEET_LOOP = b"aproxy-fleet"
"""The C{CDN-Loop} (RFC 8586) token a member adds to requests it sends another member: the
receiver serves them itself, so members that disagree about who is down can't loop."""

FLEET_FIELD = b"CDN-Loop: " + FLEET_LOOP + b"\r\n"
"""The field line a member adds to what it sends the owner of a URL."""

_DEFAULT_PARENT_PORTS = {"http": 80, "https": 443, "socks5": 1080}
_URL_PORTS = {b"http": 80, b"https": 443}


def fleet_key(scheme: bytes, host: str, port: int, path: bytes) -> bytes:
    """
    What a fleet hashes to find a URL's owner: the URL as the cache keys it (scheme and
    host lowercased, the default port left out, path and query as sent), so every member
    sends one URL to one owner, whatever spelling of the authority its clients used.
    """
    authority = host.lower().encode()
    if _URL_PORTS.get(scheme) != port:
        authority += b":%d" % port
    return scheme + b"://" + authority + path


def fleet_forwarded(cdn_loop: list[bytes]) -> bool:
    """
    Whether C{cdn_loop} (the request's C{CDN-Loop} field values) says another member sent
    it here: then this proxy serves it itself.
    """
    for line in cdn_loop:
        for member in line.split(b","):
            if member.split(b";", 1)[0].strip().lower() == FLEET_LOOP:
                return True
    return False


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


class Fleet:
    """
    The members of a cache fleet and who owns each URL (see the module docstring).

    @ivar members: The members' URLs, this proxy's own among them (or not).
    @ivar own: The index of this proxy in C{members}, or L{None}.
    """

    def __init__(self, members: tuple[Parent, ...]) -> None:
        self.members = members
        self.own: int | None = None
        self._seeds = [m.name.encode() for m in members]
        self._down: dict[int, float] = {}

    @property
    def name(self) -> str:
        """The fleet as a route names it: C{hash:} and the members (without credentials)."""
        return "hash:" + ",".join(m.name for m in self.members)

    def owner(self, url: bytes, now: float) -> Parent | None:
        """
        The member that owns C{url}: L{None} when it is this proxy (serve it here), or
        when every other member able to is down.
        """
        best = -1
        best_score = b""
        down = self._down
        for index, seed in enumerate(self._seeds):
            if index != self.own and down.get(index, 0.0) > now:
                continue
            score = hashlib.blake2b(seed + b"\x00" + url, digest_size=8).digest()
            if score > best_score:
                best, best_score = index, score
        if best < 0 or best == self.own:
            return None
        return self.members[best]

    def failed(self, member: Parent, now: float) -> None:
        """C{member} refused or timed out: skip it for L{FLEET_DOWN} seconds."""
        for index, candidate in enumerate(self.members):
            if candidate == member and index != self.own:
                self._down[index] = now + FLEET_DOWN

    def place(self, own: Iterable[tuple[str, int]]) -> None:
        """Find this proxy among the members by its (host, port) addresses."""
        wanted = {(host.lower().strip("[]"), port) for host, port in own}
        for index, member in enumerate(self.members):
            if (member.host, member.port) in wanted:
                self.own = index
                return


def _parse_fleet(text: str) -> Fleet:
    """The members of a C{hash:URL,URL,...} route target."""
    members = tuple(parse_parent(url) for url in text.split(",") if url.strip())
    if len(members) < 2:
        raise ValueError("a hash: route needs at least two member URLs")
    for member in members:
        if member.scheme not in ("http", "https"):
            raise ValueError(f"fleet member {member.name}: must be an http:// or https:// proxy")
    if len({(m.host, m.port) for m in members}) != len(members):
        raise ValueError("a hash: route names a member twice")
    return Fleet(members)


def parse_route(text: str) -> tuple[str, Parent | Fleet | Pool | None]:
    """
    Parse a C{--route PATTERN=TARGET} value: PATTERN is a host name, C{*.suffix} (its
    subdomains), C{.suffix} (the domain and its subdomains) or C{*} (anything); TARGET a
    parent proxy URL, C{direct}, C{hash:URL,URL,...} (a cache fleet) or
    C{STRATEGY:MEMBER,...} (a parent pool, see L{Pool}).

    @return: The pattern and the parent (L{None} for C{direct}), fleet or pool.
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
    if target.lower().startswith("hash:"):
        return pattern, _parse_fleet(target[5:])
    strategy, colon, members = target.partition(":")
    if colon and strategy.lower() in STRATEGIES:
        return pattern, parse_pool(strategy.lower(), members)
    return pattern, parse_parent(target)


class Router:
    """
    Picks the route for a destination host: the first pattern that matches, else direct.

    @param routes: C{PATTERN=TARGET} strings as for L{parse_route}, in order.
    @param own: This proxy's (host, port) addresses, to find itself in a fleet.
    @ivar fleets: The fleets the routes name.
    @ivar pools: The parent pools the routes name.
    @ivar fleet_hosts: The hosts of the other members of every fleet.
    """

    def __init__(self, routes: tuple[str, ...] = (), own: Iterable[tuple[str, int]] = ()) -> None:
        self._rules: list[tuple[HostPatterns, Parent | Fleet | Pool | None]] = []
        own = tuple(own)
        for text in routes:
            pattern, parent = parse_route(text)
            if isinstance(parent, Fleet):
                parent.place(own)
            self._rules.append((HostPatterns((pattern,)), parent))
        self.parents: tuple[Parent, ...] = tuple(
            {p: None for _, p in self._rules if isinstance(p, Parent)}
        )
        self.fleets = tuple(p for _, p in self._rules if isinstance(p, Fleet))
        self.pools = tuple(p for _, p in self._rules if isinstance(p, Pool))
        self.fleet_hosts = frozenset(
            m.host for f in self.fleets for i, m in enumerate(f.members) if i != f.own
        )
        self._chosen: dict[str, Pool] = {}
        self._matched: dict[str, Parent | Fleet | Pool | None] = {}

    def __bool__(self) -> bool:
        """Whether any route is configured (if not, everything goes directly)."""
        return bool(self._rules)

    def parent_for(self, host: str) -> Parent | None:
        """
        The parent for C{host} (as the client wrote it), or L{None} for direct (and for a
        fleet's hosts, whose owner is chosen per URL: see L{fleet_for}).
        """
        found = self._match(host)
        return found if isinstance(found, Parent) else None

    def fleet_for(self, host: str) -> Fleet | None:
        """The fleet whose route C{host} takes, or L{None}."""
        found = self._match(host) if self.fleets else None
        return found if isinstance(found, Fleet) else None

    def keep_health(self, old: Router) -> None:
        """
        Take over the health of the pool members C{old} (the router before a reload)
        also has, by URL: a member that was down stays down; a new one starts up.
        """
        known = {m.name: m for pool in old.pools for m in pool.members}
        for pool in self.pools:
            for member in pool.members:
                before = known.get(member.name)
                if before is not None:
                    member.down_until = before.down_until
                    member.backoff = before.backoff
                    member.last_error = before.last_error

    def exit_named(self, text: str) -> Parent | Pool | None:
        """
        The exit that code chose for one request by name (an addon's
        C{exchange.parent}): C{direct} (L{None}), a parent URL, or a pool as a route names
        it (C{STRATEGY:MEMBER,...}). A pool named like one of the routes' is that pool,
        health and all; another is made once and kept (up to L{_CHOSEN_POOLS}), so its
        members' health carries from request to request.

        @raise ValueError: If C{text} is none of those.
        """
        if text.lower() == "direct":
            return None
        strategy, colon, members = text.partition(":")
        if not (colon and strategy.lower() in STRATEGIES):
            return parse_parent(text)
        pool = self._chosen.get(text)
        if pool is None:
            pool = parse_pool(strategy.lower(), members)
            pool = next((p for p in self.pools if p.name == pool.name), pool)
            if len(self._chosen) >= _CHOSEN_POOLS:
                self._chosen.clear()
            self._chosen[text] = pool
        return pool

    def pool_for(self, host: str) -> Pool | None:
        """The parent pool whose route C{host} takes, or L{None}."""
        found = self._match(host) if self.pools else None
        return found if isinstance(found, Pool) else None

    def _match(self, host: str) -> Parent | Fleet | Pool | None:
        matched = self._matched
        if host in matched:
            return matched[host]
        found = None
        for patterns, parent in self._rules:
            if patterns.matches(host):
                found = parent
                break
        if len(matched) >= _HOSTS_KEPT:
            matched.clear()
        matched[host] = found
        return found


# -- parent pools --------------------------------------------------------------
# Parent pools: a route to several parents (or C{direct}) with a strategy that picks one
# per request, and failover with health: C{--route PATTERN=STRATEGY:MEMBER,MEMBER,...}.
#
# Strategies: C{rr} (smooth weighted round robin), C{least} (fewest requests in flight for
# its weight), C{random} (weighted), C{client} (by client address or user: one client keeps
# one member while it is up; weighted rendezvous hashing, so a member's loss moves only its
# clients). A member is a parent URL as for C{--upstream}, or C{direct}, and may carry a
# weight: C{http://p:3128#weight=3}.
#
# A member that refuses, times out or fails its handshake is marked down and skipped for
# L{RETRY} seconds, doubling while it keeps failing, up to L{RETRY_MAX}, and back to L{RETRY}
# after a success. The state is per process (per worker).

RETRY = 30.0
"""Seconds a member that failed is skipped at first."""

_HOSTS_KEPT = 4096
"""Hosts whose matching route a router remembers (forgotten all at once past it)."""

_CLIENTS_KEPT = 4096
"""Clients whose member a C{client} pool remembers (forgotten all at once past it)."""

_CHOSEN_POOLS = 64
"""Pools chosen by code (see L{Router.exit_named}) a router keeps, each with its health."""

RETRY_MAX = 300.0
"""The longest a member that keeps failing is skipped."""

STRATEGIES = ("rr", "least", "random", "client")
"""The strategies of a parent pool (C{hash:} is the cache fleet's, see routes.Fleet)."""


@dataclass
class Member:
    """
    One member of a pool and its health.

    @ivar parent: The parent proxy, or L{None} for C{direct}.
    @ivar weight: Its share (1 by default).
    @ivar down_until: Until when it is skipped (0: up).
    @ivar backoff: How long the next failure makes it skipped.
    @ivar in_flight: Requests sent through it and not finished (for C{least}).
    @ivar last_error: Why it last failed, for the status page.
    """

    parent: Parent | None
    weight: int = 1
    down_until: float = 0.0
    backoff: float = RETRY
    in_flight: int = 0
    current: float = 0.0  # (smooth round robin's running score)
    last_error: str = ""

    @property
    def name(self) -> str:
        """C{direct}, or the parent's URL without credentials."""
        return "direct" if self.parent is None else self.parent.name

    def up(self, now: float) -> bool:
        """Whether it may be picked at C{now}."""
        return self.down_until <= now


class Pool:
    """
    The members of one pooled route and the strategy that picks among them.

    @ivar strategy: One of L{STRATEGIES}.
    @ivar members: The members, in the order given.
    """

    def __init__(self, strategy: str, members: list[Member]) -> None:
        self.strategy = strategy
        self.members = members
        self._random = random.Random()
        self._chosen: dict[tuple[str, tuple[int, ...]], int] = {}

    @property
    def name(self) -> str:
        """The pool as a route names it."""
        return (
            self.strategy
            + ":"
            + ",".join(
                m.name + (f"#weight={m.weight}" if m.weight != 1 else "") for m in self.members
            )
        )

    def pick(self, now: float, client: str, tried: set[int]) -> int | None:
        """
        The member for a request, by the strategy, among those up and not in C{tried};
        when every untried one is down, the one whose retry comes first (it may be back).

        @param client: The client's user or address (for C{client}).
        @return: The member's index, or L{None} when every member was tried.
        """
        # (Plain loops: this runs for every request through a pool.)
        members = self.members
        up = []
        soonest = None
        for i, member in enumerate(members):
            if i in tried:
                continue
            if member.down_until <= now:
                up.append(i)
            elif soonest is None or member.down_until < members[soonest].down_until:
                soonest = i
        if not up:
            return soonest
        if len(up) == 1:
            return up[0]
        strategy = self.strategy
        if strategy == "rr":
            total = 0
            best = up[0]
            top = None
            for i in up:
                member = members[i]
                total += member.weight
                member.current += member.weight
                if top is None or member.current > top:
                    best, top = i, member.current
            members[best].current -= total
            return best
        if strategy == "least":
            return min(up, key=lambda i: (members[i].in_flight / members[i].weight, i))
        if strategy == "random":
            weights = [members[i].weight for i in up]
            return self._random.choices(up, weights)[0]
        # client: weighted rendezvous hashing of the client over the members up (the
        # choice remembered per client and set of members up: hashing is the cost).
        remembered = (client, tuple(up))
        chosen = self._chosen.get(remembered)
        if chosen is not None:
            return chosen
        key = b"\x00" + client.encode("utf-8", "replace")

        def score(i: int) -> float:
            digest = hashlib.blake2b(members[i].name.encode() + key, digest_size=8).digest()
            unit = (int.from_bytes(digest, "big") + 1) / 2.0**64
            return -members[i].weight / math.log(unit)

        chosen = max(up, key=score)
        if len(self._chosen) >= _CLIENTS_KEPT:
            self._chosen.clear()
        self._chosen[remembered] = chosen
        return chosen

    def failed(self, index: int, now: float, why: str) -> None:
        """Member C{index} failed: skip it for its backoff, which doubles (to a limit)."""
        member = self.members[index]
        member.down_until = now + member.backoff
        member.backoff = min(member.backoff * 2, RETRY_MAX)
        member.last_error = why

    def succeeded(self, index: int) -> None:
        """Member C{index} served a connection: it is up, its backoff back to the start."""
        member = self.members[index]
        member.down_until = 0.0
        member.backoff = RETRY


def parse_pool(strategy: str, text: str) -> Pool:
    """
    The pool of a C{STRATEGY:MEMBER,MEMBER,...} route target.

    @raise ValueError: For an unknown strategy, fewer than two members, a bad member or
        weight, or a member named twice.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pool strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    members = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url, _, option = item.partition("#")
        weight = 1
        if option:
            key, _, value = option.partition("=")
            if key != "weight" or not value.isdigit() or not 0 < int(value) <= 1000:
                raise ValueError(f"pool member {url}: a weight is #weight=N, N from 1 to 1000")
            weight = int(value)
        parent = None if url.lower() == "direct" else parse_parent(url)
        members.append(Member(parent, weight))
    if len(members) < 2:
        raise ValueError(f"a {strategy}: pool needs at least two members")
    if len({m.name for m in members}) != len(members):
        raise ValueError(f"a {strategy}: pool names a member twice")
    return Pool(strategy, members)
