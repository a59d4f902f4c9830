"""
L{CacheStage}: the HTTP cache as a stage of the request pipeline (RFC 9111, a shared
cache). Before any upstream connection is made it answers what it holds fresh (or what a
request's C{max-stale} accepts), answers a client's matching conditional with a 304, a
single range with a 206 and a C{HEAD} from a stored C{GET}; it has stale objects
revalidated with the origin (and turns the origin's 304 into the stored response);
collapses concurrent misses for one URL into one fetch that the others follow; stores
what may be stored as it streams past; invalidates on unsafe methods; answers C{PURGE}.
Every response it sees gets a C{Cache-Status} field (RFC 9211), and every request a
result in Squid's words for the access log (C{TCP_HIT}, C{TCP_MISS}, ...).
"""

from __future__ import annotations

import ipaddress
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from aproxy.cache import preconditions, rules
from aproxy.cache.background import (
    SERVER_ERRORS,
    Revalidations,
    client_limits,
    client_refresh,
)
from aproxy.cache.disk import DiskStore
from aproxy.cache.fill import Fill, StoreFilter
from aproxy.cache.heap import HeapTrimmer
from aproxy.cache.hits import Found, Prepared, answer_from, follower_answer, stale_answer
from aproxy.cache.store import MemoryTier, Meta
from aproxy.cache.sync import SYNC_INTERVAL, RemovalSync
from aproxy.client.stages import Answer, IBodyFilter, IRequestStage, StageRequest
from aproxy.config import ProxyConfig
from aproxy.http.head import RequestHead, ResponseHead

__all__ = ["SYNC_INTERVAL", "CacheStage", "open_cache"]

# Objects at most this large found on disk are also kept in memory (when there is one).
_PROMOTE = 256 * 1024
_CONDITIONALS = (b"if-none-match", b"if-modified-since", b"if-range", b"range")
_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
_PURGE_STATUS = (b"Cache-Status", rules.cache_status(detail="purge"))
# What the proxy's own error answer (an origin that can't be reached: 502, 504) says in
# Cache-Status, by why the request went forward.
_ERROR_FIELDS = {
    fwd: b"Cache-Status: " + rules.cache_status(fwd=fwd) + b"\r\n"
    for fwd in ("method", "bypass", "request", "uri-miss", "vary-miss", "stale")
}
_NOT_CACHED = Answer(
    504,
    b"Gateway Timeout",
    (_TEXT, (b"Cache-Status", rules.cache_status(fwd="miss", detail="only-if-cached"))),
    b"only-if-cached: no stored response fits this request\n",
)
_PURGE_DENIED = Answer(
    403,
    b"Forbidden",
    (_TEXT, _PURGE_STATUS),
    b"PURGE is not allowed from your address (see --cache-purge-from)\n",
)
_UNEVALUATED = frozenset({b"if-match", b"if-unmodified-since"})
MAX_STALE_ON_ERROR = 7 * 24 * 3600
"""Seconds of staleness past which a stored object is not served when its origin can't be
reached (Squid's C{max_stale} default: a week)."""
_SWR = b"; detail=stale-while-revalidate"

# A request field line that can change what the cache does with it: a directive, a
# precondition, a range or a protocol switch.
_DIRECTED = re.compile(rb"(?:^|\n)(?:cache-control|pragma|if-[a-z-]*|range|upgrade):", re.I)


@dataclass
class _State:
    """What the cache remembers of one request (in C{StageRequest.state})."""

    key: bytes
    kind: str  # "lead" (a miss that may be stored), "validate", "pass", "method"
    fwd: str = "uri-miss"
    fill: Fill | None = None
    found: Found | None = None
    sent_at: float = 0.0
    client_refresh: bool = False


def _note(stage: object, request: StageRequest, state: _State) -> None:
    """Remember C{state} of C{request} for C{stage}, and what an error answer to it says."""
    request.state[stage] = state
    request.error_fields = _ERROR_FIELDS[state.fwd]


def _not_cached(request: StageRequest) -> Answer:
    """C{only-if-cached} and nothing fits: 504 (RFC 9111 section 5.2.1.7)."""
    request.notes["cache"] = "TCP_MISS"
    return _NOT_CACHED


