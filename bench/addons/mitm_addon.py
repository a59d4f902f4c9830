"""
mitmproxy's twin of bench/addons/aproxy_addons.py's SetHeader (C{mitmdump -s THIS}): set
C{X-A: 1} on every response. bench/addon_bench.py compares the two.
"""

from __future__ import annotations

from typing import Any


def response(flow: Any) -> None:
    flow.response.headers["X-A"] = "1"
