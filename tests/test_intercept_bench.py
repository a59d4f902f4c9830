"""
bench/intercept_bench.py runs: a smoke pass (tiny sizes, no mitmproxy; not a timed test)
that checks the report has a row for each part of the interception benchmark.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.benchsmoke import ROOT, smoke_table

SCRIPT = ROOT / "bench" / "intercept_bench.py"


class InterceptBenchSmokeTests(SynchronousTestCase):
    """bench/intercept_bench.py --smoke measures every part for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Every part runs against a real TLS origin (nginx when installed, else the Python
        one) and an intercepting aproxy process, and the table has its rows: new and cached
        leaves, keep-alive requests, new connections and a download, each direct and
        through aproxy.
        """
        try:
            import trustme  # noqa: F401
        except ImportError:
            self.skipTest("trustme is not installed (the benchmark makes its origin CA)")
        out, header, body = smoke_table(self, SCRIPT, 120)
        self.assertNotIn("mitmproxy", out)  # --smoke leaves mitmproxy out
        self.assertEqual(header, ["part", "target", "figure", "ratio", "goal"])
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