@implementer(IRequestStage)
class CacheStage:
    """
    The cache (see the module docstring). Make it with L{open_cache}.

    @ivar memory: The memory tier, or L{None}.
    @ivar disk: The disk store, or L{None}.
    @ivar results: How many requests ended with each result (C{"hit"}, C{"miss"}, ...).
    @ivar collapsed: Requests that followed another's fetch instead of their own.
    @ivar saved: Body bytes answered from the cache (not fetched).
    """

    name = "cache"
    log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        clock: IReactorTime,
        memory: MemoryTier | None,
        disk: DiskStore | None,
    ) -> None:
        self.clock = clock
        self.memory = memory
        self.disk = disk
        # (An object larger than the whole disk store could only be thrown away.)
        self.max_object = (
            min(config.cache_max_object, config.cache_size)
            if disk is not None
            else config.cache_max_object
        )
        # Without a disk, an object is held in memory while it arrives: bounded by what
        # the memory tier keeps of one object.
        self.limit = memory.max_object if disk is None and memory is not None else self.max_object
        self.purge_from = [ipaddress.ip_network(n, strict=False) for n in config.cache_purge_from]
        self.fills: dict[bytes, Fill] = {}
        self.revalidations = Revalidations()
        self._keys: dict[object, bytes] = {}
        self.trimmer = HeapTrimmer(clock)
        self._sync = (
            RemovalSync(memory, disk, self.trimmer.freed)
            if disk is not None and memory is not None
            else None
        )
        self.results: Counter[str] = Counter()
        self.collapsed = 0
        self.saved = 0

    # -- stage A: before any upstream connection --------------------------------------

    def answer(self, request: StageRequest) -> Any:
        """Answer from the cache, have the request revalidate, or let it go (see module)."""
        head = request.head
        method = head.method
        target = request.target
        key = self._keys.get(target)
        if key is None:
            # (The factory hands out one Target per target text it saw lately: their keys
            # are remembered by identity, a few hundred at most.)
            if len(self._keys) >= 512:
                self._keys.clear()
            key = rules.cache_key(target.scheme, target.host.encode(), target.port, target.path)
            self._keys[target] = key
        if method == b"PURGE":
            return self._purge(request, key)
        if request.peer:
            return None  # the fleet member that owns the URL caches it
        if method not in (b"GET", b"HEAD") or target.scheme not in (b"http", b"https"):
            _note(self, request, _State(key, "method"))
            return None
        # Most requests carry no directive, precondition or range: then their fields need
        # no parsing at all (unless a stored response varies on them).
        plain = _DIRECTED.search(head.block) is None
        ranges: list[bytes] = []
        if plain:
            no_store = only_if_cached = False
        else:
            fields = head.fields
            if head.values(b"upgrade") or _has_any(fields, _UNEVALUATED):
                # A protocol switch, or preconditions the cache does not evaluate: the
                # origin answers (RFC 9110 section 13.2.1 leaves them to it).
                _note(self, request, _State(key, "pass", fwd="bypass"))
                return None
            # (Range is not among the fields the parser notes: head.values can't see it.)
            ranges = rules.field_lines(fields, b"range")
            if len(ranges) > 1 or (ranges and b"," in ranges[0]):
                # Several ranges: the origin answers (a multipart/byteranges response is
                # its to make; the cache answers single ranges only).
                _note(self, request, _State(key, "pass", fwd="request"))
                return None
            no_store, only_if_cached = rules.request_cc_flags(fields)
        now = self.clock.seconds()
        sync = self._sync
        if sync is not None and now >= sync.due:
            sync.run(now)
        try:
            found, any_variant = self._find(key, head)
        except (OSError, sqlite3.Error) as e:
            # A store that can't be read (a locked index, a disk error): a miss, not a 500.
            self.log.warn("cache: lookup of {key} failed: {why}", key=key, why=e)
            found, any_variant = None, False
        if found is None:
            if only_if_cached:
                return _not_cached(request)
            fill = self.fills.get(key)
            if fill is not None and not fill.over and not ranges:
                return self._follow(request, key, fill)
            state = _State(key, "pass", fwd="vary-miss" if any_variant else "uri-miss")
            if method == b"GET" and not no_store and not ranges:
                state.kind = "lead"
                state.fill = self.fills[key] = Fill(key, self._fill_over)
            state.sent_at = now
            _note(self, request, state)
            return None
        meta = found.meta
        fresh = found.prepared.freshness
        age = fresh.age(now)
        lifetime = fresh.lifetime
        if plain:
            # What choose() decides for a request without directives.
            fresh_enough = not fresh.no_cache and age < lifetime
        else:
            fresh_enough = rules.choose(head.fields, meta.fields, lifetime, age) != rules.VALIDATE
        if fresh_enough:
            return self._hit(request, found, age, lifetime, None, plain)
        if fresh.swr and self.revalidations.serve_stale(  # (per Vary variant)
            request, key + b"\n" + meta.vary, fresh, age, plain
        ):
            return self._hit(request, found, age, lifetime, None, plain, _SWR)
        if only_if_cached:
            found.close()
            return _not_cached(request)
        state = _State(key, "validate", fwd="stale", found=found, sent_at=now)
        state.client_refresh = not plain and client_refresh(head.fields)
        _note(self, request, state)
        # RFC 9111 section 4.2.4: a response that may not be served stale and can't be
        # revalidated is an error, which SHOULD be a 504.
        request.gateway_timeout = fresh.no_stale
        # 4.2.4 lets a cache serve stale when it can't reach the origin, unless forbidden.
        no_stale = fresh.no_stale or fresh.no_cache or (not plain and client_limits(head.fields))
        if not no_stale and age - lifetime < MAX_STALE_ON_ERROR:
            request.fallback = partial(self._stale, request, state)
        validators = preconditions.validation_fields(meta.fields)
        if validators:
            request.upstream_fields = validators
            request.upstream_drop = _CONDITIONALS
        else:
            # Nothing to validate with: fetched whole again, and stored anew.
            state.kind = "lead"
            state.fill = Fill(key, _ignore)
        return None

    def _find(self, key: bytes, head: RequestHead) -> tuple[Found | None, bool]:
        """
        The stored variant of C{key} that the request's fields select (memory first),
        with its body at hand; and whether any variant of C{key} is stored at all.
        """
        seen = False
        memory = self.memory
        if memory is not None:
            for meta in memory.variants(key):
                seen = True
                if not meta.vary_names or rules.vary_key(meta.vary_names, head.fields) == meta.vary:
                    entry = memory.entry(key, meta.vary)
                    if entry is not None:
                        prepared = entry.prepared
                        if prepared is None:
                            prepared = entry.prepared = Prepared(entry.meta)
                        return Found(entry.meta, prepared, True, body=entry.body), True
        disk = self.disk
        if disk is not None:
            for meta in disk.variants(key):
                if meta.vary_names and rules.vary_key(meta.vary_names, head.fields) != meta.vary:
                    seen = True
                    continue
                file = disk.open(meta)
                if file is None:
                    continue  # (its file is missing or short: gone, not another variant)
                if memory is not None and meta.length <= _PROMOTE:
                    body = file.read()
                    file.close()
                    if len(body) == meta.length:
                        memory.put(meta, body)
                        return Found(meta, Prepared(meta), False, body=body), True
                    continue
                return Found(meta, Prepared(meta), False, file=file), True
        return None, seen

    def _hit(
        self,
        request: StageRequest,
        found: Found,
        age: float,
        lifetime: float,
        fwd_status: int | None,
        plain: bool = False,
        detail: bytes = b"",
    ) -> Answer:
        """Answer from C{found} (see L{answer_from}), and count it."""
        value = b"aproxy; hit; ttl=%d" % math.floor(lifetime - age) + detail if detail else None
        answer, result, saved = answer_from(
            found, request.head, age, lifetime, fwd_status, plain, value
        )
        request.notes["cache"] = result
        self.saved += saved
        return answer

    def _stale(
        self, request: StageRequest, state: _State, error: int | None = None
    ) -> Answer | None:
        """The origin failed (unreachable, or C{error} under stale-if-error): the object."""
        found = state.found
        stale = stale_answer(found, request.head, self.clock.seconds(), error) if found else None
        if stale is None:
            return None
        state.found, state.kind = None, "pass"  # (nothing to store: the fetch failed)
        request.notes["cache"] = "TCP_REFRESH_FAIL_OLD"
        self.saved += stale[1]
        return stale[0]

    def _follow(self, request: StageRequest, key: bytes, fill: Fill) -> Any:
        """Collapse onto C{fill}: follow it once its head shows it fits, else go upstream."""
        fields = request.head.fields
        method = request.head.method
        wants_range = bool(rules.field_lines(fields, b"range"))

        def fits(fill: Fill) -> Answer | None:
            meta = fill.meta
            if (
                meta is None
                or wants_range
                or (method == b"HEAD" and meta.length < 0)  # (no length to describe yet)
                or rules.vary_key(meta.vary_names, fields) != meta.vary
            ):
                _note(self, request, _State(key, "pass"))
                return None
            self.collapsed += 1
            request.notes["cache"] = "TCP_CF_HIT"
            return follower_answer(fill, method, self.clock.seconds())

        if fill.meta is not None:
            return fits(fill)

        def upstream(answer: Answer | None) -> Answer | None:
            # A fill that gave up (not storable, say) sends its followers upstream.
            if answer is None:
                request.state.setdefault(self, _State(key, "pass"))
            return answer

        return fill.wait(fits).addCallback(upstream)

    def _purge(self, request: StageRequest, key: bytes) -> Answer | None:
        """C{PURGE}: remove every stored variant of the URL, for the networks allowed."""
        if not _in_networks(request.client, self.purge_from):
            request.notes["cache"] = "TCP_DENIED"
            return _PURGE_DENIED
        removed = self._remove(key)
        request.notes["cache"] = "TCP_MISS"
        if request.peer:
            # Also at the fleet member that owns the URL (it must allow this proxy's
            # address in its own --cache-purge-from).
            return None
        if removed:
            return Answer(200, b"OK", [_TEXT, _PURGE_STATUS], b"purged %d object(s)\n" % removed)
        return Answer(404, b"Not Found", [_TEXT, _PURGE_STATUS], b"not in the cache\n")

    def _remove(self, key: bytes) -> int:
        removed = 0
        if self.memory is not None:
            removed += self.memory.remove(key)
        if self.disk is not None:
            try:
                removed = max(removed, self.disk.remove(key))
            except sqlite3.Error as e:
                self.log.warn("cache: could not remove {key} from disk: {why}", key=key, why=e)
        return removed

    # -- when the origin's response head arrives --------------------------------------

    def replace_response(self, request: StageRequest, head: ResponseHead) -> Answer | None:
        """
        A 304 to the cache's own revalidation: refresh the stored object, answer from it.
        A server error instead: answer with the stale object if C{stale-if-error} allows.
        """
        state: _State | None = request.state.get(self)
        if state is None or state.found is None:
            return None
        if head.status in SERVER_ERRORS:
            return self._stale(request, state, head.status)
        if state.kind != "validate" or head.status != 304:
            return None
        found = state.found
        assert found is not None
        state.found = None
        now = self.clock.seconds()
        old = found.meta
        fresh = head.fields
        if not rules.field_lines(fresh, b"date"):
            # RFC 9110 section 6.6.1: the time it was received stands in for its Date.
            fresh = [*fresh, (b"Date", rules.http_date(now))]
        fields = tuple(rules.updated_fields(old.fields, fresh))
        meta = old.with_fields(fields, state.sent_at, now)
        if self.memory is not None and found.memory:
            self.memory.update(meta)
        if self.disk is not None and not found.memory:
            self.disk.update(meta)
        found.meta = meta
        found.prepared = prepared = Prepared(meta)
        fresh_now = prepared.freshness
        return self._hit(request, found, fresh_now.age(now), fresh_now.lifetime, 304)

    def response_filter(self, request: StageRequest, head: ResponseHead) -> IBodyFilter | None:
        """
        Invalidate after an unsafe method, say what happened in C{Cache-Status}, and store
        the response when it may be stored.
        """
        state: _State | None = request.state.get(self)
        if state is None:
            return None
        method = request.head.method
        status = head.status
        if state.kind == "method":
            if rules.is_unsafe(method):
                for key in rules.invalidation_keys(method, status, state.key, head.fields):
                    self._remove(key)
            request.response_fields = b"Cache-Status: " + rules.cache_status(fwd="method") + b"\r\n"
            request.notes["cache"] = "TCP_MISS"
            return None
        found, state.found = state.found, None
        if found is not None:
            found.close()
        refresh = state.kind == "validate" or state.client_refresh
        request.notes["cache"] = (
            "TCP_CLIENT_REFRESH_MISS"
            if state.client_refresh
            else "TCP_REFRESH_MODIFIED"
            if refresh
            else "TCP_MISS"
        )
        fill = state.fill
        why = None
        if state.kind == "validate" and 200 <= status < 600 and status != 304:
            fill = state.fill = Fill(state.key, _ignore)
        if fill is None:
            why = rules.storable(method, status, request.head.fields, head.fields) or "not-stored"
        else:
            why = rules.storable(method, status, request.head.fields, head.fields)
            if why is None and (head.content_length or 0) > self.limit:
                why = "too-large"
            if why is None and head.status == 206:
                why = "partial"
            if why is None and _useless(status, head.fields, state.sent_at, self.clock.seconds()):
                why = "stale-on-arrival"
        fwd = state.fwd
        if why is not None or fill is None:
            if fill is not None:
                fill.give_up()
            value = rules.cache_status(fwd=fwd, fwd_status=status, detail=why)
            request.response_fields = b"Cache-Status: " + value + b"\r\n"
            return None
        names = rules.vary_names(head.fields) or ()
        now = self.clock.seconds()
        stored = rules.stored_fields(head.fields)
        if not any(name.lower() == b"date" for name, _ in stored):
            # RFC 9110 section 6.6.1: a cache adds the Date it received the response at.
            date = (b"Date", rules.http_date(now))
            stored.append(date)
            request.response_fields += b"Date: " + date[1] + b"\r\n"
        meta = Meta(
            state.key,
            rules.vary_key(names, request.head.fields),
            names,
            status,
            head.reason,
            tuple(stored),
            state.sent_at,
            now,
            head.content_length if head.content_length is not None else -1,
        )
        writer = self.disk.begin(state.key) if self.disk is not None else None
        memory = self.memory
        keep = memory is not None and (
            writer is None or 0 <= meta.length <= min(_PROMOTE, memory.max_object)
        )
        fill.begin(meta, writer, keep)
        value = rules.cache_status(fwd=fwd, fwd_status=status, stored=True)
        request.response_fields += b"Cache-Status: " + value + b"\r\n"
        return StoreFilter(fill, self.limit, self._commit)

    def _commit(self, fill: Fill) -> None:
        """A fill's body is complete: make it visible in the tiers it was kept for."""
        meta = fill.meta
        assert meta is not None
        if meta.length >= 0 and meta.length != fill.received:
            fill.give_up()
            return
        meta = Meta(
            meta.key,
            meta.vary,
            meta.vary_names,
            meta.status,
            meta.reason,
            meta.fields,
            meta.request_time,
            meta.response_time,
            fill.received,
        )
        fill.meta = meta
        writer = fill.writer
        if writer is not None and not writer.commit(meta):
            self.log.info("cache: {key} was not stored on disk", key=meta.key)
        memory = self.memory
        if fill.memory is not None and memory is not None:
            evictions = memory.evictions
            memory.put(meta, b"".join(fill.memory))
            if memory.evictions != evictions:
                self.trimmer.freed()
        fill.memory = None if writer is not None else fill.memory
        fill.finish()

    def _fill_over(self, fill: Fill) -> None:
        if self.fills.get(fill.key) is fill:
            del self.fills[fill.key]

    def finished(self, request: StageRequest) -> None:
        """The request's exchange ended: a miss that never got its head gives its fill up."""
        state: _State | None = request.state.pop(self, None)
        if state is None:
            return
        request.fallback = None  # (it refers to the request: no cycle left for the collector)
        if state.found is not None:
            state.found.close()
        fill = state.fill
        if fill is not None and fill.meta is None:
            fill.give_up()
        self.results[_RESULTS.get(request.notes.get("cache", ""), "other")] += 1

    def request_filter(self, request: StageRequest) -> IBodyFilter | None:
        """The cache never looks at request bodies."""
        return None

    # -- figures ----------------------------------------------------------------------

    def close(self) -> None:
        """
        At shutdown, after the connections drained: give up the fills still going (their
        objects are incomplete) and close the disk store, writing the remembered uses and
        checkpointing its index (the last process leaves no write-ahead log behind).
        """
        for fill in list(self.fills.values()):
            fill.give_up()
        self.trimmer.stop()
        if self.disk is not None:
            self.disk.close()

    def figures(self) -> dict[str, int]:
        """Bytes and objects per tier, evictions, for the metrics."""
        out = {"memory_bytes": 0, "memory_objects": 0, "disk_bytes": 0, "disk_objects": 0}
        evictions = 0
        if self.memory is not None:
            out["memory_bytes"] = self.memory.bytes
            out["memory_objects"] = self.memory.objects
            evictions += self.memory.evictions
        if self.disk is not None:
            try:
                out["disk_bytes"], out["disk_objects"] = self.disk.stats()
            except sqlite3.Error:
                pass
            evictions += self.disk.evictions
        out["evictions"] = evictions
        return out


