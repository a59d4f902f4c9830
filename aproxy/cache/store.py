"""
What the cache keeps of a response, and the memory tier that keeps whole objects.

L{Meta} is everything stored of a response besides its body; L{encode_meta} and
L{decode_meta} turn it into a compact, versioned binary record for the disk tier
(L{aproxy.cache.disk}). The record is read back from a directory that other users may be
able to write, so decoding never runs anything the bytes say (no pickle): garbage only
ever raises L{ValueError}. L{MemoryTier} is the small, fast tier in front of the disk: a
least-recently-used set of whole objects bounded in bytes.

Nothing here touches Twisted or the network; every call is quick and synchronous, since
the cache runs in the reactor thread.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_VARIANTS",
    "OBJECT_OVERHEAD",
    "Entry",
    "MemoryTier",
    "Meta",
    "decode_meta",
    "encode_meta",
]


@dataclass(frozen=True, slots=True)
class Meta:
    """
    What is stored of a response besides its body.

    @ivar key: The primary cache key, e.g. C{b"http://example.com/a?b"}.
    @ivar vary: The secondary key built from the request fields the response's C{Vary}
        names (C{b""} when the response had no C{Vary}).
    @ivar vary_names: The lowercased field names the response's C{Vary} listed (C{()} for
        none), so a later request's secondary key can be built the same way.
    @ivar status: The response's status code.
    @ivar reason: The response's reason phrase.
    @ivar fields: The stored header field lines, as (name, value) pairs in order.
    @ivar request_time: When the request that got this response was sent (RFC 9111
        section 4.2.3), in seconds since the epoch.
    @ivar response_time: When the response was received, in seconds since the epoch.
    @ivar length: The body's length in bytes.
    """

    key: bytes
    vary: bytes
    vary_names: tuple[bytes, ...]
    status: int
    reason: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    request_time: float
    response_time: float
    length: int

    def with_fields(
        self,
        fields: tuple[tuple[bytes, bytes], ...],
        request_time: float,
        response_time: float,
    ) -> Meta:
        """
        A copy refreshed by a validation: a 304's fields merged in (RFC 9111 section 4.3.4)
        and the new exchange's times.

        @param fields: The updated header field lines.
        @param request_time: When the validating request was sent.
        @param response_time: When its 304 arrived.
        @return: A new L{Meta}; the key, variant, status and length stay the same.
        """
        return dataclasses.replace(
            self, fields=fields, request_time=request_time, response_time=response_time
        )


MAX_VARIANTS = 32
"""The most variants (by Vary) of one URL each tier keeps, the oldest going first: every
lookup of the URL reads them all, and a client that controls a field the origin varies
on (User-Agent, Cookie) could otherwise make any number."""

# A record: magic and format version, fixed numbers, then length-prefixed byte strings.
_MAGIC = b"AXM\x01"
_FIXED = struct.Struct("!HddQ")  # status, request_time, response_time, length
_LEN = struct.Struct("!I")
_COUNT = struct.Struct("!I")
_MAX_LEN = 0xFFFFFFFF


def _check_numbers(status: int, request_time: float, response_time: float, length: int) -> None:
    """Raise L{ValueError} unless the numbers fit the record and mean something."""
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} is not a 3-digit code")
    if not (math.isfinite(request_time) and math.isfinite(response_time)):
        raise ValueError("request and response times must be finite")
    if not 0 <= length <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"length {length} out of range")


def encode_meta(meta: Meta) -> bytes:
    """
    Turn C{meta} into the record L{decode_meta} reads back.

    @param meta: The metadata to encode.
    @return: The record: deterministic, so equal metadata give equal bytes.
    @raise ValueError: If a number is out of range (a status that is not three digits, a
        time that is not finite, a negative length) or a byte string is over 4 GiB.
    """
    _check_numbers(meta.status, meta.request_time, meta.response_time, meta.length)
    parts = [
        _MAGIC,
        _FIXED.pack(meta.status, meta.request_time, meta.response_time, meta.length),
    ]
    strings: list[bytes] = [meta.key, meta.vary, meta.reason]
    for value in strings:
        parts += (_LEN.pack(len(value)), value)
    parts.append(_COUNT.pack(len(meta.vary_names)))
    for value in meta.vary_names:
        parts += (_LEN.pack(len(value)), value)
    parts.append(_COUNT.pack(len(meta.fields)))
    for name, value in meta.fields:
        parts += (_LEN.pack(len(name)), name, _LEN.pack(len(value)), value)
    try:
        return b"".join(parts)
    except TypeError as e:
        raise ValueError(f"metadata holds a value that is not bytes: {e}") from None


class _Reader:
    """Reads a record front to back; running past its end raises L{ValueError}."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def number(self, shape: struct.Struct) -> int:
        """The next unsigned number of C{shape}."""
        end = self.offset + shape.size
        if end > len(self.data):
            raise ValueError("truncated metadata record")
        (value,) = shape.unpack_from(self.data, self.offset)
        self.offset = end
        return int(value)

    def string(self) -> bytes:
        """The next length-prefixed byte string."""
        size = self.number(_LEN)
        end = self.offset + size
        if end > len(self.data):
            raise ValueError("truncated metadata record")
        value = self.data[self.offset : end]
        self.offset = end
        return value


