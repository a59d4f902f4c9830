"""
RFC 5861's stale responses, and the client directives that rule them out.

Serving stale while revalidating (section 3, C{stale-while-revalidate}): within the window
a stored response names, a stale object is answered at once while one request
revalidates it in the background (see L{aproxy.client.background}), so clients don't wait
for the origin and the next ones get the refreshed object. Serving stale in place of an
origin's server error (section 4, C{stale-if-error}): L{stale_if_error}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aproxy.cache import rules
from aproxy.client.stages import StageRequest

__all__ = [
    "MAX_BACKGROUND",
    "SERVER_ERRORS",
    "Revalidations",
    "client_limits",
    "client_refresh",
    "stale_if_error",
]

MAX_BACKGROUND = 32
"""Background revalidations at once, per process; past it, stale objects are validated
the usual way (the client waits)."""


def client_refresh(fields: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the client itself asked for a fresh response (C{no-cache}, or C{Pragma})."""
    cc = rules.parse_cache_control(fields)
    if cc:
        return "no-cache" in cc or cc.get("max-age") == "0"
    return _pragma_no_cache(fields)


def client_limits(fields: Sequence[tuple[bytes, bytes]]) -> bool:
    """
    Whether the client said how fresh a response must be (C{max-age}, C{min-fresh},
    C{max-stale}, C{no-cache}, C{only-if-cached}, or C{Pragma: no-cache}): then a stale
    object is not served in its place, whatever the stored response allows (RFC 9111
    section 5.2.1).
    """
    cc = rules.parse_cache_control(fields)
    if cc:
        return any(d in cc for d in _LIMITS)
    return _pragma_no_cache(fields)


def _pragma_no_cache(fields: Sequence[tuple[bytes, bytes]]) -> bool:
    """C{Pragma: no-cache}, which counts when there is no C{Cache-Control} (section 5.4)."""
    return any(name.lower() == b"pragma" and b"no-cache" in value.lower() for name, value in fields)


_LIMITS = ("max-age", "min-fresh", "max-stale", "no-cache", "only-if-cached")


class Revalidations:
    """
    The background revalidations in flight: at most one per stored variant (its key and
    its C{Vary} key), and L{MAX_BACKGROUND}.

    @ivar start: Starts the revalidation of a request, calling the function it is given
        when that ends, and says whether it started; set by the proxy that owns the cache
        (L{None}: never serve stale while revalidating).
    @ivar running: The variants being revalidated.
    """

    def __init__(self) -> None:
        self.start: Callable[[StageRequest, Callable[[], None]], bool] | None = None
        self.running: set[bytes] = set()

    def serve_stale(
        self, request: StageRequest, key: bytes, fresh: rules.Freshness, age: float, plain: bool
    ) -> bool:
        """
        Whether a stale object may be answered now, while it is revalidated in the
        background: its C{stale-while-revalidate} window is not over, nothing forbids
        serving it stale, and the client set no limit (L{client_limits}). Starts the
        revalidation unless one is running for C{key} (the variant's).
        """
        start = self.start
        if (
            start is None
            or age >= fresh.lifetime + fresh.swr
            or fresh.no_stale
            or fresh.no_cache
            or (not plain and client_limits(request.head.fields))
        ):
            return False
        if key in self.running:
            return True
        if len(self.running) >= MAX_BACKGROUND:
            return False
        self.running.add(key)
        if start(request, lambda: self.running.discard(key)):
            return True
        self.running.discard(key)
        return False


SERVER_ERRORS = frozenset({500, 502, 503, 504})
"""The statuses RFC 5861 section 4 counts as errors for C{stale-if-error}."""


def stale_if_error(
    fields: Sequence[tuple[bytes, bytes]], fresh: rules.Freshness, age: float
) -> bool:
    """
    Whether a stale object may answer in place of an origin's server error (RFC 5861
    section 4): the stored response's or the request's C{stale-if-error} window covers
    its staleness, and nothing forbids serving it stale (the response's C{no-cache},
    C{must-revalidate}, C{proxy-revalidate} or C{s-maxage}; a client's freshness limit).
    """
    if fresh.no_stale or fresh.no_cache or client_limits(fields):
        return False
    asked = rules.delta_seconds(rules.parse_cache_control(fields).get("stale-if-error"))
    window = max(fresh.sie, asked or 0)
    return window > 0 and age - fresh.lifetime <= window
