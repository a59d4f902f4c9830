"""
bench/addon_bench.py runs: a smoke pass (tiny sizes, no mitmproxy, no build from before the
addon API; not a timed test) that checks the report has a row for each part of the addon
benchmark, and that the addons it loads do what it says.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from aproxy.addons import Replace
from tests.benchsmoke import ROOT, smoke_table

SCRIPT = ROOT / "bench" / "addon_bench.py"
ADDONS = ROOT / "bench" / "addons" / "aproxy_addons.py"


class AddonBenchSmokeTests(SynchronousTestCase):
    """bench/addon_bench.py --smoke measures every part for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every part runs against real aproxy processes (wrk, curl and nginx when installed,
        the built-in clients and origin otherwise) and the table has its rows: keep-alive
        direct, without and with the header addon; the rewritten download next to direct
        and no addon; the slow reader with and without the rewrite.
        """
        out, header, body = smoke_table(self, SCRIPT, 120)
        self.assertNotIn("mitmproxy", out)  # --smoke leaves mitmproxy out
        self.assertEqual(header, ["scenario", "target", "figure", "ratio", "goal"])
        targets = [(scenario.split(" ", 1)[0], target) for scenario, target, *_ in body]
        self.assertEqual(
            targets,
            [
                ("a.", "direct"),
                ("a.", "aproxy"),
                ("a.", "aproxy+header"),
                ("b.", "direct (a match once a KiB)"),
                ("b.", "aproxy, no addon (the same body)"),
                ("b.", "aproxy+rewrite (Replace fox -> wolf, once a KiB)"),
                ("b.", "aproxy+rewrite (Replace fox -> wolf, every 64 B)"),
                ("c.", "aproxy+rewrite-slow"),
                ("c.", "aproxy-slow"),
            ],
        )
        by_target = {target: row for _, target, *row in body}
        header_row = by_target["aproxy+header"]
        self.assertRegex(header_row[0], r"^[\d,]+ req/s, p50 ")
        self.assertRegex(header_row[1], r"^[\d.]+x no addon; ")
        self.assertRegex(header_row[2], r"^>= 0.85x no addon: ")
        rewrite = by_target["aproxy+rewrite (Replace fox -> wolf, once a KiB)"]
        self.assertRegex(rewrite[0], r"^[\d,]+ MB/s")
        self.assertRegex(rewrite[2], r"^>= 200 MB/s: ")
        self.assertRegex(by_target["aproxy+rewrite-slow"][0], r"^RSS start [\d.]+ MiB, peak ")
        # Each aproxy imported this checkout (the report says where from).
        self.assertIn(f"- aproxy: aproxy from {ROOT}", out)


class BenchAddonsTests(SynchronousTestCase):
    """bench/addons/aproxy_addons.py: the addons the benchmark loads."""

    def load(self) -> SimpleNamespace:
        spec = importlib.util.spec_from_file_location("bench_addons", ADDONS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return SimpleNamespace(SetHeader=module.SetHeader, Rewrite=module.Rewrite)

    def test_set_header(self) -> None:
        """SetHeader sets X-A: 1 on the response."""
        fields: dict[str, str] = {}
        exchange = SimpleNamespace(
            response=SimpleNamespace(fields=SimpleNamespace(set=fields.__setitem__))
        )
        self.load().SetHeader().response(exchange)
        self.assertEqual(fields, {"X-A": "1"})

    def test_rewrite(self) -> None:
        """Rewrite returns a fresh streaming Replace of fox by wolf for each response."""
        addon = self.load().Rewrite()
        first, second = addon.response_body(None), addon.response_body(None)
        self.assertIsInstance(first, Replace)
        self.assertIsNot(first, second)
        out = first.feed(b"a brown f") + first.feed(b"ox.") + first.end()
        self.assertEqual(out, b"a brown wolf.")
