"""
Tests for L{aproxy.cache.store} (the metadata record and the memory tier) and
L{aproxy.cache.disk} (the disk tier shared by worker processes).
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import struct
import tempfile

from twisted.internet.task import Clock as TaskClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aproxy.cache import disk
from aproxy.cache.disk import REMOVALS_KEPT, DiskStore
from aproxy.cache.heap import TRIM_DELAY, HeapTrimmer, malloc_trim
from aproxy.cache.store import (
    MAX_VARIANTS,
    OBJECT_OVERHEAD,
    MemoryTier,
    Meta,
    decode_meta,
    encode_meta,
)


def make_meta(
    key: bytes = b"http://example.com/a",
    length: int = 3,
    vary: bytes = b"",
    when: float = 1000.0,
) -> Meta:
    """Metadata for a test object."""
    return Meta(
        key=key,
        vary=vary,
        vary_names=(b"accept-encoding",) if vary else (),
        status=200,
        reason=b"OK",
        fields=((b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=60")),
        request_time=when,
        response_time=when + 0.25,
        length=length,
    )


class MetaRecordTests(SynchronousTestCase):
    """L{encode_meta} and L{decode_meta}: a compact record that only ever parses."""

    def test_round_trip(self) -> None:
        """Every field comes back as it went in, including arbitrary bytes."""
        meta = Meta(
            key=b"http://example.com/\xff?q=\x00",
            vary=b"gzip\x00br",
            vary_names=(b"accept-encoding", b"accept-language"),
            status=203,
            reason=b"Non-Authoritative \xe9",
            fields=((b"X-Big", b"v" * 70000), (b"Set-Cookie", b""), (b"A", b"b")),
            request_time=1700000000.123456,
            response_time=1700000001.5,
            length=2**40,
        )
        self.assertEqual(decode_meta(encode_meta(meta)), meta)

    def test_round_trip_empty(self) -> None:
        """Empty strings and no fields or vary names survive too."""
        meta = Meta(b"", b"", (), 100, b"", (), 0.0, 0.0, 0)
        self.assertEqual(decode_meta(encode_meta(meta)), meta)

    def test_deterministic(self) -> None:
        """Equal metadata encode to equal bytes (the disk tier compares records)."""
        self.assertEqual(encode_meta(make_meta()), encode_meta(make_meta()))
        self.assertNotEqual(encode_meta(make_meta()), encode_meta(make_meta(when=1.0)))

    def test_with_fields(self) -> None:
        """A refreshed copy has the new fields and times and everything else unchanged."""
        meta = make_meta(vary=b"gzip")
        fresh = meta.with_fields(((b"ETag", b'"x"'),), 5.0, 6.0)
        self.assertEqual(fresh.fields, ((b"ETag", b'"x"'),))
        self.assertEqual((fresh.request_time, fresh.response_time), (5.0, 6.0))
        self.assertEqual(
            (fresh.key, fresh.vary, fresh.vary_names, fresh.status, fresh.length),
            (meta.key, meta.vary, meta.vary_names, meta.status, meta.length),
        )

    def test_every_truncation_is_value_error(self) -> None:
        """Any prefix of a record is refused with ValueError, never read short."""
        record = encode_meta(make_meta(vary=b"gzip"))
        for end in range(len(record)):
            with self.assertRaises(ValueError):
                decode_meta(record[:end])

    def test_trailing_bytes_are_value_error(self) -> None:
        """A record followed by anything is refused."""
        with self.assertRaises(ValueError):
            decode_meta(encode_meta(make_meta()) + b"\x00")

    def test_garbage_is_value_error(self) -> None:
        """Foreign bytes, another version, a pickle or a str are refused with ValueError."""
        record = encode_meta(make_meta())
        for garbage in (
            b"",
            b"\x00" * 64,
            b"AXM\x02" + record[4:],
            pickle.dumps(make_meta()),
            bytes(range(256)),
            record.decode("latin-1"),
        ):
            with self.assertRaises(ValueError):
                decode_meta(garbage)  # type: ignore[arg-type]

    def test_out_of_range_numbers_are_value_error(self) -> None:
        """A status that is not three digits or a non-finite time is refused."""
        record = encode_meta(make_meta())
        bad_status = record[:4] + struct.pack("!H", 7) + record[6:]
        nan_time = record[:6] + struct.pack("!d", float("nan")) + record[14:]
        for garbage in (bad_status, nan_time):
            with self.assertRaises(ValueError):
                decode_meta(garbage)

    def test_huge_count_is_value_error(self) -> None:
        """A field count far beyond the record's bytes fails instead of allocating."""
        record = encode_meta(Meta(b"k", b"", (), 200, b"", (), 0.0, 0.0, 0))
        with self.assertRaises(ValueError):
            decode_meta(record[:-4] + struct.pack("!I", 0xFFFFFFFF))

    def test_encode_refuses_what_cannot_be_read_back(self) -> None:
        """Encoding a status out of range or a str where bytes belong is a ValueError."""
        with self.assertRaises(ValueError):
            encode_meta(Meta(b"k", b"", (), 1000, b"", (), 0.0, 0.0, 0))
        with self.assertRaises(ValueError):
            encode_meta(Meta("k", b"", (), 200, b"", (), 0.0, 0.0, 0))  # type: ignore[arg-type]


