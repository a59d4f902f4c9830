"""The code base stays ruff-clean and mypy-clean (with the mypy_zope plugin)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a tool from this interpreter's environment in the project root."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


class LintTests(SynchronousTestCase):
    """Static checks run as part of the suite, so CI enforces them."""

    def setUp(self) -> None:
        if not (ROOT / "pyproject.toml").exists():
            self.skipTest("not running from a checkout")

    def test_ruff(self) -> None:
        """ruff finds nothing to report and nothing to reformat."""
        if shutil.which("ruff", path=str(Path(sys.executable).parent)) is None:
            self.skipTest("ruff is not installed (pip install '.[test]')")
        check = run("ruff", "check", ".")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        fmt = run("ruff", "format", "--check", ".")
        self.assertEqual(fmt.returncode, 0, fmt.stdout + fmt.stderr)

    def test_mypy(self) -> None:
        """mypy --strict with the mypy_zope plugin passes on aproxy and the tests."""
        result = run("mypy")
        if "No module named mypy" in result.stderr:
            self.skipTest("mypy is not installed (pip install '.[test]')")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
