"""
The disk tier of the cache: bodies as files plus an SQLite index, in one directory that
every worker process on the machine shares and that survives restarts.

Layout of the directory::

    index.sqlite3        the index (WAL): one row per object, its metadata and last use
    lock                 held (flock) only while a process sets the index up
    tmp/<pid>-<token>-<n>.part    bodies being written
    objects/<ab>/<ab...> complete bodies, named by 32 random hex digits

The crash-safety argument: a body is written to a temporary file, renamed into
C{objects/} (atomic) only once complete, and only then given its index row. So a row
only ever points at a complete file, and an object is only visible once its row exists:
C{kill -9} at any moment leaves at worst an unindexed file (removed by
L{DiskStore.sweep_orphans}) or a temporary one (removed at the next start, its process
being gone), never a partial object served. A row whose file is missing or has the
wrong size anyway (a full disk, someone else's hands) is a miss and is deleted.

File names never come from the URL, so no request can name a path. Everything runs in
the reactor thread: each call is a few indexed queries and no fsync (C{synchronous=NORMAL}
in WAL mode), and uses of objects are written in batches at most once a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

from aproxy.cache.store import MAX_VARIANTS, Meta, decode_meta, encode_meta

__all__ = ["REMOVALS_KEPT", "DiskStore", "DiskWriter"]

INDEX_NAME = "index.sqlite3"

# "apxy": marks the index file as ours, so a foreign SQLite file is set aside, not used.
_APPLICATION_ID = 0x61707879
_SCHEMA_VERSION = 2

# Removals (PURGE, invalidations) as a log other processes read to drop their memory
# copies (see DiskStore.removed_since); added in version 2.
_REMOVALS = """
CREATE TABLE IF NOT EXISTS removals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,
    at REAL NOT NULL
);
"""
# How long, in seconds, a removal stays in the log.
REMOVALS_KEPT = 600.0

_SCHEMA = (
    _REMOVALS
    + """
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    vary BLOB NOT NULL,
    name TEXT NOT NULL UNIQUE,
    length INTEGER NOT NULL,
    meta BLOB NOT NULL,
    stored REAL NOT NULL,
    last_used REAL NOT NULL,
    UNIQUE (key, vary)
);
CREATE INDEX IF NOT EXISTS objects_last_used ON objects (last_used);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    objects INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS objects_added AFTER INSERT ON objects BEGIN
    UPDATE totals SET bytes = bytes + NEW.length, objects = objects + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS objects_removed AFTER DELETE ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.length, objects = objects - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS objects_resized AFTER UPDATE OF length ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.length + NEW.length WHERE id = 0;
