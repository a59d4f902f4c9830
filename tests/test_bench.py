"""
The benchmark in bench/ runs: a smoke pass of every scenario (not a timed test), plus its
target selection and report table on made-up results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "run.py"
PACKAGE = ROOT / "bench" / "aproxybench"
MISSING = "/nonexistent/bench-peer"


def load_bench() -> SimpleNamespace:
    """
    The public names of the benchmark's modules (settings, targets, report, cli) in one
    namespace. bench/aproxybench is not installed nor on sys.path: it is loaded from its
    files once, as the package C{aproxybench}.
    """
    if "aproxybench" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "aproxybench", PACKAGE / "__init__.py", submodule_search_locations=[str(PACKAGE)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package  # its modules import each other through it
        spec.loader.exec_module(package)
    names: dict[str, Any] = {}
    for module in ("settings", "targets", "report", "cli"):
        loaded = importlib.import_module(f"aproxybench.{module}")
        names.update((k, v) for k, v in vars(loaded).items() if not k.startswith("_"))
    return SimpleNamespace(**names)


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell here contains an escaped pipe)."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


class BenchSmokeTests(SynchronousTestCase):
    """bench/run.py --smoke exercises each scenario for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every scenario runs to completion against a real aproxy and the direct origin; a
        peer that is not installed is left out with a line, not a failure.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "bench.json"
            result = subprocess.run(
                [
                    sys.executable,
                    str(SCRIPT),
                    "--smoke",
                    "--targets",
                    "direct,aproxy,squid",
                    "--squid",
                    MISSING,
                    "--json",
                    str(raw),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            data = json.loads(raw.read_text())
        self.assertEqual(data["targets"], ["direct", "aproxy"])
        self.assertIn("squid", data["skipped"])
        for name in ("direct", "aproxy"):
            for key in ("ka", "close", "download", "upload", "idle", "slow_reader"):
                self.assertNotIn("error", data["results"][name][key], (name, key))
            self.assertGreater(data["results"][name]["ka"]["rps"], 0)
        self.assertGreater(data["results"]["aproxy"]["tunnel"]["mbps"], 0)
        if shutil.which("wrk"):
            # The alternating rounds (wrk only): one round each in smoke mode.
            for name in ("direct", "aproxy"):
                for key in ("rounds", "rounds_close"):
                    self.assertEqual(data["results"][name][key]["rounds"], 1, (name, key))
                    self.assertGreater(data["results"][name][key]["rps"], 0, (name, key))
        out = result.stdout
        self.assertIn(f"- squid: skipped, not installed: --squid {MISSING}", out)
        rows = {row_cells(x)[0]: row_cells(x) for x in out.splitlines() if x.startswith("| ")}
        self.assertEqual(sorted(rows), ["aproxy", "direct", "target"])
        header = rows["target"]
        self.assertIn("100 B keep-alive: req/s", header)
        self.assertEqual(len(rows["aproxy"]), len(header))
        self.assertNotIn("failed", rows["aproxy"])
        self.assertTrue(rows["aproxy"][header.index("command")].startswith("`"))
        self.assertIn("100 B keep-alive >= 15,000 requests/s", out)


class BenchTypingTests(SynchronousTestCase):
    """The benchmark's package and programs stay mypy --strict clean, like aproxy's code."""

    def test_mypy(self) -> None:
        """
        mypy --strict finds nothing in bench/aproxybench, its scripts (but
        intercept_bench.py, which imports aproxy) and bench/programs.
        """
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        paths = ["bench/aproxybench", "bench/run.py", "bench/cache_bench.py", "bench/programs"]
        paths += ["bench/addon_bench.py", "bench/addons/mitm_addon.py"]
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "No module named mypy" in result.stderr:
            self.skipTest("mypy is not installed (pip install '.[test]')")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class BenchTargetTests(SynchronousTestCase):
    """Which targets run: --targets, the defaults, and peers that are not installed."""

    def setUp(self) -> None:
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        self.bench = load_bench()

    def select(self, *argv: str) -> tuple[list[str], dict[str, str]]:
        """select_targets for a command line."""
        targets, skipped = self.bench.select_targets(self.bench.parse_args(list(argv)))
        return list(targets), dict(skipped)

    def test_smoke_default(self) -> None:
        """--smoke alone runs direct and aproxy, and says why the peers did not run."""
        targets, skipped = self.select("--smoke")
        self.assertEqual(targets, ["direct", "aproxy"])
        self.assertEqual(sorted(skipped), ["proxypy", "squid", "tinyproxy"])
        self.assertIn("--smoke", skipped["squid"])

    def test_default_without_peers(self) -> None:
        """Without --targets every peer is wanted; those not installed are skipped."""
        missing = ("--squid", MISSING, "--tinyproxy", MISSING, "--proxypy", MISSING)
        targets, skipped = self.select(*missing)
        self.assertEqual(targets, ["direct", "aproxy"])
        self.assertEqual(sorted(skipped), ["proxypy", "squid", "tinyproxy"])
        self.assertIn("not installed", skipped["proxypy"])

    def test_targets_order(self) -> None:
        """--targets keeps the order given, drops repeats, and installed peers stay in."""
        targets, skipped = self.select(
            "--targets", "aproxy-w2,direct,aproxy-w2,squid", "--squid", sys.executable
        )
        self.assertEqual(targets, ["aproxy-w2", "direct", "squid"])
        self.assertEqual(skipped, {})

    def test_unknown_target(self) -> None:
        """An unknown name is a usage error."""
        with open(os.devnull, "w") as devnull:
            stderr, sys.stderr = sys.stderr, devnull
            try:
                self.assertRaises(SystemExit, self.bench.parse_args, ["--targets", "nginx"])
            finally:
                sys.stderr = stderr

    def test_second_build(self) -> None:
        """
        A second aproxy build's option adds the target aproxy-b right after aproxy; with
        --targets it runs only where named.
        """
        targets, _ = self.select("--smoke", "--aproxy-b-checkout", str(ROOT))
        self.assertEqual(targets, ["direct", "aproxy", "aproxy-b"])
        targets, _ = self.select(
            "--targets", "aproxy-b,direct", "--aproxy-cmd-b", "/old/bin/twistd -n aproxy"
        )
        self.assertEqual(targets, ["aproxy-b", "direct"])
        targets, _ = self.select("--targets", "direct,aproxy", "--aproxy-b-checkout", str(ROOT))
        self.assertEqual(targets, ["direct", "aproxy"])

    def test_second_build_needs_its_code(self) -> None:
        """aproxy-b without a command or checkout, or a checkout without aproxy/, is refused."""
        with open(os.devnull, "w") as devnull:
            stderr, sys.stderr = sys.stderr, devnull
            try:
                for argv in (["--targets", "aproxy-b"], ["--aproxy-b-checkout", MISSING]):
                    self.assertRaises(SystemExit, self.bench.parse_args, argv)
            finally:
                sys.stderr = stderr

    def test_second_build_runs_its_own_checkout(self) -> None:
        """
        aproxy-b's PYTHONPATH starts with its checkout and never holds this one, even when
        this one came in with the environment; aproxy keeps this checkout first.
        """
        other = Path(tempfile.mkdtemp()).resolve()
        self.addCleanup(shutil.rmtree, other)
        (other / "aproxy").mkdir()
        inherited = os.pathsep.join([str(ROOT), "/elsewhere"])
        self.patch(os, "environ", {"PYTHONPATH": inherited, "PATH": "/usr/bin"})
        args = self.bench.parse_args(["--aproxy-b-checkout", str(other)])
        argv, env = self.bench.aproxy_argv(args, "aproxy-b", 1234, 80)
        self.assertEqual(env["PYTHONPATH"], os.pathsep.join([str(other), "/elsewhere"]))
        self.assertEqual(argv[:4], [sys.executable, "-m", "twisted", "aproxy"])
        self.assertEqual(argv[argv.index("--connect-ports") + 1], "80")
        _, env = self.bench.aproxy_argv(args, "aproxy", 1234, 80)
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], str(ROOT))
        # A command of its own (an installed build): as given, without this checkout.
        args = self.bench.parse_args(["--aproxy-cmd-b", "/old/bin/twistd -n aproxy -p {port}"])
        argv, env = self.bench.aproxy_argv(args, "aproxy-b", 1234, 80)
        self.assertEqual(argv[:5], ["/old/bin/twistd", "-n", "aproxy", "-p", "1234"])
        self.assertEqual(env["PYTHONPATH"], "/elsewhere")

    def test_time_budget_grows(self) -> None:
        """Each proxy target beyond the first adds to the mode's time budget."""
        args = self.bench.parse_args(["--quick"])
        one = self.bench.settings_for(args, 1).max_seconds
        five = self.bench.settings_for(args, 5).max_seconds
        self.assertEqual(five - one, 4 * self.bench.QUICK.per_target_seconds)


