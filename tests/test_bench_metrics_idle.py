"""
bench/metrics_idle.py runs: a short pass with a few idle connections (not a timed test:
it checks that the script measures both kinds of rounds and reports them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "metrics_idle.py"


class MetricsIdleBenchTests(SynchronousTestCase):
    """The idle-connections benchmark starts aproxy with --metrics and measures both cases."""

    def test_short_run(self) -> None:
        """A 1-round pass with 20 idle connections prints both medians and exits 0."""
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        result = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--idle",
                "20",
                "--rounds",
                "1",
                "--seconds",
                "0.5",
                "--connections",
                "2",
                "--max-seconds",
                "60",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=90,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"aproxy from {ROOT}, metrics on", result.stdout)
        for idle in (0, 20):
            self.assertRegex(
                result.stdout,
                re.compile(rf"^{idle} idle connections: [\d,]+ req/s .* us per request", re.M),
            )
        self.assertIn("--metrics tcp:", result.stdout)
