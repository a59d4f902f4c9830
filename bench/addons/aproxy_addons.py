"""
The addons bench/addon_bench.py loads into aproxy (C{--addon
bench/addons/aproxy_addons.py:NAME}): L{SetHeader} sets one response header field,
L{Rewrite} replaces a word in every response body as it streams
(L{aproxy.addons.Replace}). bench/addons/mitm_addon.py is L{SetHeader}'s mitmproxy twin.
(Not in bench/programs: it imports aproxy, which the strict type check of the benchmark's
own code leaves out.)
"""

from __future__ import annotations

from typing import Any

from aproxy.addons import Replace

# What Rewrite replaces: a word of addon_bench.py's text bodies, by a longer one (so the
# body's length changes and aproxy re-frames it, as a real rewrite would).
OLD, NEW = "fox", "wolf"


class SetHeader:
    """Set C{X-A: 1} on every response."""

    def response(self, exchange: Any) -> None:
        exchange.response.fields.set("X-A", "1")


class Rewrite:
    """Replace L{OLD} by L{NEW} in every response body, chunk by chunk."""

    def response_body(self, exchange: Any) -> Replace:
        return Replace({OLD: NEW})
