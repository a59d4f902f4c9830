"""
bench/socks_bench.py runs: a smoke pass (tiny sizes, no peers; not a timed test) that
checks the report has a row for each part and target of the SOCKS5 benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "socks_bench.py"


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell here contains an escaped pipe)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


class SocksBenchSmokeTests(SynchronousTestCase):
    """bench/socks_bench.py --smoke measures both parts for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Both parts run against the Python origin and one aproxy process serving HTTP
        CONNECT and SOCKS5, and the table has a row per part and target, with the SOCKS5
        row compared to aproxy's CONNECT.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
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
        self.assertNotIn("pproxy", out.split("Commands:")[0])  # --smoke leaves peers out
        rows = [row_cells(x) for x in out.splitlines() if x.startswith("| ")]
        header, body = rows[0], rows[1:]
        self.assertEqual(header, ["part", "target", "figure", "ratio", "goal"])
        self.assertEqual({len(row) for row in body}, {len(header)})
        parts = [(part.split(" ", 1)[0], target) for part, target, *_ in body]
        targets = ["direct", "aproxy CONNECT", "aproxy SOCKS5"]
        self.assertEqual(parts, [("a.", t) for t in targets] + [("b.", t) for t in targets])
        cells = {(part.split(" ", 1)[0], target): rest for part, target, *rest in body}
        self.assertRegex(cells["a.", "aproxy SOCKS5"][0], r"^[\d,]+ MB/s$")
        self.assertRegex(cells["a.", "aproxy SOCKS5"][1], r"^\d+\.\d\dx aproxy CONNECT")
        self.assertRegex(cells["b.", "aproxy SOCKS5"][0], r"^[\d,]+ conn/s; aproxy CPU ")
