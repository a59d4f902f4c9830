"""
bench/cache_bench.py runs: a smoke pass (tiny sizes, no squid; not a timed test) that
checks the report has a row for each part of the cache benchmark.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.benchsmoke import ROOT, smoke_table

SCRIPT = ROOT / "bench" / "cache_bench.py"


class CacheBenchSmokeTests(SynchronousTestCase):
    """bench/cache_bench.py --smoke measures every part for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every part runs against real aproxy processes (wrk, curl and nginx when installed,
        the built-in clients and origin otherwise) and the table has its rows: 100 B hits
        direct, uncached and cached, a disk hit, the slow reader and the memory tier fill.
        """
        out, header, body = smoke_table(self, SCRIPT, 180)
        self.assertNotIn("squid", out)  # --smoke leaves squid out
        self.assertEqual(header, ["scenario", "target", "figure", "ratio", "goal"])
        targets = [(scenario.split(",")[0], target) for scenario, target, *_ in body]
        self.assertEqual(targets[0][0], "100 B keep-alive")
        self.assertTrue(targets[0][1].startswith("direct ("), targets)
        self.assertEqual(
            targets[1:],
            [
                ("100 B keep-alive", "aproxy, no cache"),
                ("100 B keep-alive", "aproxy --cache-memory 256MiB (hits)"),
                ("4 MiB hit", "direct"),
                ("4 MiB hit", "aproxy --cache-dir (disk tier only)"),
                ("16 MiB disk hit", "aproxy --cache-dir"),
                (
                    "8 MiB memory tier filled with 150 distinct 100 KiB objects",
                    "aproxy --cache-memory 8MiB",
                ),
            ],
        )
        by_target = {target: row for _, target, *row in body}
        self.assertRegex(by_target["aproxy --cache-memory 256MiB (hits)"][0], r"^[\d,]+ req/s")
        self.assertRegex(by_target["aproxy --cache-memory 256MiB (hits)"][1], r"x uncached aproxy")
        self.assertRegex(by_target["aproxy --cache-dir (disk tier only)"][0], r"^[\d,]+ MB/s")
        self.assertRegex(by_target["aproxy --cache-dir"][0], r"^RSS start [\d.]+ MiB, max ")
        self.assertRegex(by_target["aproxy --cache-memory 8MiB"][0], r"^RSS [\d.]+ -> [\d.]+ MiB")