END;
"""
)

# Told apart from every other failure: these mean the file is not a usable index.
_UNUSABLE = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

_HEX = frozenset("0123456789abcdef")

# Told apart from an earlier process that had the same pid (pid 1 in a container, say):
# its temporary files are left over and go, ours stay.
_PROCESS_TOKEN = secrets.token_hex(4)
_temp_numbers = itertools.count()


class _Unusable(Exception):
    """The index file is an SQLite database, but not (this version of) ours."""


def _valid_name(name: object) -> bool:
    """Whether C{name} is an object file name this module makes (from an index row
    others may have written: it must not be able to name any other path)."""
    return isinstance(name, str) and len(name) == 32 and _HEX.issuperset(name)


def _unlink(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int, token: str) -> bool:
    """Whether the process that named a temporary file C{pid}-C{token} may still run."""
    if pid == os.getpid():
        return token == _PROCESS_TOKEN
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


class DiskStore:
    """
    Objects as files plus an SQLite index (WAL) in one directory, shared by every worker
    process on the machine; survives restarts; LRU eviction within capacity.

    @ivar directory: The cache directory.
    @ivar capacity: The most body bytes kept, over all objects.
    @ivar max_object: The largest body kept, in bytes.
    @ivar evictions: How many objects this process evicted to stay within capacity.
    @ivar reset: C{True} if the index file was corrupt or not ours when opened: it was
        renamed to C{index.sqlite3.bad}, the store started empty, and the caller may
        want to log that.
    """

    def __init__(
        self,
        directory: str,
        capacity: int,
        max_object: int,
        now: Callable[[], float] = time.time,
        touch_interval: float = 1.0,
        busy_timeout: float = 0.2,
    ) -> None:
        """
        Open (creating it if needed) the store in C{directory}.

        Several processes may do this at once: setting up the index is done under a lock.
        Temporary files left by processes that no longer exist are removed.

        @param directory: The cache directory, created with mode 0o700 if missing.
        @param capacity: The most body bytes to keep.
        @param max_object: The largest body to keep.
        @param now: The clock for last-use times (tests pass a fake one).
        @param touch_interval: How often, in seconds, uses of objects are written to the
            index; they are kept in memory in between.
        @param busy_timeout: How long, in seconds, to wait for another process's write
            to the index before giving up.
        @raise OSError: If the directory or its files cannot be made or opened.
        @raise sqlite3.Error: If the index cannot be opened or set up.
        """
        self.directory = directory
        self.capacity = capacity
        self.max_object = max_object
        self.evictions = 0
        self.reset = False
        self._now = now
        self._touch_interval = touch_interval
        self._busy_timeout = busy_timeout
        self._touches: dict[tuple[bytes, bytes], float] = {}
        self._flushed = now()
        self._closed = False
        self._tmp = os.path.join(directory, "tmp")
        self._objects = os.path.join(directory, "objects")
        for path in (directory, self._tmp, self._objects):
            os.makedirs(path, mode=0o700, exist_ok=True)
        lock = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._db = self._open_index()
            if self.reset:
                self.sweep_orphans(min_age=0.0)
            self._remove_dead_temps()
        finally:
            os.close(lock)  # which releases the lock

    # Setting up.

    def _connect(self) -> sqlite3.Connection:
        """A connection to the index, in autocommit mode: transactions are explicit."""
        db = sqlite3.connect(
            os.path.join(self.directory, INDEX_NAME),
            timeout=self._busy_timeout,
            isolation_level=None,
        )
        try:
            db.execute("PRAGMA journal_mode = WAL").fetchone()
            db.execute("PRAGMA synchronous = NORMAL")
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if application_id == 0:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise _Unusable("an SQLite database of something else")
                # One transaction: a crash leaves either nothing or a marked index.
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA}"
                    f" PRAGMA application_id = {_APPLICATION_ID};"
                    f" PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
                )
            elif application_id == _APPLICATION_ID and version == 1:
                db.executescript(
                    f"BEGIN IMMEDIATE; {_REMOVALS} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
                )
            elif application_id != _APPLICATION_ID or version != _SCHEMA_VERSION:
                raise _Unusable(f"application_id {application_id}, version {version}")
        except BaseException:
            db.close()
            raise
        return db

    def _open_index(self) -> sqlite3.Connection:
        """Connect, setting a corrupt or foreign index file aside (see C{reset})."""
        try:
            return self._connect()
        except _Unusable:
            pass
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) not in _UNUSABLE:
                raise
        index = os.path.join(self.directory, INDEX_NAME)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(index + suffix, index + ".bad" + suffix)
            except FileNotFoundError:
                pass
        self.reset = True
        return self._connect()

    def _remove_dead_temps(self) -> None:
        """Remove the temporary files of processes that no longer exist."""
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                pid, _, rest = entry.name.partition("-")
                token, _, _ = rest.partition("-")
                if pid.isdigit() and entry.name.endswith(".part"):
                    if not _alive(int(pid), token):
                        _unlink(entry.path)

    def sweep_orphans(self, min_age: float = 3600.0) -> int:
        """
        Remove object files no index row points at: left by a crash between a body's
        rename and its row, or between an eviction and its file's removal. Walks the
        whole directory, so it is for startup or a quiet moment, not the hot path.

        @param min_age: Only files unchanged for this many seconds (by the real clock)
            are removed, so a commit in progress in another process keeps its file.
        @return: How many files were removed.
        """
        limit = time.time() - min_age
        removed = 0
        with os.scandir(self._objects) as groups:
            subdirs = [group.path for group in groups if group.is_dir(follow_symlinks=False)]
        for subdir in subdirs:
            with os.scandir(subdir) as entries:
                for entry in entries:
                    if entry.stat(follow_symlinks=False).st_mtime > limit:
                        continue
                    row = self._db.execute(
                        "SELECT 1 FROM objects WHERE name = ?", (entry.name,)
                    ).fetchone()
                    if row is None:
                        _unlink(entry.path)
                        removed += 1
        return removed

    # Reading.

    def _object_path(self, name: str) -> str:
        """Where the object file called C{name} lives."""
        return os.path.join(self._objects, name[:2], name)

    def variants(self, key: bytes) -> list[Meta]:
        """
        The stored variants of C{key}, from the index alone (no file is opened).

        @param key: The primary cache key.
        @return: Their metadata, most recently stored first; rows whose metadata does not
            decode are left out.
        """
        rows = self._db.execute(
            "SELECT meta FROM objects WHERE key = ? ORDER BY stored DESC, id DESC", (key,)
        ).fetchall()
        found = []
        for (blob,) in rows:
            try:
                meta = decode_meta(blob)
            except ValueError:
                continue
            if meta.key == key:
                found.append(meta)
        return found

    def open(self, meta: Meta) -> BinaryIO | None:
        """
        The body of the object C{meta} describes, and mark it used.

        Only ever a whole body: if the file is missing or its size is not C{meta.length},
        the row is deleted and this is a miss. It is a miss too (and nothing is deleted)
        if the object was replaced or refreshed since C{meta} was read, by this process or
        another, since the body might not be the one C{meta} describes.

        @param meta: Metadata from L{variants}.
        @return: The body file, open for reading at offset 0 (the caller closes it), or
            L{None}.
        """
        row = self._db.execute(
            "SELECT id, name, meta FROM objects WHERE key = ? AND vary = ?",
            (meta.key, meta.vary),
        ).fetchone()
        if row is None or row[2] != encode_meta(meta):
            return None
        row_id, name, _ = row
        if not _valid_name(name):
            self._forget(row_id, None)
            return None
        path = self._object_path(name)
        try:
            # No symlink followed: the directory may be writable by others.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            self._forget(row_id, path)
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != meta.length:
            os.close(fd)
            self._forget(row_id, path)
            return None
        now = self._now()
        self._touches[meta.key, meta.vary] = now
        if now - self._flushed >= self._touch_interval:
            self.flush_touches()
        return os.fdopen(fd, "rb")

    def _forget(self, row_id: int, path: str | None) -> None:
        """Delete a row that points at no whole body, and its file; best effort (another
        process may be writing, and the next miss will try again)."""
        try:
            self._db.execute("DELETE FROM objects WHERE id = ?", (row_id,))
        except sqlite3.OperationalError:
            return
        if path is not None:
            _unlink(path)

    def flush_touches(self) -> None:
        """
        Write the uses of objects remembered since the last flush to the index, so
        eviction in every process sees them. If the index stays busy, they are kept for
        the next try.
        """
        self._flushed = self._now()
        if not self._touches or self._closed:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE objects SET last_used = max(last_used, ?) WHERE key = ? AND vary = ?",
                [(used, key, vary) for (key, vary), used in self._touches.items()],
            )
            self._db.execute("COMMIT")
        except sqlite3.OperationalError:
            self._rollback()
            return
        self._touches.clear()

    def _rollback(self) -> None:
        """End the open transaction, if any, without its changes."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def stats(self) -> tuple[int, int]:
        """
        What the whole store holds, over all processes.

        @return: (body bytes, objects), from the index.
        """
        size, count = self._db.execute("SELECT bytes, objects FROM totals").fetchone()
        return int(size), int(count)

    # Writing.

    def begin(self, key: bytes) -> DiskWriter:
        """
        Start storing a body for C{key}.

        @param key: The primary cache key; the commit's metadata must carry the same.
        @return: A writer to feed the body, then commit or abort.
        """
        name = f"{os.getpid()}-{_PROCESS_TOKEN}-{next(_temp_numbers)}.part"
        return DiskWriter(self, key, os.path.join(self._tmp, name))

    def _insert(self, meta: Meta, name: str) -> bool:
        """
        Index a complete body already renamed to C{name}, replacing the variant with the
        same key and vary, then evict until the store is within capacity.

        @return: C{True} if the row is in, C{False} if the index stayed busy (or failed).
        """
        self.flush_touches()  # so eviction below sees this process's recent uses
        blob = encode_meta(meta)
        now = self._now()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            old = self._db.execute(
                "SELECT id, name FROM objects WHERE key = ? AND vary = ?",
                (meta.key, meta.vary),
            ).fetchone()
            if old is not None:
                self._db.execute("DELETE FROM objects WHERE id = ?", (old[0],))
            cursor = self._db.execute(
                "INSERT INTO objects (key, vary, name, length, meta, stored, last_used)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meta.key, meta.vary, name, meta.length, blob, now, now),
            )
            evicted = self._evict_rows(keep=cursor.lastrowid)
            crowded = self._db.execute(
                "SELECT id, name FROM objects WHERE key = ? ORDER BY stored DESC, id DESC"
                " LIMIT -1 OFFSET ?",
                (meta.key, MAX_VARIANTS),
            ).fetchall()
            if crowded:
                self._db.executemany("DELETE FROM objects WHERE id = ?", [(r[0],) for r in crowded])
                evicted += [victim for _, victim in crowded]
            self._db.execute("COMMIT")
        except sqlite3.OperationalError:
            self._rollback()
            return False
        # Rows first, then files: a reader that found a row before this commit either
        # has its file open already (still readable) or finds it gone (a miss).
        self.evictions += len(evicted)
        if old is not None:
            evicted.append(old[1])
        for victim in evicted:
            if _valid_name(victim):
                _unlink(self._object_path(victim))
        return True

    def _evict_rows(self, keep: int | None) -> list[str]:
        """
        Delete least recently used rows (but C{keep}) until the store is within
        capacity, inside the caller's transaction.

        @return: The names of the files of the deleted rows, to remove after the commit.
        """
        (total,) = self._db.execute("SELECT bytes FROM totals").fetchone()
        excess = total - self.capacity
        if excess <= 0:
            return []
        victims: list[tuple[int, str]] = []
        cursor = self._db.execute("SELECT id, name, length FROM objects ORDER BY last_used, id")
        while excess > 0:
            batch = cursor.fetchmany(64)
            if not batch:
                break
            for row_id, name, length in batch:
                if row_id == keep:
                    continue
                victims.append((row_id, name))
                excess -= length
                if excess <= 0:
                    break
        cursor.close()
        self._db.executemany("DELETE FROM objects WHERE id = ?", [(v[0],) for v in victims])
        return [name for _, name in victims]

    def update(self, meta: Meta) -> None:
        """
        Replace the metadata of the object with C{meta}'s key and vary (after a 304
        refreshed it). Nothing happens if it is gone, if its body length differs (the
        metadata would not describe it), or if the index stays busy: the object then
        keeps its old metadata and is validated again next time.

        @param meta: The refreshed metadata.
        """
        try:
            self._db.execute(
                "UPDATE objects SET meta = ? WHERE key = ? AND vary = ? AND length = ?",
                (encode_meta(meta), meta.key, meta.vary, meta.length),
            )
        except sqlite3.OperationalError:
            pass

    def remove(self, key: bytes) -> int:
        """
        Drop every variant of C{key}, rows and files (an invalidation, RFC 9111
        section 4.4).

        @param key: The primary cache key.
        @return: How many objects were dropped.
        @raise sqlite3.OperationalError: If the index stayed busy past the busy timeout,
            so the objects may still be there.
        """
        now = self._now()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            names = self._db.execute("SELECT name FROM objects WHERE key = ?", (key,)).fetchall()
            self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
            self._db.execute("INSERT INTO removals (key, at) VALUES (?, ?)", (key, now))
            self._db.execute("DELETE FROM removals WHERE at < ?", (now - REMOVALS_KEPT,))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        for (name,) in names:
            if _valid_name(name):
                _unlink(self._object_path(name))
        return len(names)

    def last_removal(self) -> int:
        """The sequence number of the latest removal (0: none yet), to read on from."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'removals'").fetchone()
        return int(row[0]) if row else 0

    def removed_since(self, seq: int) -> tuple[list[bytes], int, bool]:
        """
        The keys any process removed (L{remove}) after removal C{seq}: another process's
        memory copies of them must go.

        @return: The keys, the sequence number to read on from, and whether the list is
            complete: removals older than L{REMOVALS_KEPT} seconds are forgotten, and a
            reader that fell that far behind must drop every memory copy instead.
        """
        rows = self._db.execute(
            "SELECT seq, key FROM removals WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        last = self.last_removal()
        complete = rows[0][0] == seq + 1 if rows else last == seq
        return [bytes(key) for _, key in rows], max(last, seq), complete

    def close(self) -> None:
        """Write the remembered uses and close the index; idempotent. Writers still open
        can no longer commit."""
        if self._closed:
            return
        self.flush_touches()
        self._closed = True
        self._db.close()


class DiskWriter:
    """
    A body being written to a temporary file, until it is committed into the store or
    aborted. A write error (a full disk, say) raises nothing: the writer marks itself
    failed, removes its file, and its commit returns C{False}.

    @ivar key: The primary cache key the body is for.
    @ivar path: The temporary file: followers of an in-progress fetch may open it and
        read what was written so far (C{written} bytes, each write going straight to
        the file). It is gone after a commit, an abort or a failure.
    @ivar written: How many bytes were written.
    @ivar failed: Whether a write failed or the body grew over the store's C{max_object}.
    """

    def __init__(self, store: DiskStore, key: bytes, path: str) -> None:
        """
        Create the temporary file (a writer that cannot is failed from the start).

        @param store: The store to commit into.
        @param key: The primary cache key.
        @param path: The temporary file to create, which must not exist.
        """
        self.key = key
        self.path = path
        self.written = 0
        self.failed = False
        self._store = store
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            self.failed = True

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the file. Writing after a failure, commit or abort does nothing.

        @param data: The next bytes of the body.
        """
        if self._fd is None:
            return
        if self.written + len(data) > self._store.max_object:
            self._fail()
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._fail()
            return
        self.written += len(data)

    def _fail(self) -> None:
        """Give up: free the disk space now rather than at commit."""
        self.failed = True
        self.abort()

    def commit(self, meta: Meta) -> bool:
        """
        Make the body visible in the store as the object C{meta} describes.

        The file is closed and renamed into C{objects/} (atomic), then the index row is
        written in one transaction (replacing the variant with the same key and vary,
        whose file is removed after the commit), then least recently used objects are
        evicted until the store is within capacity.

        @param meta: The object's metadata; C{meta.key} must be the writer's key.
        @return: C{True} once the object is visible; C{False} (and the file removed) if
            the writer failed or was already finished, if C{written} is not
            C{meta.length}, if the body is over C{max_object} or the whole capacity, or
            if the index stayed busy.
        """
        store = self._store
        fd = self._fd
        if (
            fd is None
            or store._closed
            or meta.key != self.key
            or meta.length != self.written
            or meta.length > min(store.max_object, store.capacity)
        ):
            self.abort()
            return False
        self._fd = None
        try:
            os.close(fd)
        except OSError:
            self.failed = True
            _unlink(self.path)
            return False
        name = secrets.token_hex(16)
        target = store._object_path(name)
        try:
            try:
                os.rename(self.path, target)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                os.rename(self.path, target)
        except OSError:
            self.failed = True
            _unlink(self.path)
            return False
        if not store._insert(meta, name):
            _unlink(target)
            return False
        return True

    def abort(self) -> None:
        """Close and remove the temporary file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # nothing written is kept, so no error matters
            os.close(fd)
        _unlink(self.path)