def size_of(meta: Meta) -> int:
    """The bytes the memory tier counts for an object with C{meta}."""
    return meta.length + len(encode_meta(meta)) + OBJECT_OVERHEAD


class MemoryTierTests(SynchronousTestCase):
    """L{MemoryTier}: whole objects, least recently used out first, bounded in bytes."""

    def setUp(self) -> None:
        self.unit = size_of(make_meta(b"a"))
        self.tier = MemoryTier(capacity=3 * self.unit, max_object=100)

    def put(self, key: bytes, vary: bytes = b"", body: bytes = b"abc") -> bool:
        """Store C{body} under C{key} and C{vary}."""
        return self.tier.put(make_meta(key, len(body), vary), body)

    def test_variants_per_url_bounded(self) -> None:
        """A URL keeps at most MAX_VARIANTS variants in memory, the newest."""
        tier = MemoryTier(capacity=1 << 20, max_object=100)
        for i in range(MAX_VARIANTS + 2):
            self.assertTrue(tier.put(make_meta(b"k", 3, b"v%d" % i), b"abc"))
        varies = [meta.vary for meta in tier.variants(b"k")]
        self.assertEqual(len(varies), MAX_VARIANTS)
        self.assertNotIn(b"v0", varies)
        self.assertNotIn(b"v1", varies)
        self.assertIn(b"v%d" % (MAX_VARIANTS + 1), varies)
        self.assertEqual(tier.objects, MAX_VARIANTS)

    def test_get_returns_what_was_put(self) -> None:
        """A stored object comes back with its metadata, and is counted."""
        self.assertTrue(self.put(b"a"))
        self.assertEqual(self.tier.get(b"a", b""), (make_meta(b"a"), b"abc"))
        self.assertIsNone(self.tier.get(b"a", b"other"))
        self.assertIsNone(self.tier.get(b"b", b""))
        self.assertEqual((self.tier.bytes, self.tier.objects), (self.unit, 1))

    def test_least_recently_used_goes_first(self) -> None:
        """When full, the object not used for longest is evicted, and counted."""
        for key in (b"a", b"b", b"c"):
            self.put(key)
        self.tier.get(b"a", b"")
        self.put(b"d")
        self.assertIsNone(self.tier.get(b"b", b""))
        for key in (b"a", b"c", b"d"):
            self.assertIsNotNone(self.tier.get(key, b""))
        self.assertEqual((self.tier.objects, self.tier.evictions), (3, 1))

    def test_variants_is_not_a_use(self) -> None:
        """Looking at the variants does not save an object from eviction."""
        for key in (b"a", b"b", b"c"):
            self.put(key)
        self.tier.variants(b"a")
        self.put(b"d")
        self.assertEqual(self.tier.variants(b"a"), [])

    def test_bytes_stay_within_capacity(self) -> None:
        """However objects of varied sizes arrive, the bytes held never exceed capacity."""
        for i in range(50):
            self.put(b"k%d" % i, body=b"x" * (i * 7 % 100))
            self.assertLessEqual(self.tier.bytes, self.tier.capacity)
        self.assertEqual(self.tier.bytes, sum(size_of(m) for m in self.all_metas()))

    def all_metas(self) -> list[Meta]:
        """The metadata of every object held."""
        return [m for i in range(50) for m in self.tier.variants(b"k%d" % i)]

    def test_over_max_object_is_refused(self) -> None:
        """A body over max_object is not stored and nothing is evicted for it."""
        self.put(b"a")
        self.assertFalse(self.put(b"big", body=b"x" * 101))
        self.assertTrue(self.put(b"edge", body=b"x" * 100))
        self.assertEqual(self.tier.variants(b"big"), [])
        self.assertEqual(self.tier.evictions, 0)

    def test_over_capacity_is_refused(self) -> None:
        """An object larger than the whole capacity is refused without emptying the tier."""
        tier = MemoryTier(capacity=self.unit + 50, max_object=1000)
        tier.put(make_meta(b"a"), b"abc")
        self.assertFalse(tier.put(make_meta(b"b", 100), b"x" * 100))
        self.assertEqual((tier.objects, tier.evictions), (1, 0))

    def test_replace_same_key_and_vary(self) -> None:
        """Storing the same key and vary again replaces the object; not an eviction."""
        self.put(b"a", body=b"old")
        self.put(b"a", body=b"newer")
        self.assertEqual(self.tier.get(b"a", b"")[1], b"newer")  # type: ignore[index]
        self.assertEqual(self.tier.objects, 1)
        self.assertEqual(self.tier.bytes, size_of(make_meta(b"a", 5)))
        self.assertEqual(self.tier.evictions, 0)

    def test_refused_replacement_drops_the_old_object(self) -> None:
        """A newer response too big to keep still removes the older one it replaces."""
        self.put(b"a")
        self.assertFalse(self.put(b"a", body=b"x" * 101))
        self.assertIsNone(self.tier.get(b"a", b""))
        self.assertEqual((self.tier.bytes, self.tier.objects), (0, 0))

    def test_variants_most_recently_stored_first(self) -> None:
        """Each variant of a key is listed, the latest stored first."""
        self.tier = MemoryTier(capacity=10 * self.unit, max_object=100)
        self.put(b"a", b"gzip")
        self.put(b"a", b"br")
        self.put(b"a", b"gzip", body=b"xyz")
        self.put(b"b")
        self.assertEqual([m.vary for m in self.tier.variants(b"a")], [b"gzip", b"br"])

    def test_remove_drops_every_variant(self) -> None:
        """Removing a key drops all its variants, returns how many, and is no eviction."""
        self.tier = MemoryTier(capacity=10 * self.unit, max_object=100)
        self.put(b"a", b"gzip")
        self.put(b"a", b"br")
        self.put(b"b")
        self.assertEqual(self.tier.remove(b"a"), 2)
        self.assertEqual(self.tier.remove(b"a"), 0)
        self.assertEqual(self.tier.variants(b"a"), [])
        self.assertEqual((self.tier.bytes, self.tier.objects), (self.unit, 1))
        self.assertEqual(self.tier.evictions, 0)

    def test_update_replaces_meta(self) -> None:
        """After a 304 the metadata is replaced and the byte count follows its size."""
        self.put(b"a")
        fresh = make_meta(b"a").with_fields(((b"ETag", b'"1"'),), 7.0, 8.0)
        self.tier.update(fresh)
        self.assertEqual(self.tier.get(b"a", b""), (fresh, b"abc"))
        self.assertEqual(self.tier.bytes, size_of(fresh))

    def test_update_of_absent_or_other_length_does_nothing(self) -> None:
        """Metadata for no held object, or for a body of another length, is ignored."""
        self.put(b"a")
        self.tier.update(make_meta(b"b"))
        self.tier.update(make_meta(b"a", length=4, when=5.0))
        self.assertEqual(self.tier.variants(b"a"), [make_meta(b"a")])
        self.assertEqual(self.tier.objects, 1)

    def test_update_growing_past_capacity_evicts_others(self) -> None:
        """Metadata grown by a 304 makes room among the other objects, not itself."""
        for key in (b"a", b"b", b"c"):
            self.put(key)
        self.tier.update(make_meta(b"c").with_fields(((b"X", b"y" * 100),), 1.0, 2.0))
        self.assertLessEqual(self.tier.bytes, self.tier.capacity)
        self.assertIsNone(self.tier.get(b"a", b""))
        self.assertIsNotNone(self.tier.get(b"c", b""))
        self.assertEqual(self.tier.evictions, 1)

    def test_length_mismatch_is_a_bug(self) -> None:
        """A body whose length differs from the metadata's is refused loudly."""
        with self.assertRaises(ValueError):
            self.tier.put(make_meta(b"a", 4), b"abc")


