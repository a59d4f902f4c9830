#!/usr/bin/env python3
"""
aproxy's addon API (issue #16) measured, in one run, next to a direct connection, aproxy
before the addon API (C{--before DIR}, a checkout of the commit before it) and mitmproxy.

  a. 100-byte keep-alive GETs (wrk, 1 thread, 50 connections; the Python load client when
     wrk is missing), in alternating rounds over: direct to the origin; aproxy before the
     addon API (with C{--before}); aproxy with no addon; aproxy with one addon that sets a
     response header (bench/addons/aproxy_addons.py:SetHeader); mitmproxy with the same addon
     (bench/addons/mitm_addon.py), each round starting with the next target; medians
     of requests/s and of the proxy's CPU per request. Goals: no addon no worse than
     before within the rounds' noise; the header addon >= 0.85x no addon and >= 10x
     mitmproxy.
  b. A 100 MiB text body rewritten as it streams (an addon whose C{response_body} returns
     C{aproxy.addons.Replace}: "fox" becomes "wolf", so the body is re-framed chunked),
     downloaded with curl, MB/s of the origin's body (10^6 B/s), median; the same body
     through aproxy with no addon and direct, alternating. The body has a match once a
     KiB (goal: >= 200 MB/s); the same rewrite of a body with a match every 64 bytes is
     measured too (the cost per match).
  c. A 1 GiB text body (a match every 64 bytes) through the rewriting addon (a fresh
     aproxy) read by a slow-ish client (64 KiB receive buffer, paced to 20 MB/s, for
     10 s): the proxy's RSS sampled meanwhile, start and peak; the same through aproxy
     with no addon. Goal: flat (peak - start <= 2 MiB).

The origin is nginx (bench/templates/nginx.conf) when installed, else
bench/programs/origin.py. aproxy runs as C{sys.executable -m twisted aproxy} with
C{PYTHONPATH} set to C{--checkout} (this checkout by default) or C{--before}; which copy of
aproxy each imports is checked and reported. mitmproxy runs when C{mitmdump} is found
(C{--mitmdump}, PATH, /tmp/venv-mitm/bin). Everything listens on 127.0.0.1; each child
runs in its own process group and is killed at the end (also on errors, Ctrl-C and the
time budget), and the temp dir is removed.

C{--quick} shortens every part (about 90 s); C{--smoke} uses tiny sizes and no mitmproxy
(about 15 s, for the test suite). Only the Python standard library is used, plus the
helpers in bench/aproxybench.

Usage: python bench/addon_bench.py [--quick | --smoke] [--checkout DIR] [--before DIR]
       [--mitmdump PATH | --no-mitmproxy] [--no-wrk] [--no-curl] [--no-nginx] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aproxybench.httpio import Target
from aproxybench.issuebench import IssueBench, clients, fetch, median, met, mitmdump, run_main
from aproxybench.loads import download, load, slow_reader
from aproxybench.procs import Child, free_port, log, tool_output
from aproxybench.settings import (
    BENCH_DIR,
    CHECKOUT,
    DISTURBED_SHARE,
    LOOPBACK,
    MIB,
    PROGRAMS,
    SMOKE,
)

SMALL_BODY = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes
# The text bodies are 64-byte lines; the rewrite (bench/addons/aproxy_addons.py) replaces OLD by
# NEW, one byte longer. A sparse body has OLD in one line of 16 (once a KiB, more like a
# word rewritten in a page), a dense one in every line (each 64 bytes a match: what a
# transformer costs per match).
LINE = b"The quick brown fox jumps over the lazy dog, aproxy streams it.\n"
OLD, NEW = b"fox", b"wolf"
OTHER = LINE.replace(OLD, b"cat")
EVERY = {"sparse": 16, "dense": 1}  # a match every N lines
ADDONS = BENCH_DIR / "addons" / "aproxy_addons.py"
MITM_ADDON = BENCH_DIR / "addons" / "mitm_addon.py"
# RSS growth while the slow client reads that still counts as flat (c): run.py's and
# cache_bench.py's slow-reader target.
FLAT_MIB = 2.0
# Goals (issue #16).
ADDON_RATIO = 0.85  # header addon / no addon, keep-alive requests/s
MITM_RATIO = 10.0  # header addon / mitmproxy with the same addon
REWRITE_MBPS = 200.0


@dataclass(frozen=True)
class Mode:
    """How long and how big each part is (full run, --quick or --smoke)."""

    name: str
    wrk_seconds: float  # a: each load run
    connections: int
    rounds: int
    big_bytes: int  # b: the rewritten download
    downloads: int  # b: per target (median)
    huge_bytes: int  # c: the slow reader's body
    slow_seconds: float
    slow_rate: int  # c: the reader's pace, B/s
    max_seconds: int  # time budget of the whole run
    mitmproxy: bool


FULL = Mode("full", 5, 50, 5, 100 * MIB, 5, 1024 * MIB, 10, 20_000_000, 600, True)
QUICK = Mode("quick", 2, 50, 3, 100 * MIB, 3, 1024 * MIB, 4, 20_000_000, 240, True)
SMOKE_MODE = Mode("smoke", 1, 10, 1, 4 * MIB, 1, 16 * MIB, 1, 4_000_000, 90, False)


def size_name(n: int) -> str:
    """A size as a short label: 100 MiB, 1 GiB."""
    return f"{n >> 30} GiB" if n >= 1 << 30 and n % (1 << 30) == 0 else f"{n // MIB} MiB"


def text_block(kind: str) -> bytes:
    """1 MiB of a C{sparse} or C{dense} text body (see L{EVERY})."""
    every = EVERY[kind]
    return (OTHER * (every - 1) + LINE) * (MIB // len(LINE) // every)


def rewritten_size(n: int, kind: str) -> int:
    """The length of an C{n}-byte C{kind} text body (whole MiB) once OLD is NEW in it."""
    return n + n // len(LINE) // EVERY[kind] * (len(NEW) - len(OLD))


class AddonBench(IssueBench):
    """One run: origin, the aproxy processes and mitmproxy, the rows, problems, failures."""

    title = "aproxy addon benchmark"
    prefix = "aproxy-addon-bench-"

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        super().__init__(args, mode)
        self.mode: Mode = mode
        # aproxybench.loads reads the load's duration from these settings, the client's
        # shape (wrk, connections, threads) and curl from args.
        self.settings = replace(
            SMOKE,
            wrk_seconds=mode.wrk_seconds,
            slow_seconds=mode.slow_seconds,
            slow_rate=mode.slow_rate,
        )
        self.big = {kind: f"/{kind}{mode.big_bytes // MIB}m" for kind in EVERY}
        self.huge = f"/dense{mode.huge_bytes // MIB}m"

    # ---- processes

    def write_files(self) -> None:
        """100 B, and the text bodies (whole LINEs, so their rewritten length is known)."""
        self.data.mkdir()
        os.chmod(self.data, 0o755)
        (self.data / "100b").write_bytes(SMALL_BODY)
        files = [(path, kind, self.mode.big_bytes) for kind, path in self.big.items()]
        files.append((self.huge, "dense", self.mode.huge_bytes))
        for path, kind, size in files:
            block = text_block(kind)
            with open(self.data / path.lstrip("/"), "wb") as f:
                for _ in range(size // MIB):
                    f.write(block)
        for p in self.data.iterdir():
            os.chmod(p, 0o644)

    def start_origin(self) -> None:
        """nginx when installed, else the Python origin, serving the files."""
        self.write_files()
        self.origin_port = free_port()
        argv = self.nginx_argv("nginx.conf", data=self.data, location="")
        if argv:
            self.origin_kind = "nginx (1 worker)"
        else:
            argv = [sys.executable, str(PROGRAMS / "origin.py"), str(self.origin_port)]
            argv.append(str(self.data))
            self.origin_kind = "Python asyncio origin (bench/programs/origin.py)"
        self.commands["origin"] = shlex.join(argv)
        self.origin = Child("origin", argv, logfile=self.tmp / "origin.log", cwd=self.tmp)
        self.wait_ready(self.origin, self.direct())
        log(f"origin: {self.origin_kind}, pid {self.origin.pid}, {LOOPBACK}:{self.origin_port}")

    def start_mitmproxy(self) -> tuple[Child, Target] | None:
        """mitmdump with the header addon, or None when it is not found or not wanted."""
        if not self.mode.mitmproxy or self.args.no_mitmproxy:
            return None
        exe = self.args.mitmdump
        if not exe:
            self.problems.append("mitmdump not found (--mitmdump PATH): no mitmproxy row")
            return None
        port = free_port()
        work = self.tmp / "mitmproxy"
        work.mkdir()
        argv = [exe, "--listen-host", LOOPBACK, "--listen-port", str(port)]
        argv += ["-s", str(MITM_ADDON), "--set", f"confdir={work}", "-q"]
        self.commands["mitmproxy+header"] = shlex.join(argv)
        self.versions["mitmproxy"] = tool_output([exe, "--version"])
        child = Child("mitmproxy+header", argv, logfile=work / "output.log", cwd=work)
        t = Target("mitmproxy+header", port, self.origin_port, True)
        self.wait_ready(child, t)
        log(f"mitmproxy+header: pid {child.pid}, {LOOPBACK}:{port}")
        return child, t

    def check_header(self, t: Target) -> None:
        """The header addon's proxies must answer with X-A: 1."""
        status, headers, _ = fetch(t.port, t.target("/100b"), t.host)
        if status != 200 or headers.get("x-a") != "1":
            raise RuntimeError(f"{t.name}: /100b answered {status} without X-A: 1 ({headers})")

    def check_rewrite(self, t: Target) -> None:
        """The rewriting proxy must answer a text body with every OLD made NEW."""
        path = self.big["sparse"]
        status, _, body = fetch(t.port, t.target(path), t.host, keep=True)
        want = (text_block("sparse") * (self.mode.big_bytes // MIB)).replace(OLD, NEW)
        if status != 200 or body != want:
            raise RuntimeError(
                f"{t.name}: {path} answered {status}, {len(body)} bytes, not the "
                f"{len(want)} bytes rewritten"
            )

    # ---- a. keep-alive rounds

    def keepalive(self) -> None:
        """Part a: alternating keep-alive rounds over every target."""
        assert self.origin is not None
        running: list[tuple[Child | None, Target]] = [(None, self.direct())]
        try:
            if self.args.before:
                running.append(self.start_aproxy("aproxy-before", [], self.args.before))
            running.append(self.start_aproxy("aproxy", []))
            header = self.start_aproxy("aproxy+header", ["--addon", f"{ADDONS}:SetHeader"])
            running.append(header)
            self.check_header(header[1])
            mitm = self.start_mitmproxy()
            if mitm:
                running.append(mitm)
                self.check_header(mitm[1])
            runs: dict[str, list[dict[str, Any]]] = {t.name: [] for _, t in running}
            for r in range(self.mode.rounds):
                # Rotate who goes first, so no target always runs right after another.
                order = running[r % len(running) :] + running[: r % len(running)]
                for child, t in order:
                    one = load(
                        t,
                        "/100b",
                        False,
                        child.pid if child else self.origin.pid,
                        self.settings,
                        self.args,
                        self.tmp,
                        origin_pid=self.origin.pid if child else None,
                    )
                    self.check_load(t.name, r, one)
                    runs[t.name].append(one)
                    log(
                        f"round {r + 1} {t.name}: {one['rps']:,.0f} req/s, "
                        f"p50 {one['p50_ms']:.2f} / p99 {one['p99_ms']:.2f} ms"
                    )
        finally:
            for child, _ in running:
                if child:
                    self.stop(child)
        self.keepalive_rows(runs)

    def check_load(self, name: str, r: int, one: dict[str, Any]) -> None:
        """Socket errors, non-2xx answers and a disturbed machine are problems."""
        noise = one.get("unattributed")
        if isinstance(noise, float) and noise > DISTURBED_SHARE:
            self.problems.append(
                f"{name} round {r + 1}: {noise:.0%} of all CPUs were busy with work not "
                "charged to wrk, the origin or the proxy: other work disturbed this run"
            )
        if one.get("socket_errors") or one.get("non_2xx"):
            self.problems.append(
                f"{name} round {r + 1}: {one['socket_errors']} socket errors, "
                f"{one['non_2xx']} non-2xx answers of {one['requests']}"
            )

    def keepalive_rows(self, runs: dict[str, list[dict[str, Any]]]) -> None:
        """Part a's rows: medians, and the goals' ratios (with the per-round ratios)."""
        rps = {name: [x["rps"] for x in xs] for name, xs in runs.items()}
        med = {name: median(xs) for name, xs in rps.items()}
        # The proxy's CPU per request moves much less than requests/s on a busy machine.
        cpu = {
            name: median([x["cpu_per_10k"] for x in xs if x.get("cpu_per_10k") is not None])
            for name, xs in runs.items()
            if name != "direct"
        }
        tool = "wrk" if self.args.wrk else "Python load client"
        scenario = (
            f"a. 100 B keep-alive, {tool} {self.args.connections} conns x "
            f"{self.mode.wrk_seconds:g} s, median of {self.mode.rounds} alternating rounds"
        )

        def per_round(a: str, b: str) -> list[float]:
            return [x / y for x, y in zip(rps[a], rps[b], strict=True)]

        def spread(ratios: list[float]) -> str:
            if len(ratios) < 2:
                return ""
            return f" (rounds {min(ratios):.2f}-{max(ratios):.2f})"

        for name, xs in runs.items():
            m = median([x["p50_ms"] for x in xs]), median([x["p99_ms"] for x in xs])
            figure = f"{med[name]:,.0f} req/s, p50 {m[0]:.2f} / p99 {m[1]:.2f} ms"
            if name in cpu:
                figure += f", {cpu[name]:.3f} CPU s / 10k req"
            ratios, goals = [], []
            if name != "direct":
                ratios.append(f"{med[name] / med['direct']:.2f}x direct")
            if name == "aproxy" and "aproxy-before" in med:
                rounds = per_round("aproxy", "aproxy-before")
                x = med["aproxy"] / med["aproxy-before"]
                ratios.insert(0, f"{x:.2f}x aproxy-before{spread(rounds)}")
                ratios.insert(1, f"CPU per request {cpu['aproxy'] / cpu['aproxy-before']:.2f}x")
                # Within the noise: the per-round ratios reach 1, or the median is within
                # half their spread of it.
                noise = (max(rounds) - min(rounds)) / 2
                ok = max(rounds) >= 1.0 or x + noise >= 1.0
                goals.append(met("no worse than before within the rounds' noise", ok))
            if name == "aproxy+header":
                rounds = per_round("aproxy+header", "aproxy")
                x = med["aproxy+header"] / med["aproxy"]
                ratios.insert(0, f"{x:.2f}x no addon{spread(rounds)}")
                ratios.insert(1, f"CPU per request {cpu['aproxy+header'] / cpu['aproxy']:.2f}x")
                goals.append(met(f">= {ADDON_RATIO:g}x no addon", x >= ADDON_RATIO))
                if "mitmproxy+header" in med:
                    y = med["aproxy+header"] / med["mitmproxy+header"]
                    ratios.insert(1, f"{y:.1f}x mitmproxy+header")
                    goals.append(met(f">= {MITM_RATIO:g}x mitmproxy", y >= MITM_RATIO))
            self.rows.append((scenario, name, figure, "; ".join(ratios), "; ".join(goals)))

    # ---- b. the rewritten download

    def rewrite_download(self) -> None:
        """
        Part b: the sparse body direct, through aproxy and rewritten, and the dense body
        rewritten, in alternating turns.
        """
        assert self.origin is not None
        size = self.mode.big_bytes
        direct = self.direct()
        started: list[Child] = []
        try:
            plain = self.start_aproxy("aproxy", [])
            started.append(plain[0])
            rewrite = self.start_aproxy("aproxy+rewrite", ["--addon", f"{ADDONS}:Rewrite"])
            started.append(rewrite[0])
            self.check_rewrite(rewrite[1])
            # (row, who, target, body kind, the size the client must get)
            sparse, dense = rewritten_size(size, "sparse"), rewritten_size(size, "dense")
            turns = [
                ("direct", None, direct, "sparse", size),
                ("aproxy", plain[0], plain[1], "sparse", size),
                ("aproxy+rewrite", rewrite[0], rewrite[1], "sparse", sparse),
                ("aproxy+rewrite dense", rewrite[0], rewrite[1], "dense", dense),
            ]
            mbps: dict[str, list[float]] = {row: [] for row, *_ in turns}
            growth: dict[str, list[float]] = {row: [] for row, *_ in turns}
            for _ in range(self.mode.downloads):
                for row, child, t, kind, want in turns:
                    pid = child.pid if child else self.origin.pid
                    r = download(t, self.big[kind], want, pid, self.args)
                    mbps[row].append(size / r["seconds"] / 1e6)
                    growth[row].append(r["rss_growth_mib"])
            for row, xs in mbps.items():
                log(f"download {row}: {', '.join(f'{x:,.0f}' for x in xs)} MB/s")
        finally:
            for child in started:
                self.stop(child)
        client = "curl -o /dev/null" if self.args.curl else "Python client"
        scenario = (
            f"b. {size_name(size)} text body, {client}, MB/s of the origin's body, median "
            f"of {self.mode.downloads} alternating"
        )
        med = {row: median(xs) for row, xs in mbps.items()}
        swap = f"Replace {OLD.decode()} -> {NEW.decode()}"
        labels = {
            "direct": "direct (a match once a KiB)",
            "aproxy": "aproxy, no addon (the same body)",
            "aproxy+rewrite": f"aproxy+rewrite ({swap}, once a KiB)",
            "aproxy+rewrite dense": f"aproxy+rewrite ({swap}, every 64 B)",
        }
        for row, m in med.items():
            figure = f"{m:,.0f} MB/s"
            if row != "direct":
                figure += f", peak RSS growth {max(growth[row]):.1f} MiB"
            ratio = "" if row == "direct" else f"{m / med['direct']:.2f}x direct"
            goal = ""
            if row.startswith("aproxy+rewrite"):
                ratio = f"{m / med['aproxy']:.2f}x no addon; " + ratio
            if row == "aproxy+rewrite":
                goal = met(f">= {REWRITE_MBPS:g} MB/s", m >= REWRITE_MBPS)
            self.rows.append((scenario, labels[row], figure, ratio, goal))

    # ---- c. a slow reader of a huge rewritten body

    def slow_read(self) -> None:
        """Part c: fresh proxies, each read by the slow client while its RSS is sampled."""
        s = self.mode
        scenario = (
            f"c. {size_name(s.huge_bytes)} text body, slow reader (64 KiB SO_RCVBUF, paced "
            f"to {s.slow_rate / 1e6:g} MB/s, {s.slow_seconds:g} s), RSS sampled"
        )
        for name, options in (
            ("aproxy+rewrite-slow", ["--addon", f"{ADDONS}:Rewrite"]),
            ("aproxy-slow", []),
        ):
            child, t = self.start_aproxy(name, options)
            try:
                r = slow_reader(t, self.huge, child.pid, self.settings)
            finally:
                self.stop(child)
            if r["eof"]:
                self.problems.append(f"{name}: the connection ended before the body did")
            figure = (
                f"RSS start {r['rss_before_mib']:.1f} MiB, peak {r['rss_peak_mib']:.1f} MiB "
                f"({r['growth_mib']:+.1f}); {r['bytes'] / 1e6:,.0f} MB read in "
                f"{r['seconds']:.1f} s"
            )
            ok = r["growth_mib"] <= FLAT_MIB
            goal = met(f"RSS flat (peak - start <= {FLAT_MIB:g} MiB)", ok)
            self.rows.append((scenario, name, figure, "", goal if "rewrite" in name else ""))

    # ---- the whole run

    def run(self) -> None:
        """Every part in turn; a failed part is reported and the others still run."""
        self.start_origin()
        with self.part("a. keep-alive rounds"):
            self.keepalive()
        with self.part("b. rewritten download"):
            self.rewrite_download()
        with self.part("c. slow reader"):
            self.slow_read()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (about 90 s)")
    mode.add_argument(
        "--smoke", action="store_true", help="tiny sizes, no mitmproxy, ~15 s (for the tests)"
    )
    ap.add_argument(
        "--checkout", type=Path, default=CHECKOUT, help="the aproxy tree to run (this one)"
    )
    ap.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="an aproxy tree from before the addon API (e.g. a git worktree of it), measured "
        "in the keep-alive rounds",
    )
    ap.add_argument("--mitmdump", metavar="PATH", help="mitmdump (PATH, /tmp/venv-mitm/bin)")
    ap.add_argument("--no-mitmproxy", action="store_true", help="leave mitmproxy out")
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load client")
    ap.add_argument("--no-nginx", action="store_true", help="use the Python origin")
    ap.add_argument("--no-curl", action="store_true", help="use the built-in download client")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    for name in ("checkout", "before"):
        tree = getattr(args, name)
        if tree is not None:
            tree = tree.resolve()
            setattr(args, name, tree)
            if not (tree / "aproxy").is_dir():
                ap.error(f"--{name} {tree}: no aproxy/ in it")
    args.mitmdump = mitmdump(args.mitmdump)
    clients(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every part and print the report: 0 when all ran, 1 if one failed, 130 on abort."""
    args = parse_args(argv)
    mode = SMOKE_MODE if args.smoke else QUICK if args.quick else FULL
    args.connections = mode.connections
    return run_main(AddonBench(args, mode))


if __name__ == "__main__":
    sys.exit(main())