_RESULTS = {
    "TCP_HIT": "hit",
    "TCP_MEM_HIT": "hit",
    "TCP_INM_HIT": "hit",
    "TCP_CF_HIT": "collapsed",
    "TCP_REFRESH_UNMODIFIED": "revalidated",
    "TCP_REFRESH_FAIL_OLD": "stale",
    "TCP_REFRESH_MODIFIED": "miss",
    "TCP_CLIENT_REFRESH_MISS": "miss",
    "TCP_MISS": "miss",
    "TCP_DENIED": "denied",
}


def _has_any(fields: Sequence[tuple[bytes, bytes]], names: frozenset[bytes]) -> bool:
    """Whether any of C{fields} has one of the lowercase C{names}."""
    return any(name.lower() in names for name, _ in fields)


def _in_networks(client: str, networks: Sequence[Any]) -> bool:
    """Whether the address C{client} (C{"unix"} for a unix socket: never) is in C{networks}."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _useless(status: int, fields: Sequence[tuple[bytes, bytes]], sent: float, now: float) -> bool:
    """
    Whether a response would be stored for nothing: stale already (C{max-age=0}, an
    invalid or past C{Expires}, a 404 without C{Last-Modified}, ...) and without a
    validator, so no later request could use it or revalidate it. (Else each request for
    it would write it again.)
    """
    fresh = rules.Freshness(status, fields, sent, now)
    return fresh.age(now) >= fresh.lifetime and not preconditions.validation_fields(fields)


def _ignore(fill: Fill) -> None:
    """A fill nobody can follow (a revalidation's) needs no bookkeeping at its end."""


def open_cache(config: ProxyConfig, clock: IReactorTime) -> CacheStage | None:
    """
    The cache the configuration asks for, or L{None}.

    @raise ValueError: If the cache directory can't be used (one line for the user).
    """
    if not config.caching:
        return None
    memory = None
    if config.cache_memory:
        memory = MemoryTier(
            config.cache_memory, min(config.cache_max_object, max(config.cache_memory // 4, 1))
        )
    disk = None
    if config.cache_dir is not None:
        try:
            disk = DiskStore(config.cache_dir, config.cache_size, config.cache_max_object)
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"cache-dir {config.cache_dir!r} can't be used: {e}") from None
        if disk.reset:
            CacheStage.log.warn(
                "cache: the index in {dir} was unreadable and was set aside; starting empty",
                dir=config.cache_dir,
            )
        disk.sweep_orphans()
    return CacheStage(config, clock, memory, disk)
