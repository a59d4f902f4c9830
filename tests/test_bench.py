"""The benchmark in bench/ runs: a smoke pass of every scenario (not a timed test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class BenchSmokeTests(SynchronousTestCase):
    """bench/run.py --smoke exercises each scenario for about a second and exits 0."""

    def test_smoke(self) -> None:
        """Every benchmark scenario runs to completion against a real aproxy."""
        script = ROOT / "bench" / "run.py"
        if not script.exists():
            self.skipTest("not running from a checkout")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        result = subprocess.run(
            [sys.executable, str(script), "--smoke"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("requests/s", result.stdout)
