"""
L{RemovalSync}: with C{--workers}, the memory tier of each process follows what the
others removed from the shared disk store (a PURGE, an invalidation).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from twisted.logger import Logger

from aproxy.cache.disk import DiskStore
from aproxy.cache.store import MemoryTier

__all__ = ["SYNC_INTERVAL", "RemovalSync"]

SYNC_INTERVAL = 0.25
"""Seconds between two looks at what other workers removed from the shared disk store."""


class RemovalSync:
    """
    Drops the memory copies of what other processes removed from the shared disk store
    since the last look, at most every L{SYNC_INTERVAL} seconds while requests come; all
    of them if this process fell behind the store's log.

    @ivar due: When the next look is due (the caller checks, a comparison per request).
    """

    log = Logger()

    def __init__(self, memory: MemoryTier, disk: DiskStore, freed: Callable[[], None]) -> None:
        self.memory = memory
        self.disk = disk
        self.freed = freed
        # Where this process is in the disk store's log of removals.
        self.position = disk.last_removal()
        self.due = 0.0

    def run(self, now: float) -> None:
        """Look now."""
        self.due = now + SYNC_INTERVAL
        try:
            keys, self.position, complete = self.disk.removed_since(self.position)
        except sqlite3.Error as e:
            self.log.warn("cache: could not read the removals of other workers: {why}", why=e)
            return
        if not complete:
            self.memory.clear()
            self.freed()
            return
        for key in keys:
            if self.memory.remove(key):
                self.freed()
