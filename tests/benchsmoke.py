"""
Running one of the benchmark scripts in bench/ in its smoke mode (tiny sizes, not timed)
from a test, and reading the Markdown table it prints: the shared part of the benchmark
smoke tests (tests/test_cache_bench.py, test_intercept_bench.py, test_addon_bench.py,
test_pool_bench.py, test_socks_bench.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell here contains an escaped pipe)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def smoke_table(
    case: SynchronousTestCase, script: Path, timeout: float
) -> tuple[str, list[str], list[list[str]]]:
    """
    Run C{script --smoke} with this checkout on C{PYTHONPATH}; check it exits 0 with no
    failed part. The report, the table's header cells and its rows' cells (each row as
    many as the header). Skips the test when not running from a checkout.
    """
    if not script.exists():
        case.skipTest("not running from a checkout")
    result = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    case.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
    out = result.stdout
    case.assertNotIn("Failed:", out)
    rows = [row_cells(x) for x in out.splitlines() if x.startswith("| ")]
    header, body = rows[0], rows[1:]
    case.assertEqual({len(row) for row in body}, {len(header)})
    return out, header, body
