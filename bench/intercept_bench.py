"""
TLS interception benchmark, part one: how long a new leaf certificate takes (issue #15's
target: p50 <= 1 ms), measured in this process with aproxy's own L{LeafContexts} (the key
of every leaf made once; each new host name one signature and one TLS context).

    python bench/intercept_bench.py [--count N]

Prints a Markdown table. Run it from the checkout with an interpreter that has aproxy's
dependencies (the dev virtualenv's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aproxy.intercept.ca import load_or_create
from aproxy.intercept.leaves import LeafContexts


def main(argv: list[str] | None = None) -> int:
    """Measure COUNT new leaves and COUNT cached lookups; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--count", type=int, default=2000, help="leaves to make (2000)")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="aproxy-intercept-bench-")
    try:
        ca = load_or_create(os.path.join(base, "ca"))
        leaves = LeafContexts(ca, size=args.count + 1)
        names = [f"host{i}.example.com" for i in range(args.count)]
        new = []
        for name in names:
            t0 = time.perf_counter()
            leaves.context_for(name)
            new.append(time.perf_counter() - t0)
        cached = []
        for name in names:
            t0 = time.perf_counter()
            leaves.context_for(name)
            cached.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def row(what: str, samples: list[float], goal: str) -> str:
        cuts = statistics.quantiles(samples, n=100)
        p50, p99 = statistics.median(samples) * 1e3, cuts[98] * 1e3
        return f"| {what} | {len(samples):,} | {p50:.3f} ms | {p99:.3f} ms | {goal} |"

    p50_new = statistics.median(new) * 1e3
    print("# aproxy interception: leaf certificates\n")
    print("| what | count | p50 | p99 | goal |")
    print("|---|---|---|---|---|")
    met = "met" if p50_new <= 1.0 else "**NOT met**"
    print(row("new leaf (sign + TLS context)", new, f"p50 <= 1 ms: {met}"))
    print(row("leaf already made (LRU)", cached, ""))
    return 0 if p50_new <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