def load_result(rps: float, cpu: float, errors: int = 0) -> dict[str, Any]:
    """A made-up load run."""
    return {
        "rps": rps,
        "p50_ms": 2.5,
        "p99_ms": 4.0,
        "cpu_per_10k": cpu,
        "socket_errors": errors,
        "non_2xx": 0,
    }


def transfer(mbps: float, runs: int = 3) -> dict[str, Any]:
    """A made-up median of large transfers."""
    return {"mbps": mbps, "runs": runs, "rss_growth_mib": 0.5}


class BenchReportTests(SynchronousTestCase):
    """The report's table and target lines, from made-up results."""

    def setUp(self) -> None:
        if not SCRIPT.exists():
            self.skipTest("not running from a checkout")
        self.bench = load_bench()
        self.results: dict[str, dict[str, Any]] = {
            "direct": {"ka": load_result(60000, 0.15), "download": transfer(3000)},
            "aproxy": {
                "rss_start_mib": 50.0,
                "ka": load_result(16000, 0.5),
                "paced": {**load_result(4000, 0.5), "p50_ms": 1.5, "p99_ms": 3.0},
                "rounds": {"rounds": 5, "rps": 18000.0, "p50_ms": 2.5, "p99_ms": 5.0},
                "rounds_close": {"rounds": 5, "rps": 6000.0, "p50_ms": 8.0, "p99_ms": 15.0},
                "close": load_result(6000, 1.4),
                "download": transfer(1200),
                "tunnel": transfer(900),
                "upload": {"error": "upload: status 502"},
                "idle": {"held": 1000, "kib_per_conn": 3.0},
                "slow_reader": {"growth_mib": 0.2, "bytes": 5_000_000},
            },
            "squid": {
                "ka": {**load_result(20000, 0.5), "p99_ms": 3.5},
                "paced": {**load_result(3600, 0.5), "p99_ms": 6.0},
                "rounds": {"rounds": 5, "rps": 12000.0, "p50_ms": 3.5, "p99_ms": 6.25},
                "rounds_close": {"rounds": 5, "rps": 5000.0, "p50_ms": 10.0, "p99_ms": 12.0},
                "close": load_result(7500, 1.4),
                "download": transfer(400),
                "tunnel": transfer(1150),
                "idle": {"held": 1000, "kib_per_conn": 24.0},
            },
            "tinyproxy": {
                "ka": load_result(7000, 1.5, errors=70000),
                "rounds": {"error": "round 2: no request completed"},
            },
            "proxypy": {"download": transfer(6, runs=1), "idle": {"error": "idle phase: exit"}},
        }
        self.names = list(self.results)
        commands = {"aproxy": "python -m twisted aproxy --port tcp:1:interface=127.0.0.1"}
        self.lines = self.bench.table_lines(
            self.names, self.results, self.bench.FULL, {"squid": "Squid 5.7"}, commands
        )
        header = row_cells(self.lines[0])
        self.rows = {
            row_cells(x)[0]: dict(zip(header, row_cells(x), strict=True)) for x in self.lines[2:]
        }

    def test_row_per_target(self) -> None:
        """One header, one separator, then a row per target in order, each full width."""
        self.assertEqual([row_cells(x)[0] for x in self.lines[2:]], self.names)
        widths = {len(row_cells(x)) for x in self.lines}
        self.assertEqual(widths, {len(row_cells(self.lines[0]))})

    def test_ratios_against_squid(self) -> None:
        """aproxy's cells carry aproxy / squid; the peers' do not."""
        aproxy = self.rows["aproxy"]
        self.assertEqual(aproxy["100 B keep-alive: req/s"], "16,000 (0.80x)")
        self.assertEqual(aproxy["100 B Connection: close: req/s"], "6,000 (0.80x)")
        self.assertEqual(aproxy["keep-alive CPU s / 10k req"], "0.500 (1.00x)")
        self.assertEqual(aproxy["100 MiB plain download, MB/s"], "1,200 (3.00x)")
        self.assertEqual(aproxy["RSS per idle conn, KiB"], "3.00 (0.12x)")
        self.assertEqual(self.rows["squid"]["100 B keep-alive: req/s"], "20,000")
        paced = "paced keep-alive: req/s, p50 / p99 ms"
        self.assertEqual(aproxy[paced], "4,000, 1.50 / 3.00 (0.50x)")
        self.assertEqual(self.rows["squid"][paced], "3,600, 2.50 / 6.00")
        self.assertEqual(self.rows["direct"][paced], "-")
        rounds = "keep-alive, 5 alternating rounds: req/s, p50 / p99 ms (medians)"
        self.assertEqual(aproxy[rounds], "18,000 (1.50x), 2.50 / 5.00 (0.80x)")
        self.assertEqual(self.rows["squid"][rounds], "12,000, 3.50 / 6.25")
        self.assertEqual(self.rows["tinyproxy"][rounds], "failed")
        self.assertEqual(self.rows["direct"][rounds], "-")
        closing = "Connection: close, 5 alternating rounds: req/s, p50 / p99 ms (medians)"
        self.assertEqual(aproxy[closing], "6,000 (1.20x), 8.00 / 15.00 (1.25x)")
        self.assertEqual(self.rows["squid"][closing], "5,000, 10.00 / 12.00")

    def test_failed_and_missing_cells(self) -> None:
        """A failed scenario says so; one not measured is '-'; errors and single runs show."""
        self.assertEqual(self.rows["aproxy"]["100 MiB upload (POST body), MB/s"], "failed")
        self.assertEqual(self.rows["proxypy"]["RSS per idle conn, KiB"], "failed")
        self.assertEqual(self.rows["proxypy"]["100 MiB plain download, MB/s"], "6 (1 run)")
        self.assertEqual(self.rows["proxypy"]["100 B keep-alive: req/s"], "-")
        self.assertEqual(
            self.rows["tinyproxy"]["100 B keep-alive: req/s"], "7,000 [70,000 sock err]"
        )
        self.assertEqual(
            self.rows["direct"]["100 MiB CONNECT tunnel download, MB/s"], "n/a (no proxy)"
        )
        self.assertEqual(self.rows["squid"]["version"], "Squid 5.7")

    def test_no_ratios_without_squid(self) -> None:
        """Without a squid row aproxy's cells are plain figures."""
        del self.results["squid"]
        lines = self.bench.table_lines(
            ["aproxy"], self.results, self.bench.FULL, {}, {"aproxy": "x"}
        )
        self.assertEqual(row_cells(lines[2])[1], "16,000")

    def test_goal_lines(self) -> None:
        """The project's targets for aproxy rows: met, NOT met, failed; none for peers."""
        lines = self.bench.goal_lines("aproxy", self.results, self.bench.FULL)
        text = "\n".join(lines)
        self.assertIn(
            "100 B keep-alive >= 15,000 requests/s through one aproxy process: 16,000 (met)", text
        )
        self.assertIn("CONNECT tunnel download >= 1,000 MB/s: 900 (NOT met)", text)
        self.assertIn("upload (plain forwarded POST body) >= 1,000 MB/s: failed (NOT met)", text)
        self.assertIn("RSS per idle keep-alive connection <= 4 KiB: 3.00 (met)", text)
        # p99 against squid's in the same run, unpaced and paced.
        self.assertIn("keep-alive p99 <= squid's (3.50 ms, same run): 4.00 (NOT met)", text)
        self.assertIn("paced keep-alive p99 <= squid's (6.00 ms, same run): 3.00 (met)", text)
        # The medians of the alternating rounds, against squid's.
        self.assertIn(
            "keep-alive requests/s >= squid's, median of 5 alternating rounds (12,000): "
            "18,000 (met)",
            text,
        )
        self.assertIn(
            "Connection: close requests/s >= squid's, median of 5 alternating rounds (5,000): "
            "6,000 (met)",
            text,
        )
        self.assertIn(
            "keep-alive (median of 5 alternating rounds) p99 <= squid's (6.25 ms, same run): "
            "5.00 (met)",
            text,
        )
        self.assertEqual(self.bench.goal_lines("squid", self.results, self.bench.FULL), [])

    def test_second_build(self) -> None:
        """
        aproxy-b has a row like aproxy's (ratios to squid), and the two builds are compared
        by the medians of the alternating rounds: keep-alive, close, tunnel, p99.
        """
        self.results["aproxy"]["rounds_tunnel"] = {"rounds": 5, "mbps": 1940.0}
        self.results["aproxy-b"] = {
            "ka": load_result(17000, 0.5),
            "rounds": {"rounds": 5, "rps": 18500.0, "p50_ms": 2.5, "p99_ms": 4.0},
            "rounds_close": {"error": "round 3: no request completed"},
            "rounds_tunnel": {"rounds": 5, "mbps": 2000.0},
        }
        names = ["direct", "aproxy", "aproxy-b", "squid"]
        command = "PYTHONPATH=/old python -m twisted aproxy"
        lines = self.bench.table_lines(
            names, self.results, self.bench.FULL, {}, {"aproxy-b": command}
        )
        header = row_cells(lines[0])
        rows = {row_cells(x)[0]: dict(zip(header, row_cells(x), strict=True)) for x in lines[2:]}
        self.assertEqual(list(rows), names)
        old = rows["aproxy-b"]
        self.assertEqual(old["100 B keep-alive: req/s"], "17,000 (0.85x)")
        rounds = "keep-alive, 5 alternating rounds: req/s, p50 / p99 ms (medians)"
        self.assertEqual(old[rounds], "18,500 (1.54x), 2.50 / 4.00 (0.64x)")
        self.assertEqual(old["command"], f"`{command}`")
        text = "\n".join(self.bench.build_lines(self.results, self.bench.FULL))
        self.assertIn("- keep-alive requests/s: aproxy 18,000, aproxy-b 18,500: change -2.7%", text)
        self.assertIn("- Connection: close requests/s: failed", text)
        self.assertIn(
            "- CONNECT tunnel download MB/s: aproxy 1,940, aproxy-b 2,000: change -3.0%", text
        )
        self.assertIn(
            "- keep-alive p99 ms (lower is better): aproxy 5.00, aproxy-b 4.00: change +25.0%",
            text,
        )
        del self.results["aproxy-b"]
        self.assertEqual(self.bench.build_lines(self.results, self.bench.FULL), [])
