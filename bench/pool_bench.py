#!/usr/bin/env python3
"""
aproxy's parent pools (issue #18) measured: keep-alive requests/s through a two-member pool
next to the same through a single parent, in one run. Goal: the pool >= 0.95x the single
parent.

Targets, each measured with wrk (1 thread, 50 keep-alive connections, GET of a 100-byte
body; the Python load client without wrk):

  direct   the client straight to the origin (nginx, 1 worker): the ceiling;
  aproxy   aproxy with no parent (it goes to the origin itself);
  single   aproxy --upstream http://127.0.0.1:P1;
  rr       aproxy --upstream 'rr:http://127.0.0.1:P1,http://127.0.0.1:P2', and likewise
  least, client (and random, with --strategies) for the other strategies. Every request
           comes from 127.0.0.1, so C{client} sends all of them to one member: it measures
           what picking costs, not a spread.

The parent is one nginx process with one worker listening on both ports P1 and P2
(bench/templates/nginx-parent.conf). The single parent and the pool are thus served by
the same process, with the same capacity, and differ only in what aproxy does: one parent
or a pool picking between two (the pool's upstream connections split over two pool keys).
Two separate parent processes would give the pool twice the parent CPU the single parent
gets; on this 2-core machine that would be measuring the parents. nginx is the parent
because it is cheap and keeps connections alive (tinyproxy closes the connection after
each response, so every request would be a new connection to the parent; squid costs
several times nginx's CPU per request). C{--parent-mode answer} (the default) has the
parent serve the body itself, from the origin's files: the cheapest parent, and three busy
processes (wrk, aproxy, nginx) on two cores instead of four; C{forward} has it relay every
request to the origin over kept-alive connections, as a real parent does.

Every aproxy target runs for the whole run (C{sys.executable -m twisted aproxy}, this
checkout first on C{PYTHONPATH}, each with C{--metrics} on a free port), and the targets
are measured, after a 1 s warm-up run each (not counted), in alternating rounds: forward
order in odd rounds, reversed in even ones, so single and rr (neighbours in the list) swap
which goes first, and a slow spell of the shared machine lands on every target alike. The
report gives per target the medians of its rounds (req/s, p50/p99, aproxy's and the
parent's CPU seconds per 10k requests), its ratio to the single parent, and the ratio of
each round's pool figure to the same round's single-parent figure (median, min-max).
Each round then runs the targets through a parent once more, paced (each of wrk's
connections pauses C{--paced} ms, 20, before each request): every target gets about the
same modest rate, so aproxy's CPU per request compares the work per request rather than
how well each batches at its limit (at its limit a process that is a little slower also
batches less, which costs it more CPU per request). After the rounds, each pool's
C{aproxy_parent_requests_total} says how its requests were spread over the members.

Everything listens on 127.0.0.1; each child runs in its own process group and is killed at
the end (also on errors, Ctrl-C and the time budget), and the temp dir is removed.

Usage: python bench/pool_bench.py [--quick | --smoke] [--rounds N] [--duration S]
       [--connections N] [--strategies rr,least,client] [--parent-mode answer|forward]
       [--paced MS] [--profile DIR] [--no-wrk] [--keep-tmp]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aproxybench.harness import Harness
from aproxybench.httpio import Target
from aproxybench.loads import load
from aproxybench.procs import (
    Child,
    abort_on_signals,
    cpu_seconds,
    free_port,
    log,
    run_bench,
    sbin,
    settle,
    tool_output,
)
from aproxybench.profiling import record_profile
from aproxybench.report import machine_line, notes_lines
from aproxybench.settings import CHECKOUT, LOOPBACK, SMOKE
from aproxybench.targets import aproxy_argv, aproxy_version, render

STRATEGIES = ("rr", "least", "random", "client")
GOAL = 0.95  # the pool's keep-alive req/s against the single parent's, same run
PATH = "/100b"


@dataclass(frozen=True)
class Mode:
    """How long each load run is and how many rounds (full run, --quick or --smoke)."""

    name: str
    seconds: float  # one wrk run per target and round
    rounds: int
    connections: int
    strategies: tuple[str, ...]
    paced_ms: int  # the paced runs' pause before each request (0: none)
    max_seconds: int  # time budget of the whole run


# Six rounds: each order (forward, reversed) as often as the other.
FULL = Mode("full", 5, 6, 50, ("rr", "least", "client"), 20, 600)
QUICK = Mode("quick", 2, 2, 50, ("rr", "least", "client"), 20, 180)
SMOKE_MODE = Mode("smoke", 1, 1, 10, ("rr", "client"), 0, 90)


def median(values: list[float]) -> float:
    """The median (a one-element list is its element)."""
    return float(statistics.median(values))


def met(goal: str, ok: bool) -> str:
    """A goal and whether the figure meets it."""
    return f"{goal}: {'met' if ok else '**NOT met**'}"


def parent_requests(metrics: str) -> dict[str, int]:
    """C{aproxy_parent_requests_total} from a metrics page: requests per parent, all results."""
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if not line.startswith("aproxy_parent_requests_total{"):
            continue
        labels, _, number = line.rpartition(" ")
        parent = re.search(r'parent="([^"]*)"', labels)
        if parent:
            out[parent.group(1)] = out.get(parent.group(1), 0) + int(float(number))
    return out


@dataclass
class Running:
    """A target in the rounds: where wrk connects, whose CPU is the proxy's, its metrics."""

    name: str
    target: Target
    pid: int  # the proxy's (the origin's for direct)
    upstream: str  # what --upstream it was given ("" for none)
    child: Child | None = None  # None for direct
    metrics_port: int = 0


