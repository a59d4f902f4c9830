"""
bench/intercept_bench.py runs: a smoke pass (tiny sizes, no mitmproxy; not a timed test)
that checks the report has a row for each part of the interception benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "intercept_bench.py"


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell here contains an escaped pipe)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


class InterceptBenchSmokeTests(SynchronousTestCase):
    """bench/intercept_bench.py --smoke measures every part for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every part runs against a real TLS origin (nginx when installed, else the Python
        one) and an intercepting aproxy process, and the table has its rows: new and cached
        leaves, keep-alive requests, new connections and a download, each direct and
        through aproxy.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        try:
            import trustme  # noqa: F401
        except ImportError:
            self.skipTest("trustme is not installed (the benchmark makes its origin CA)")
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--smoke"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        out = result.stdout
        self.assertNotIn("Failed:", out)
        self.assertNotIn("mitmproxy", out)  # --smoke leaves mitmproxy out
        rows = [row_cells(x) for x in out.splitlines() if x.startswith("| ")]
        header, body = rows[0], rows[1:]
        self.assertEqual(header, ["part", "target", "figure", "ratio", "goal"])
        self.assertEqual({len(row) for row in body}, {len(header)})
        parts = [(part.split(" ", 1)[0], target) for part, target, *_ in body]
        self.assertEqual(
            parts,
            [
                ("leaf", "new leaf (sign + TLS context)"),
                ("leaf", "leaf already made (LRU)"),
                ("a.", "direct"),
                ("a.", "aproxy"),
                ("b.", "direct"),
                ("b.", "aproxy"),
                ("c.", "direct"),
                ("c.", "aproxy"),
            ],
        )
        figures = {(part.split(" ", 1)[0], target): figure for part, target, figure, *_ in body}
        self.assertRegex(figures["a.", "aproxy"], r"^[\d,]+ req/s; aproxy CPU ")
        self.assertRegex(figures["b.", "aproxy"], r"^[\d,]+ conn/s; aproxy CPU ")
        self.assertRegex(figures["c.", "aproxy"], r"^[\d,]+ MB/s$")
