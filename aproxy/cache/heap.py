"""
Giving the memory of evicted objects back to the operating system.

The memory tier's bodies are mostly between a few and a few hundred KiB: glibc's malloc
serves such sizes from its heap, not from separate mappings, and memory freed in the
middle of the heap stays part of the process's resident set until something asks for
it to be released. A tier that churns (objects evicted as new ones arrive) then grows the
process well past its configured size: filling a 64 MiB tier with 100 KiB objects grew
RSS by 65 MiB in some runs and 82 MiB in others, the difference being freed heap.
C{malloc_trim(0)} releases the free pages of the heap (also those between live
allocations); L{HeapTrimmer} calls it shortly after evictions, at most a few times a
second. Where the C library has no C{malloc_trim} (musl, other systems), nothing happens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["TRIM_DELAY", "HeapTrimmer", "malloc_trim"]

TRIM_DELAY = 0.25
"""Seconds from the first eviction to the trim: evictions in the meantime share it."""


def _find_malloc_trim() -> Callable[[], object] | None:
    """The C library's C{malloc_trim(0)}, or L{None} when it has none."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


malloc_trim = _find_malloc_trim()
"""C{malloc_trim(0)} of this process's C library, or L{None}."""


class HeapTrimmer:
    """
    Calls C{trim} once, L{TRIM_DELAY} seconds after the first of a burst of L{freed}
    calls.

    @param clock: Schedules the trim.
    @param trim: What releases the memory (L{malloc_trim} by default); L{None} to do
        nothing.
    """

    def __init__(
        self, clock: IReactorTime, trim: Callable[[], object] | None = malloc_trim
    ) -> None:
        self._clock = clock
        self._trim = trim
        self._call: IDelayedCall | None = None

    def freed(self) -> None:
        """Objects were dropped: trim soon (once for all drops until then)."""
        if self._trim is not None and self._call is None:
            self._call = self._clock.callLater(TRIM_DELAY, self._run)

    def _run(self) -> None:
        self._call = None
        assert self._trim is not None
        self._trim()

    def stop(self) -> None:
        """Cancel a trim still to come."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
