"""
bench/pool_bench.py runs: a smoke pass (1 s load runs, one round; not a timed test) that
checks the report has a row per target and that each pool spread its requests as its
strategy says.
"""

from __future__ import annotations

import re
import shutil

from twisted.trial.unittest import SynchronousTestCase

from tests.benchsmoke import ROOT, smoke_table

SCRIPT = ROOT / "bench" / "pool_bench.py"


def tool(name: str) -> str | None:
    """A tool on PATH or in /usr/sbin (nginx is there on Debian)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class PoolBenchSmokeTests(SynchronousTestCase):
    """bench/pool_bench.py --smoke measures every target for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        An nginx origin, one nginx parent on two ports and four aproxy processes (no
        parent, the single parent, an C{rr} and a C{client} pool of the two ports), all on
        loopback: a row each with req/s and, through aproxy, its CPU; the single parent
        takes every request on P1, C{rr} splits them evenly, C{client} keeps this one
        client on one member.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        for name in ("nginx", "wrk"):
            if tool(name) is None:
                self.skipTest(f"{name} is not installed (the benchmark's parent and load)")
        _, header, body = smoke_table(self, SCRIPT, 120)
        self.assertEqual(header, ["target", "figure", "ratio", "goal", "requests per member"])
        targets = [row[0] for row in body]
        self.assertEqual(
            targets,
            [
                "direct (client -> origin)",
                "aproxy, no parent",
                "aproxy --upstream P1 (single parent)",
                "aproxy --upstream 'rr:P1,P2' (pool)",
                "aproxy --upstream 'client:P1,P2' (pool)",
            ],
        )
        by = {row[0].split(" (")[0]: row for row in body}
        self.assertRegex(by["direct"][1], r"^[\d,]+ req/s, p50 ")
        single = by["aproxy --upstream P1"]
        self.assertRegex(single[1], r"^[\d,]+ req/s, .*aproxy [\d.]+ CPU s / 10k, parent ")
        self.assertRegex(single[4], r"^P1 [\d,]+ / P2 0 ")
        rr = by["aproxy --upstream 'rr:P1,P2'"]
        self.assertRegex(rr[2], r"^[\d.]+x single")
        self.assertRegex(rr[3], r"^>= 0.95x single: ")
        p1, p2 = (int(x.replace(",", "")) for x in re.findall(r"P\d ([\d,]+)", rr[4]))
        self.assertGreater(p1 + p2, 0)
        self.assertLessEqual(abs(p1 - p2), max(2, (p1 + p2) // 100))  # rr alternates
        client = by["aproxy --upstream 'client:P1,P2'"]
        counts = [int(x.replace(",", "")) for x in re.findall(r"P\d ([\d,]+)", client[4])]
        self.assertEqual(sorted(counts)[0], 0)  # one client address: one member
