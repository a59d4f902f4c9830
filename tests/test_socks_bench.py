"""
bench/socks_bench.py runs: a smoke pass (tiny sizes, no peers; not a timed test) that
checks the report has a row for each part and target of the SOCKS5 benchmark.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.benchsmoke import ROOT, smoke_table

SCRIPT = ROOT / "bench" / "socks_bench.py"


class SocksBenchSmokeTests(SynchronousTestCase):
    """bench/socks_bench.py --smoke measures both parts for about a second and exits 0."""

    def test_smoke(self) -> None:
        """
        Both parts run against the Python origin and one aproxy process serving HTTP
        CONNECT and SOCKS5, and the table has a row per part and target, with the SOCKS5
        row compared to aproxy's CONNECT.
        """
        out, header, body = smoke_table(self, SCRIPT, 120)
        self.assertNotIn("pproxy", out.split("Commands:")[0])  # --smoke leaves peers out
        self.assertEqual(header, ["part", "target", "figure", "ratio", "goal"])
        parts = [(part.split(" ", 1)[0], target) for part, target, *_ in body]
        targets = ["direct", "aproxy CONNECT", "aproxy SOCKS5"]
        self.assertEqual(parts, [("a.", t) for t in targets] + [("b.", t) for t in targets])
        cells = {(part.split(" ", 1)[0], target): rest for part, target, *rest in body}
        self.assertRegex(cells["a.", "aproxy SOCKS5"][0], r"^[\d,]+ MB/s$")
        self.assertRegex(cells["a.", "aproxy SOCKS5"][1], r"^\d+\.\d\dx aproxy CONNECT")
        self.assertRegex(cells["b.", "aproxy SOCKS5"][0], r"^[\d,]+ conn/s; aproxy CPU ")