def decode_meta(data: bytes) -> Meta:
    """
    Read back a record made by L{encode_meta}.

    @param data: The record, from a file others may have written: it is only ever parsed.
    @return: The metadata it holds.
    @raise ValueError: If C{data} is not a whole record of this format version (wrong
        magic, truncated, trailing bytes, numbers out of range).
    """
    if not isinstance(data, bytes):
        raise ValueError("metadata record must be bytes")
    if data[: len(_MAGIC)] != _MAGIC:
        raise ValueError("not a metadata record of this version")
    if len(data) < len(_MAGIC) + _FIXED.size:
        raise ValueError("truncated metadata record")
    status, request_time, response_time, length = _FIXED.unpack_from(data, len(_MAGIC))
    _check_numbers(status, request_time, response_time, length)
    reader = _Reader(data, len(_MAGIC) + _FIXED.size)
    key = reader.string()
    vary = reader.string()
    reason = reader.string()
    vary_names = tuple(reader.string() for _ in range(reader.number(_COUNT)))
    # Each item read consumes at least 4 bytes or raises, so a huge count in a short
    # record fails within len(data) / 4 steps instead of allocating or looping on.
    fields = tuple((reader.string(), reader.string()) for _ in range(reader.number(_COUNT)))
    if reader.offset != len(data):
        raise ValueError("trailing bytes after metadata record")
    return Meta(
        key=key,
        vary=vary,
        vary_names=vary_names,
        status=status,
        reason=reason,
        fields=fields,
        request_time=request_time,
        response_time=response_time,
        length=length,
    )


OBJECT_OVERHEAD = 200
"""
Bytes counted for each object in memory besides its body and encoded metadata: the
Python objects and dictionary slots that hold it, roughly.
"""


class Entry:
    """
    One object in the memory tier.

    @ivar meta: Its metadata.
    @ivar body: Its body.
    @ivar size: The bytes it is counted as.
    @ivar prepared: What a user of the tier worked out from C{meta} once and keeps with
        the object (the cache: its freshness and serialized head); L{None} until then,
        and again when C{meta} is replaced.
    """

    __slots__ = ("body", "meta", "prepared", "size")

    def __init__(self, meta: Meta, body: bytes, size: int) -> None:
        self.meta = meta
        self.body = body
        self.size = size
        self.prepared: Any = None


def _size(meta: Meta, body: bytes) -> int:
    """The bytes an object is counted as in memory: body, metadata and overhead."""
    return len(body) + len(encode_meta(meta)) + OBJECT_OVERHEAD