class PoolBench(Harness):
    """One run: origin, parent, the aproxy targets, the alternating rounds, the report."""

    def __init__(self, args: argparse.Namespace, mode: Mode) -> None:
        self.mode = mode
        settings = replace(SMOKE, name=mode.name, wrk_seconds=mode.seconds, big_bytes=1024)
        names = ["direct", "aproxy", "single", *args.strategies]
        super().__init__(args, settings, names, {})
        self.parent: Child | None = None
        self.parent_ports = (0, 0)
        self.running: list[Running] = []
        self.runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        self.paced: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        self.spread: dict[str, dict[str, int]] = {}
        self.profiles: dict[str, list[str]] = {}

    # ---- processes

    def start_parent(self) -> None:
        """One nginx listening on two ports: the single parent and the pool's two members."""
        nginx = shutil.which("nginx") or sbin("nginx")
        if not nginx:
            raise RuntimeError("nginx is not installed (the parent is nginx)")
        p1, p2 = free_port(), free_port()
        while p2 == p1:
            p2 = free_port()
        work = self.tmp / "parent"
        work.mkdir()
        if self.args.parent_mode == "forward":
            location = (
                "proxy_pass http://origin; proxy_http_version 1.1; "
                'proxy_set_header Connection ""; proxy_set_header Host $http_host;'
            )
        else:
            location = "try_files $uri =404;"
        conf = work / "nginx.conf"
        conf.write_text(
            render(
                "nginx-parent.conf",
                work=work,
                port1=p1,
                port2=p2,
                origin_port=self.origin_port,
                data=self.data,
                location=location,
            )
        )
        argv = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
        self.commands["parent"] = shlex.join(argv)
        self.parent = Child("parent", argv, logfile=work / "output.log", cwd=work)
        self.parent_ports = (p1, p2)
        for port in (p1, p2):  # as a proxy is asked: absolute form, the origin's Host
            self.wait_ready(self.parent, Target("parent", port, self.origin_port, True), 15)
        log(f"parent: nginx ({self.args.parent_mode}), pid {self.parent.pid}, ports {p1}, {p2}")

    def parent_url(self, i: int) -> str:
        """The URL of the parent's port C{i} (0 or 1)."""
        return f"http://{LOOPBACK}:{self.parent_ports[i]}"

    def start_aproxy(self, name: str, upstream: str) -> Running:
        """An aproxy target with C{--upstream upstream} (none when empty) and C{--metrics}."""
        port, metrics = free_port(), free_port()
        argv, env = aproxy_argv(self.args, "aproxy", port, self.origin_port)
        argv += ["--metrics", f"tcp:{metrics}:interface={LOOPBACK}"]
        if upstream:
            argv += ["--upstream", upstream]
        work = self.tmp / name
        work.mkdir()
        self.commands[name] = shlex.join(argv)
        # Not in the checkout's directory: "python -m" puts the working directory first on
        # sys.path, so a checkout there would be imported instead of the one PYTHONPATH names.
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        t = Target(name, port, self.origin_port, True)
        self.wait_ready(child, t, 30)
        settle(child.pid, 5)
        log(f"{name}: pid {child.pid}, {LOOPBACK}:{port}, --upstream {upstream or '(none)'}")
        return Running(name, t, child.pid, upstream, child, metrics)

    def start_targets(self) -> None:
        """direct, aproxy without a parent, with the single parent, with each pool."""
        assert self.origin is not None
        direct = Target("direct", self.origin_port, self.origin_port, False)
        self.running.append(Running("direct", direct, self.origin.pid, ""))
        self.running.append(self.start_aproxy("aproxy", ""))
        self.running.append(self.start_aproxy("single", self.parent_url(0)))
        pool = f"{self.parent_url(0)},{self.parent_url(1)}"
        for strategy in self.args.strategies:
            self.running.append(self.start_aproxy(strategy, f"{strategy}:{pool}"))

    # ---- the rounds

    def measure(self, r: int, run: Running, delay_ms: int = 0) -> None:
        """
        One wrk run of C{run} in round C{r}, with the parent's CPU over it; paced with
        C{delay_ms} (each connection pauses that long before each request).
        """
        assert self.origin is not None and self.parent is not None
        via_parent = run.name not in ("direct", "aproxy")
        origin = None if run.name == "direct" else self.origin.pid
        parent0 = sum(cpu_seconds(self.parent.pid))
        one = load(run.target, PATH, False, run.pid, self.s, self.args, self.tmp, origin, delay_ms)
        parent = sum(cpu_seconds(self.parent.pid)) - parent0
        # The parent's CPU is not the load client's, the origin's or aproxy's: take it out
        # of what load() counts as other work on the machine.
        ncpu = os.cpu_count() or 1
        if isinstance(one.get("unattributed"), float) and one["seconds"]:
            one["unattributed"] = max(0.0, one["unattributed"] - parent / (one["seconds"] * ncpu))
        one["parent_per_10k"] = parent / one["requests"] * 10_000 if via_parent else None
        what = f"paced round {r + 1}" if delay_ms else f"round {r + 1}"
        self.check_health(run.name, what, one)
        (self.paced if delay_ms else self.runs)[run.name].append(one)
        cpu = one.get("cpu_per_10k")
        log(
            f"{what} {run.name}: {one['rps']:,.0f} req/s, p50 {one['p50_ms']:.2f} / "
            f"p99 {one['p99_ms']:.2f} ms"
            + (f", {cpu:.3f} CPU s / 10k" if cpu is not None and run.name != "direct" else "")
        )

    def rounds(self) -> None:
        """
        A warm-up run of each target (not counted: aproxy's connections to the parent or
        the origin are opened there, not in the first round), then every target in each
        round, forward in odd rounds and reversed in even ones; then, with a pace, each
        target through a parent again, paced, in the same order.
        """
        warm = replace(self.s, wrk_seconds=1)
        for run in self.running:
            load(run.target, PATH, False, run.pid, warm, self.args, self.tmp)
        for r in range(self.mode.rounds):
            order = self.running if r % 2 == 0 else self.running[::-1]
            for run in order:
                self.measure(r, run)
                self.check_alive()
            if self.mode.paced_ms and self.args.wrk:
                for run in order:
                    if run.upstream:
                        self.measure(r, run, self.mode.paced_ms)
                        self.check_alive()

    def check_alive(self) -> None:
        """Fail the run if a child exited."""
        for child in list(Child.registry):
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")

    def read_spread(self) -> None:
        """Requests per member of each parent target, from its metrics (warm-up included)."""
        for run in self.running:
            if run.metrics_port and run.upstream:
                url = f"http://{LOOPBACK}:{run.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as response:
                    self.spread[run.name] = parent_requests(response.read().decode())

    def profile(self) -> None:
        """
        C{--profile DIR}: py-spy records the single-parent aproxy and each pool's during
        one more load run each (DIR/NAME.txt, raw collapsed stacks); the report lists
        where their time went, so a pool's extra cost shows against the single parent's.
        """
        out = Path(self.args.profile).resolve()
        out.mkdir(parents=True, exist_ok=True)
        for run in self.running:
            if not run.upstream:
                continue
            done = record_profile(
                out / f"{run.name}.txt",
                "nonblocking",
                run.pid,
                self.s.wrk_seconds,
                self.tmp / f"py-spy-{run.name}.log",
                lambda run=run: load(run.target, PATH, False, run.pid, self.s, self.args, self.tmp),
            )
            self.commands[f"profile {run.name}"] = done.command
            self.profiles[run.name] = done.lines
            self.problems += done.problems

    # ---- the run and the report

    def run(self) -> None:
        """Origin, parent, targets, rounds; then the spread over the members."""
        self.versions["aproxy"] = aproxy_version(self.args, "aproxy") or ""
        self.describe_checkout("aproxy checkout", CHECKOUT)
        if self.args.wrk:
            self.versions["wrk"] = tool_output([self.args.wrk, "--version"])
        self.start_origin()
        self.start_parent()
        self.start_targets()
        self.rounds()
        self.read_spread()
        if self.args.profile:
            self.profile()
        for run in self.running:
            if run.child is not None:
                self.scan_log(run.child, "run")

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """The table: one row per target, the ratios to the single parent, the goal."""
        med = medians(self.runs)
        single = self.runs.get("single", [])
        out = []
        for run in self.running:
            name = run.name
            if name not in med:
                continue
            m = med[name]
            figure = f"{m['rps']:,.0f} req/s, p50 {m['p50_ms']:.2f} / p99 {m['p99_ms']:.2f} ms"
            if name != "direct" and "cpu_per_10k" in m:
                figure += f"; aproxy {m['cpu_per_10k']:.3f} CPU s / 10k"
            if "parent_per_10k" in m:
                figure += f", parent {m['parent_per_10k']:.3f}"
            ratio = goal = ""
            if name == "direct":
                pass
            elif name in ("aproxy", "single"):
                ratio = f"{m['rps'] / med['direct']['rps']:.2f}x direct"
            elif "single" in med:
                s = med["single"]
                paired = [
                    x["rps"] / y["rps"] for x, y in zip(self.runs[name], single, strict=False)
                ]
                ratio = f"{m['rps'] / s['rps']:.3f}x single"
                if len(paired) > 1:
                    ratio += (
                        f" (each round: median {median(paired):.3f}, "
                        f"{min(paired):.3f}-{max(paired):.3f})"
                    )
                if "cpu_per_10k" in m and "cpu_per_10k" in s:
                    ratio += f"; CPU/10k {m['cpu_per_10k'] / s['cpu_per_10k']:.3f}x single"
                if name != "client":
                    goal = met(f">= {GOAL:g}x single", m["rps"] >= GOAL * s["rps"])
            out.append((self.label(run), figure, ratio, goal, self.spread_text(run)))
        return out + self.paced_rows()

    def paced_rows(self) -> list[tuple[str, str, str, str, str]]:
        """
        The paced runs: each target through a parent at the same modest rate, so the
        CPU per request compares the work per request, not how each batches at its limit.
        """
        med = medians(self.paced)
        single = self.paced.get("single", [])
        out = []
        for run in self.running:
            m = med.get(run.name)
            if not m or "cpu_per_10k" not in m:
                continue
            figure = (
                f"{m['rps']:,.0f} req/s, p50 {m['p50_ms']:.2f} / p99 {m['p99_ms']:.2f} ms; "
                f"aproxy {m['cpu_per_10k']:.3f} CPU s / 10k"
            )
            ratio = ""
            s = med.get("single")
            if run.name != "single" and s and "cpu_per_10k" in s:
                ratio = f"CPU/10k {m['cpu_per_10k'] / s['cpu_per_10k']:.3f}x single"
                paired = [
                    x["cpu_per_10k"] / y["cpu_per_10k"]
                    for x, y in zip(self.paced[run.name], single, strict=False)
                ]
                if len(paired) > 1:
                    ratio += (
                        f" (each round: median {median(paired):.3f}, "
                        f"{min(paired):.3f}-{max(paired):.3f})"
                    )
            label = f"paced ({self.mode.paced_ms} ms pauses): {self.label(run)}"
            out.append((label, figure, ratio, "", ""))
        return out

    def label(self, run: Running) -> str:
        """The target's name in the table."""
        if run.name == "direct":
            return "direct (client -> origin)"
        if run.name == "aproxy":
            return "aproxy, no parent"
        if run.name == "single":
            return "aproxy --upstream P1 (single parent)"
        return f"aproxy --upstream '{run.name}:P1,P2' (pool)"

    def spread_text(self, run: Running) -> str:
        """How many requests each member got (P1, P2), from aproxy's metrics."""
        counts = self.spread.get(run.name)
        if not counts:
            return ""
        p1, p2 = (counts.get(self.parent_url(i), 0) for i in (0, 1))
        total = p1 + p2
        return f"P1 {p1:,} / P2 {p2:,}" + (
            f" ({p1 / total:.0%} / {p2 / total:.0%})" if total else ""
        )

    def report(self) -> str:
        """The Markdown report: the table, then how it ran, then problems and failures."""
        mode = self.mode
        tool = "wrk 1 thread" if self.args.wrk else "the Python load client"
        out = [
            f"# aproxy parent-pool benchmark ({mode.name}, {time.strftime('%Y-%m-%d %H:%M')})",
            "",
            f"Machine: {machine_line()}. Origin: {self.origin_kind}. Parent: one nginx (1 "
            f"worker) on two ports P1, P2 ({self.args.parent_mode}: "
            + (
                "serves the body itself"
                if self.args.parent_mode == "answer"
                else "relays to the origin, kept-alive"
            )
            + f"). GET {PATH} (100 B) keep-alive, {tool}, {self.args.connections} "
            f"connections x {mode.seconds:g} s; medians of {mode.rounds} alternating rounds "
            "(forward, then reversed). CPU: seconds per 10k requests (utime + stime). "
            "Client, origin, parent and proxies share the CPUs: compare rows of the same run.",
            "",
            "| target | figure | ratio | goal | requests per member |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {' | '.join(row)} |" for row in self.rows()]
        out += ["", "Each round, req/s:"]
        for name, runs in self.runs.items():
            if runs:
                each = ", ".join(f"{x['rps']:,.0f}" for x in runs)
                out.append(f"- {name}: {each}")
        for name, lines in self.profiles.items():
            out += ["", f"Profile of {name} (py-spy, one more load run):", "", *lines]
        out += notes_lines(self.versions, self.commands, self.problems, self.failures)
        return "\n".join(out) + "\n"


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per target, the median of each figure over its rounds."""
    med: dict[str, dict[str, float]] = {}
    for name, each_run in runs.items():
        if not each_run:
            continue
        med[name] = {}
        for key in ("rps", "p50_ms", "p99_ms", "cpu_per_10k", "parent_per_10k"):
            each = [float(x[key]) for x in each_run if x.get(key) is not None]
            if each:
                med[name][key] = median(each)
    return med


def strategy_list(text: str) -> tuple[str, ...]:
    """C{--strategies}: comma-separated pool strategies."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"strategies are from {', '.join(STRATEGIES)}: {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 s runs, 3 rounds (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="1 s runs, 1 round (for the tests)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (6; --quick 2, --smoke 1)")
    ap.add_argument("--duration", type=float, help="seconds of each load run (5)")
    ap.add_argument("--connections", type=int, help="wrk's connections (50)")
    ap.add_argument(
        "--strategies",
        type=strategy_list,
        help=f"pool strategies measured, from {', '.join(STRATEGIES)} (rr,least,client)",
    )
    ap.add_argument(
        "--parent-mode",
        choices=("answer", "forward"),
        default="answer",
        help="the parent serves the body itself (answer) or relays to the origin (forward)",
    )
    ap.add_argument(
        "--paced",
        type=int,
        metavar="MS",
        help="each round, the parent targets again with MS ms pauses (20; 0: none)",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, py-spy records each parent target in one more run (into DIR)",
    )
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load client")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    # What aproxybench's harness, loads and targets read.
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.threads = 1
    args.no_nginx = False
    args.aproxy_cmd = args.aproxy_cmd_b = args.aproxy_b_checkout = None
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the report: 0 when all ran, 1 if one failed, 130 on abort."""
    args = parse_args(argv)
    mode = SMOKE_MODE if args.smoke else QUICK if args.quick else FULL
    mode = replace(
        mode,
        rounds=args.rounds or mode.rounds,
        seconds=args.duration or mode.seconds,
        connections=args.connections or mode.connections,
        strategies=args.strategies or mode.strategies,
        paced_ms=mode.paced_ms if args.paced is None else args.paced,
    )
    args.connections, args.strategies = mode.connections, mode.strategies
    parents = 1 + len(mode.strategies)  # the targets through a parent
    runs = mode.rounds * (2 + parents + (parents if mode.paced_ms else 0))
    if args.profile:
        runs += parents
    budget = 60 + int(runs * (mode.seconds + 2))
    abort_on_signals(max(mode.max_seconds, budget))
    bench = PoolBench(args, mode)
    status = run_bench(bench)
    print(bench.report(), end="")
    return 1 if status == 0 and bench.failures else status


if __name__ == "__main__":
    sys.exit(main())