class Clock:
    """A settable time source for L{DiskStore}'s C{now}."""

    def __init__(self) -> None:
        self.time = 1000.0

    def __call__(self) -> float:
        return self.time


class DiskCase(SynchronousTestCase):
    """A fresh cache directory and a clock for each test."""

    def setUp(self) -> None:
        # Under pytest, mktemp() writes into the current directory (STYLE.md section 7).
        self.base = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.base)
        self.dir = os.path.join(self.base, "cache")
        self.clock = Clock()

    def open_store(self, capacity: int = 1000, max_object: int = 100, **kw: float) -> DiskStore:
        """A store on the test directory, closed at the end of the test."""
        store = DiskStore(self.dir, capacity, max_object, now=self.clock, **kw)
        self.addCleanup(store.close)
        return store

    def store_body(self, store: DiskStore, meta: Meta, body: bytes | None = None) -> bool:
        """Write and commit a body (C{meta.length} bytes of C{b"x"} by default)."""
        writer = store.begin(meta.key)
        writer.write(b"x" * meta.length if body is None else body)
        return writer.commit(meta)

    def read(self, store: DiskStore, meta: Meta) -> bytes | None:
        """The body C{store} serves for C{meta}, or None for a miss."""
        body = store.open(meta)
        if body is None:
            return None
        with body:
            return body.read()

    def object_files(self) -> list[str]:
        """Every file under objects/."""
        top = os.path.join(self.dir, "objects")
        return sorted(
            os.path.join(top, sub, name)
            for sub in os.listdir(top)
            for name in os.listdir(os.path.join(top, sub))
        )

    def temp_files(self) -> list[str]:
        """Every file under tmp/."""
        return sorted(os.listdir(os.path.join(self.dir, "tmp")))