class MemoryTier:
    """
    An LRU of whole objects in memory, bounded in bytes.

    An object counts as its body plus its encoded metadata plus L{OBJECT_OVERHEAD}, so
    many tiny objects with large header sections cannot slip past the bound. Objects are
    identified by (key, vary): storing the same pair again replaces the object.

    @ivar capacity: The most bytes the tier holds.
    @ivar max_object: The largest body the tier accepts, in bytes.
    @ivar bytes: The bytes held now (see above for what counts).
    @ivar evictions: How many objects were dropped to make room for others (objects
        replaced or removed on purpose are not counted).
    """

    def __init__(self, capacity: int, max_object: int) -> None:
        """
        @param capacity: The most bytes to hold.
        @param max_object: The largest body to accept, in bytes.
        """
        self.capacity = capacity
        self.max_object = max_object
        self.bytes = 0
        self.evictions = 0
        # Least recently used first.
        self._lru: OrderedDict[tuple[bytes, bytes], Entry] = OrderedDict()
        # key -> its varies, least recently stored first.
        self._variants: dict[bytes, dict[bytes, None]] = {}

    @property
    def objects(self) -> int:
        """How many objects are held."""
        return len(self._lru)

    def variants(self, key: bytes) -> list[Meta]:
        """
        The stored variants of C{key}, to choose among by their C{Vary}. Looking does not
        count as use.

        @param key: The primary cache key.
        @return: Their metadata, most recently stored first; empty if none.
        """
        varies = self._variants.get(key)
        if not varies:
            return []
        return [self._lru[key, vary].meta for vary in reversed(varies)]

    def get(self, key: bytes, vary: bytes) -> tuple[Meta, bytes] | None:
        """
        One object, marked as the most recently used.

        @param key: The primary cache key.
        @param vary: The secondary key of the variant wanted.
        @return: Its metadata and body, or L{None} if it is not held.
        """
        entry = self.entry(key, vary)
        return None if entry is None else (entry.meta, entry.body)

    def entry(self, key: bytes, vary: bytes) -> Entry | None:
        """Like L{get}, but the L{Entry} itself (not to be changed but for C{prepared})."""
        entry = self._lru.get((key, vary))
        if entry is not None:
            self._lru.move_to_end((key, vary))
        return entry

    def put(self, meta: Meta, body: bytes) -> bool:
        """
        Store an object, replacing the one with the same key and vary, and dropping the
        least recently used others until it fits.

        A refused object still removes the one it would have replaced: that one is older
        than the response the caller has just got, so it must not be served any more.

        @param meta: Its metadata; C{meta.length} must be C{len(body)}.
        @param body: The whole body.
        @return: C{True} if stored, C{False} if the body is over C{max_object} or the
            object over the whole capacity.
        @raise ValueError: If C{meta.length} is not the body's length.
        """
        if meta.length != len(body):
            raise ValueError(f"meta.length {meta.length} but the body has {len(body)} bytes")
        self._drop(meta.key, meta.vary)
        size = _size(meta, body)
        if len(body) > self.max_object or size > self.capacity:
            return False
        self._make_room(size)
        self._lru[meta.key, meta.vary] = Entry(meta, body, size)
        varies = self._variants.setdefault(meta.key, {})
        varies[meta.vary] = None
        self.bytes += size
        if len(varies) > MAX_VARIANTS:
            self._drop(meta.key, next(iter(varies)))
            self.evictions += 1
        return True

    def update(self, meta: Meta) -> None:
        """
        Replace the metadata of the object with C{meta}'s key and vary, if held (after a
        304 refreshed it). Its place in the LRU order stays as it was.

        @param meta: The refreshed metadata; an object whose body length differs from
            C{meta.length} is left alone, since the metadata would not describe it.
        """
        entry = self._lru.get((meta.key, meta.vary))
        if entry is None or len(entry.body) != meta.length:
            return
        size = _size(meta, entry.body)
        self.bytes += size - entry.size
        entry.meta = meta
        entry.size = size
        entry.prepared = None
        if self.bytes > self.capacity:
            # Grown fields: make room among the others, then drop this one too if it
            # alone is over the capacity now.
            self._make_room(0, keep=(meta.key, meta.vary))
            self._make_room(0)

    def remove(self, key: bytes) -> int:
        """
        Drop every variant of C{key} (an invalidation, RFC 9111 section 4.4).

        @param key: The primary cache key.
        @return: How many objects were dropped.
        """
        varies = self._variants.pop(key, None)
        if not varies:
            return 0
        for vary in varies:
            self.bytes -= self._lru.pop((key, vary)).size
        return len(varies)

    def clear(self) -> None:
        """Drop every object (not counted as evictions)."""
        self._lru.clear()
        self._variants.clear()
        self.bytes = 0

    def _drop(self, key: bytes, vary: bytes) -> None:
        """Forget one object, if held."""
        entry = self._lru.pop((key, vary), None)
        if entry is None:
            return
        self.bytes -= entry.size
        varies = self._variants[key]
        del varies[vary]
        if not varies:
            del self._variants[key]

    def _make_room(self, size: int, keep: tuple[bytes, bytes] | None = None) -> None:
        """Evict least recently used objects, all but C{keep}, until C{size} more fit."""
        while self.bytes + size > self.capacity:
            victim = next((pair for pair in self._lru if pair != keep), None)
            if victim is None:
                return
            self._drop(*victim)
            self.evictions += 1
