"""
bench/cache_bench.py runs: a smoke pass (tiny sizes, no squid; not a timed test) that
checks the report has a row for each part of the cache benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "cache_bench.py"


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell here contains an escaped pipe)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


class CacheBenchSmokeTests(SynchronousTestCase):
    """bench/cache_bench.py --smoke measures every part for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every part runs against real aproxy processes (wrk, curl and nginx when installed,
        the built-in clients and origin otherwise) and the table has its rows: 100 B hits
        direct, uncached and cached, a disk hit, the slow reader and the memory tier fill.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--smoke"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        out = result.stdout
        self.assertNotIn("Failed:", out)
        self.assertNotIn("squid", out)  # --smoke leaves squid out
        rows = [row_cells(x) for x in out.splitlines() if x.startswith("| ")]
        header, body = rows[0], rows[1:]
        self.assertEqual(header, ["scenario", "target", "figure", "ratio", "goal"])
        self.assertEqual({len(row) for row in body}, {len(header)})
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