class DiskStoreTests(DiskCase):
    """L{DiskStore} and L{DiskWriter}: storing, serving, replacing and removing."""

    def test_commit_then_open(self) -> None:
        """A committed body is listed by variants and served whole from offset 0."""
        store = self.open_store()
        meta = make_meta(length=5)
        self.assertTrue(self.store_body(store, meta, b"hello"))
        self.assertEqual(store.variants(meta.key), [meta])
        self.assertEqual(self.read(store, meta), b"hello")
        self.assertEqual(store.stats(), (5, 1))
        self.assertEqual(self.temp_files(), [])
        self.assertEqual(os.stat(self.dir).st_mode & 0o777, 0o700)

    def test_writes_reach_the_temp_file_at_once(self) -> None:
        """Followers of a fetch in progress can read all that was written so far."""
        store = self.open_store()
        writer = store.begin(b"k")
        writer.write(b"abc")
        writer.write(b"de")
        with open(writer.path, "rb") as follower:
            self.assertEqual(follower.read(), b"abcde")
        self.assertEqual(writer.written, 5)
        self.assertIn(str(os.getpid()), os.path.basename(writer.path))
        writer.abort()

    def test_short_body_is_not_committed(self) -> None:
        """A writer with fewer bytes than meta.length commits nothing and leaves nothing."""
        store = self.open_store()
        meta = make_meta(length=5)
        self.assertFalse(self.store_body(store, meta, b"hell"))
        self.assertEqual(store.variants(meta.key), [])
        self.assertEqual((self.temp_files(), self.object_files()), ([], []))
        self.assertEqual(store.stats(), (0, 0))

    def test_over_max_object_fails_early(self) -> None:
        """Writing past max_object fails the writer and frees its file at once."""
        store = self.open_store(max_object=10)
        writer = store.begin(b"k")
        writer.write(b"x" * 8)
        writer.write(b"x" * 3)
        self.assertTrue(writer.failed)
        self.assertEqual(self.temp_files(), [])
        self.assertFalse(writer.commit(make_meta(b"k", 11)))

    def test_write_error_fails_quietly(self) -> None:
        """A full disk raises nothing: the writer is failed and its commit refused."""
        store = self.open_store()
        writer = store.begin(b"k")

        def full(fd: int, data: object) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "write", full)
        writer.write(b"abc")
        self.assertTrue(writer.failed)
        self.assertFalse(writer.commit(make_meta(b"k", 0)))
        self.assertEqual(self.temp_files(), [])

    def test_commit_of_another_key_is_refused(self) -> None:
        """A body begun for one key cannot be committed as another."""
        store = self.open_store()
        writer = store.begin(b"http://a/")
        writer.write(b"abc")
        self.assertFalse(writer.commit(make_meta(b"http://b/")))
        self.assertEqual(store.stats(), (0, 0))

    def test_abort_is_idempotent(self) -> None:
        """Abort removes the temp file; again does nothing; a later commit is refused."""
        store = self.open_store()
        writer = store.begin(b"k")
        writer.write(b"abc")
        writer.abort()
        writer.abort()
        writer.write(b"more")
        self.assertEqual(self.temp_files(), [])
        self.assertFalse(writer.commit(make_meta(b"k")))

    def test_second_commit_is_refused(self) -> None:
        """A writer commits once."""
        store = self.open_store()
        writer = store.begin(make_meta().key)
        writer.write(b"abc")
        self.assertTrue(writer.commit(make_meta()))
        self.assertFalse(writer.commit(make_meta()))
        self.assertEqual(store.stats(), (3, 1))

    def test_file_names_do_not_come_from_the_url(self) -> None:
        """Object files are named by random hex whatever the key says."""
        store = self.open_store()
        key = b"http://x/../../../../etc/passwd"
        self.store_body(store, make_meta(key))
        [path] = self.object_files()
        name = os.path.basename(path)
        self.assertEqual(len(name), 32)
        self.assertLessEqual(set(name), set("0123456789abcdef"))
        self.assertEqual(os.path.basename(os.path.dirname(path)), name[:2])

    def test_replace_same_key_and_vary(self) -> None:
        """A new body for the same key and vary replaces the old one and its file."""
        store = self.open_store()
        self.store_body(store, make_meta(length=3), b"old")
        new = make_meta(length=5, when=2000.0)
        self.store_body(store, new, b"newer")
        self.assertEqual(store.variants(new.key), [new])
        self.assertEqual(self.read(store, new), b"newer")
        self.assertEqual(len(self.object_files()), 1)
        self.assertEqual((store.stats(), store.evictions), ((5, 1), 0))

    def test_open_with_stale_meta_is_a_miss(self) -> None:
        """Metadata read before a replacement does not get the new body."""
        store = self.open_store()
        old = make_meta(length=3)
        self.store_body(store, old)
        self.store_body(store, make_meta(length=3, when=2000.0), b"new")
        self.assertIsNone(store.open(old))
        self.assertEqual(store.stats(), (3, 1))

    def test_variants_most_recently_stored_first(self) -> None:
        """Each variant of a key is listed, the latest stored first."""
        store = self.open_store()
        for vary in (b"gzip", b"br", b"identity"):
            self.clock.time += 1
            self.store_body(store, make_meta(vary=vary))
        self.store_body(store, make_meta(b"other"))
        listed = [m.vary for m in store.variants(make_meta().key)]
        self.assertEqual(listed, [b"identity", b"br", b"gzip"])

    def test_update_replaces_meta(self) -> None:
        """After a 304 the new metadata serves the same body; the old one is a miss."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta, b"abc")
        fresh = meta.with_fields(((b"ETag", b'"2"'),), 5000.0, 5001.0)
        store.update(fresh)
        self.assertEqual(store.variants(meta.key), [fresh])
        self.assertEqual(self.read(store, fresh), b"abc")
        self.assertIsNone(store.open(meta))

    def test_update_of_another_length_does_nothing(self) -> None:
        """Metadata that would not describe the stored body is not written."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta)
        store.update(make_meta(length=4, when=1.0))
        self.assertEqual(store.variants(meta.key), [meta])

    def test_remove_deletes_rows_and_files(self) -> None:
        """Removing a key drops every variant, its files, and counts them."""
        store = self.open_store()
        self.store_body(store, make_meta(vary=b"gzip"))
        self.store_body(store, make_meta(vary=b"br"))
        self.store_body(store, make_meta(b"other"))
        self.assertEqual(store.remove(make_meta().key), 2)
        self.assertEqual(store.remove(make_meta().key), 0)
        self.assertEqual(store.variants(make_meta().key), [])
        self.assertEqual(len(self.object_files()), 1)
        self.assertEqual((store.stats(), store.evictions), ((3, 1), 0))

    def test_commit_after_close_is_refused(self) -> None:
        """A store closed under a writer refuses its commit and removes its file."""
        store = self.open_store()
        writer = store.begin(b"k")
        writer.write(b"abc")
        store.close()
        store.close()
        self.assertFalse(writer.commit(make_meta(b"k")))
        self.assertEqual(self.temp_files(), [])

    def test_busy_index_refuses_commit(self) -> None:
        """If another process holds the index's write lock, the commit gives up cleanly."""
        store = self.open_store(busy_timeout=0.0)
        other = sqlite3.connect(os.path.join(self.dir, disk.INDEX_NAME), isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        self.assertFalse(self.store_body(store, make_meta()))
        other.execute("ROLLBACK")
        self.assertEqual((self.object_files(), self.temp_files()), ([], []))
        self.assertTrue(self.store_body(store, make_meta()))


class EvictionTests(DiskCase):
    """The disk tier stays within capacity by evicting the least recently used."""

    def fill(self, store: DiskStore, *keys: bytes) -> None:
        """Store a 30-byte object for each key, one clock second apart."""
        for key in keys:
            self.clock.time += 1
            self.assertTrue(self.store_body(store, make_meta(key, 30)))

    def test_total_stays_within_capacity(self) -> None:
        """After every commit the index totals at most the capacity."""
        store = self.open_store(capacity=100, max_object=50)
        for i in range(20):
            self.clock.time += 1
            self.store_body(store, make_meta(b"k%d" % i, 7 + i * 13 % 44))
            self.assertLessEqual(store.stats()[0], 100)
        self.assertEqual(len(self.object_files()), store.stats()[1])
        self.assertGreater(store.evictions, 0)

    def test_least_recently_used_goes_first(self) -> None:
        """An object served recently outlives an older-stored one that was not."""
        store = self.open_store(capacity=90, touch_interval=0.0)
        self.fill(store, b"a", b"b", b"c")
        self.clock.time += 1
        self.assertIsNotNone(self.read(store, make_meta(b"a", 30)))
        self.fill(store, b"d")
        self.assertEqual(store.variants(b"b"), [])
        for key in (b"a", b"c", b"d"):
            self.assertEqual(len(store.variants(key)), 1)
        self.assertEqual((store.stats(), store.evictions), ((90, 3), 1))
        self.assertEqual(len(self.object_files()), 3)

    def test_uses_are_batched(self) -> None:
        """Uses reach the index (and other processes' evictions) when flushed."""
        store = self.open_store(capacity=90, touch_interval=60.0)
        other = self.open_store(capacity=90)
        self.fill(store, b"a", b"b", b"c")
        self.read(store, make_meta(b"a", 30))
        store.flush_touches()
        self.fill(other, b"d")
        self.assertEqual(len(store.variants(b"a")), 1)
        self.assertEqual(store.variants(b"b"), [])

    def test_unflushed_uses_do_not_count_elsewhere(self) -> None:
        """Between flushes, another process's eviction sees the last written uses."""
        store = self.open_store(capacity=90, touch_interval=60.0)
        other = self.open_store(capacity=90)
        self.fill(store, b"a", b"b", b"c")
        self.read(store, make_meta(b"a", 30))
        self.fill(other, b"d")
        self.assertEqual(store.variants(b"a"), [])

    def test_object_over_capacity_is_refused(self) -> None:
        """A body larger than the whole capacity is not stored and evicts nothing."""
        store = self.open_store(capacity=50, max_object=100)
        self.fill(store, b"a")
        self.assertFalse(self.store_body(store, make_meta(b"big", 60)))
        self.assertEqual((store.stats(), store.evictions), ((30, 1), 0))


class SharingAndCrashTests(DiskCase):
    """Several processes on one directory, restarts, and what crashes leave behind."""

    def test_two_stores_see_each_others_commits(self) -> None:
        """Two workers on one directory serve, replace and remove each other's objects."""
        one, two = self.open_store(), self.open_store()
        meta = make_meta()
        self.store_body(one, meta, b"abc")
        self.assertEqual(two.variants(meta.key), [meta])
        self.assertEqual(self.read(two, meta), b"abc")
        new = make_meta(length=4, when=2.0)
        self.store_body(two, new, b"abcd")
        self.assertEqual(self.read(one, new), b"abcd")
        self.assertEqual(one.stats(), (4, 1))
        self.assertEqual(one.remove(meta.key), 1)
        self.assertEqual(two.variants(meta.key), [])

    def test_removals_are_a_log_other_processes_read(self) -> None:
        """What one process removes, another learns from removed_since, in order."""
        one, two = self.open_store(), self.open_store()
        start = two.last_removal()
        self.assertEqual(two.removed_since(start), ([], start, True))
        one.remove(b"http://a/1")
        one.remove(b"http://a/2")
        keys, seq, complete = two.removed_since(start)
        self.assertEqual((keys, complete), ([b"http://a/1", b"http://a/2"], True))
        self.assertEqual(two.removed_since(seq), ([], seq, True))

    def test_reader_that_fell_behind_is_told(self) -> None:
        """Removals older than REMOVALS_KEPT are forgotten: a reader behind them is told
        its list is incomplete (and drops every memory copy)."""
        one, two = self.open_store(), self.open_store()
        start = two.last_removal()
        one.remove(b"http://a/1")
        self.clock.time += REMOVALS_KEPT + 1
        one.remove(b"http://a/2")
        keys, seq, complete = two.removed_since(start)
        self.assertEqual((keys, complete), ([b"http://a/2"], False))
        self.assertEqual(two.removed_since(seq), ([], seq, True))

    def test_version_1_index_gains_the_removals_log(self) -> None:
        """An index made before the removals log is upgraded in place, objects kept."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta, b"abc")
        store.close()
        db = sqlite3.connect(os.path.join(self.dir, "index.sqlite3"))
        db.executescript("DROP TABLE removals; PRAGMA user_version = 1;")
        db.close()
        again = self.open_store()
        self.assertFalse(again.reset)
        self.assertEqual(self.read(again, meta), b"abc")
        again.remove(meta.key)
        self.assertEqual(again.removed_since(0)[0], [meta.key])

    def test_variants_per_url_bounded(self) -> None:
        """A URL keeps at most MAX_VARIANTS variants on disk, the newest."""
        store = self.open_store(capacity=10_000)
        metas = [make_meta(vary=b"v%d" % i, when=float(i)) for i in range(MAX_VARIANTS + 3)]
        for meta in metas:
            self.clock.time += 1
            self.assertTrue(self.store_body(store, meta))
        kept = store.variants(metas[0].key)
        self.assertEqual(len(kept), MAX_VARIANTS)
        self.assertEqual({m.vary for m in kept}, {m.vary for m in metas[3:]})
        self.assertEqual(len(self.object_files()), MAX_VARIANTS)

    def test_survives_restart(self) -> None:
        """Objects are there after the store is closed and opened again."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta, b"abc")
        store.close()
        again = self.open_store()
        self.assertEqual(self.read(again, meta), b"abc")
        self.assertFalse(again.reset)

    def test_dead_process_temp_files_are_removed(self) -> None:
        """Temp files of processes that are gone go at open; live ones' stay."""
        store = self.open_store()
        writer = store.begin(b"k")
        tmp = os.path.join(self.dir, "tmp")
        names = [
            f"{2**31 - 1}-abcd1234-0.part",  # no such process
            f"{os.getpid()}-00000000-3.part",  # an earlier process with this pid
            f"{10**30}-abcd1234-0.part",  # not even a possible pid
            f"{os.getppid()}-abcd1234-0.part",  # a live process
            "not-ours.txt",
        ]
        for name in names:
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"partial")
        self.open_store()
        kept = sorted([names[3], names[4], os.path.basename(writer.path)])
        self.assertEqual(self.temp_files(), kept)
        writer.abort()

    def test_truncated_file_is_a_miss_and_forgotten(self) -> None:
        """A row whose file lost bytes is never served: it is deleted with its file."""
        store = self.open_store()
        meta = make_meta(length=5)
        self.store_body(store, meta, b"hello")
        [path] = self.object_files()
        os.truncate(path, 2)
        self.assertIsNone(store.open(meta))
        self.assertEqual(store.variants(meta.key), [])
        self.assertEqual((self.object_files(), store.stats()), ([], (0, 0)))

    def test_missing_file_is_a_miss_and_forgotten(self) -> None:
        """A row whose file is gone is a miss and is deleted."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta)
        [path] = self.object_files()
        os.unlink(path)
        self.assertIsNone(store.open(meta))
        self.assertEqual(store.stats(), (0, 0))

    def test_symlinked_object_is_not_followed(self) -> None:
        """An object file replaced by a symlink (to any file of the right size) is a miss."""
        store = self.open_store()
        meta = make_meta()
        self.store_body(store, meta)
        [path] = self.object_files()
        target = os.path.join(self.base, "secret")
        with open(target, "wb") as f:
            f.write(b"key")
        os.unlink(path)
        os.symlink(target, path)
        self.assertIsNone(store.open(meta))
        self.assertTrue(os.path.exists(target))

    def test_foreign_rows_cannot_name_paths(self) -> None:
        """A row written by someone else naming another path, or holding garbage
        metadata, is never used: the name is a miss, the garbage is skipped."""
        store = self.open_store()
        meta = make_meta()
        target = os.path.join(self.base, "secret")
        with open(target, "wb") as f:
            f.write(b"abc")
        db = sqlite3.connect(os.path.join(self.dir, disk.INDEX_NAME), isolation_level=None)
        self.addCleanup(db.close)
        insert = "INSERT INTO objects VALUES (NULL, ?, ?, ?, 3, ?, 1, 1)"
        db.execute(insert, (meta.key, b"", "../../secret", encode_meta(meta)))
        db.execute(insert, (meta.key, b"junk", "0" * 32, b"\x80garbage"))
        self.assertEqual(store.variants(meta.key), [meta])
        self.assertIsNone(store.open(meta))
        self.assertTrue(os.path.exists(target))

    def test_corrupt_index_is_set_aside(self) -> None:
        """An index that is not a database is renamed aside; the store starts empty
        and its now-unindexed files go."""
        store = self.open_store()
        self.store_body(store, make_meta())
        store.close()
        index = os.path.join(self.dir, disk.INDEX_NAME)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(index + suffix):
                os.unlink(index + suffix)
        with open(index, "wb") as f:
            f.write(b"this is not SQLite at all" * 100)
        again = self.open_store()
        self.assertTrue(again.reset)
        self.assertEqual((again.stats(), self.object_files()), ((0, 0), []))
        self.assertTrue(os.path.exists(index + ".bad"))
        self.assertTrue(self.store_body(again, make_meta()))

    def test_foreign_database_is_set_aside(self) -> None:
        """An SQLite file of some other program is not used, nor written to."""
        os.makedirs(self.dir)
        index = os.path.join(self.dir, disk.INDEX_NAME)
        db = sqlite3.connect(index)
        db.execute("CREATE TABLE objects (x)")
        db.commit()
        db.close()
        store = self.open_store()
        self.assertTrue(store.reset)
        self.assertTrue(self.store_body(store, make_meta()))
        foreign = sqlite3.connect(index + ".bad")
        self.addCleanup(foreign.close)
        tables = foreign.execute("SELECT name FROM sqlite_master").fetchall()
        self.assertEqual(tables, [("objects",)])

    def test_sweep_removes_unindexed_files(self) -> None:
        """Files a crash left unindexed are swept; indexed ones and young ones stay."""
        store = self.open_store()
        self.store_body(store, make_meta())
        [kept] = self.object_files()
        orphan = os.path.join(self.dir, "objects", "ab", "ab" + "0" * 30)
        os.makedirs(os.path.dirname(orphan), exist_ok=True)
        with open(orphan, "wb") as f:
            f.write(b"left")
        self.assertEqual(store.sweep_orphans(), 0)
        os.utime(orphan, (1.0, 1.0))
        os.utime(kept, (1.0, 1.0))
        self.assertEqual(store.sweep_orphans(), 1)
        self.assertEqual(self.object_files(), [kept])


class HeapTrimmerTests(SynchronousTestCase):
    """L{HeapTrimmer}: one trim shortly after a burst of evictions."""

    def test_one_trim_per_burst(self) -> None:
        """Drops within TRIM_DELAY share one trim; a later drop schedules another."""
        clock = TaskClock()
        calls: list[None] = []
        trimmer = HeapTrimmer(clock, lambda: calls.append(None))
        trimmer.freed()
        trimmer.freed()
        clock.advance(TRIM_DELAY / 2)
        trimmer.freed()
        self.assertEqual(calls, [])
        clock.advance(TRIM_DELAY / 2)
        self.assertEqual(len(calls), 1)
        trimmer.freed()
        clock.advance(TRIM_DELAY)
        self.assertEqual(len(calls), 2)

    def test_stop_and_no_trim(self) -> None:
        """A stopped trimmer trims no more; without malloc_trim nothing is scheduled."""
        clock = TaskClock()
        calls: list[None] = []
        trimmer = HeapTrimmer(clock, lambda: calls.append(None))
        trimmer.freed()
        trimmer.stop()
        clock.advance(1)
        self.assertEqual(calls, [])
        HeapTrimmer(clock, None).freed()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_this_libc_has_malloc_trim(self) -> None:
        """On glibc (this project's platform) the real function is found and runs."""
        if malloc_trim is None:
            raise SkipTest("no malloc_trim in this C library")
        malloc_trim()
