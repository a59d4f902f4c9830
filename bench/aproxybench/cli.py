"""The command line: options, the mode's settings, and L{main} (what C{bench/run.py} runs)."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
from pathlib import Path
from typing import Any

from .procs import abort_on_signals, log, run_bench
from .report import render
from .runner import Bench
from .settings import FULL, QUICK, SMOKE, Settings
from .targets import BUILD_B, TARGETS, select_targets, target_list

__all__ = ["main", "parse_args", "settings_for"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        description="Benchmark aproxy against a direct connection to a local origin, and "
        "against squid, tinyproxy and proxy.py when they are installed."
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 s load runs, one download")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="every scenario for about a second with tiny sizes (for the test suite)",
    )
    ap.add_argument(
        "--aproxy-cmd",
        help="command that runs aproxy in the foreground; '{port}' is replaced by the port, "
        "else '--port tcp:PORT:interface=127.0.0.1' is appended. The environment is passed "
        "unchanged. Default: sys.executable -m twisted aproxy, with PYTHONPATH=the checkout. "
        "Also used for aproxy-w2 (with --workers 2 appended)",
    )
    ap.add_argument(
        "--aproxy-cmd-b",
        metavar="CMD",
        help=f"a second aproxy build to compare with, as target {BUILD_B} (run after aproxy, "
        "in the same alternating rounds); like --aproxy-cmd, but PYTHONPATH never includes "
        "this checkout. Default with --aproxy-b-checkout: sys.executable -m twisted aproxy",
    )
    ap.add_argument(
        "--aproxy-b-checkout",
        metavar="DIR",
        help=f"the checkout {BUILD_B} runs: PYTHONPATH=DIR for it (e.g. a git worktree of "
        "the old commit)",
    )
    ap.add_argument(
        "--targets",
        type=target_list,
        help=f"comma-separated, in this order; from {','.join(TARGETS)} (aproxy-w2: aproxy "
        "--workers 2; proxypy: proxy.py). Default: direct, aproxy and every installed peer; "
        "with --smoke: direct,aproxy",
    )
    for peer, where in (
        ("squid", "PATH or /usr/sbin"),
        ("tinyproxy", "PATH or /usr/sbin"),
        ("proxypy", "$BENCH_VENVS/proxypy/bin/proxy, BENCH_VENVS=/tmp/bench-venvs"),
    ):
        ap.add_argument(f"--{peer}", metavar="PATH", help=f"{peer} executable (default: {where})")
    ap.add_argument("--duration", type=float, help="seconds per load run (overrides the mode)")
    ap.add_argument(
        "--rounds", type=int, help="alternating rounds (overrides the mode: 5, 3 quick, 1 smoke)"
    )
    ap.add_argument("--connections", type=int, default=50, help="load connections (50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    ap.add_argument("--idle-conns", type=int, help="idle connections to hold (mode default)")
    ap.add_argument("--no-wrk", action="store_true", help="use the built-in load client")
    ap.add_argument("--no-nginx", action="store_true", help="use the built-in Python origin")
    ap.add_argument("--no-curl", action="store_true", help="use the built-in download client")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="also run py-spy record (raw format, to FILE) during an extra keep-alive run",
    )
    ap.add_argument(
        "--profile-mode",
        choices=("nonblocking", "blocking"),
        default="nonblocking",
        help="py-spy sampling: nonblocking (default; less skew towards system calls) or "
        "blocking (consistent stacks, but samples land just after system calls)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument("--max-seconds", type=int, help="abort the whole run after this long")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    if (
        args.targets
        and BUILD_B in args.targets
        and not (args.aproxy_cmd_b or args.aproxy_b_checkout)
    ):
        ap.error(f"target {BUILD_B} needs --aproxy-cmd-b or --aproxy-b-checkout")
    if args.aproxy_b_checkout and not (Path(args.aproxy_b_checkout) / "aproxy").is_dir():
        ap.error(f"--aproxy-b-checkout {args.aproxy_b_checkout}: no aproxy/ in it")
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.curl = None if args.no_curl else shutil.which("curl")
    return args


def settings_for(args: argparse.Namespace, proxies: int = 1) -> Settings:
    """
    The mode's settings with command-line overrides applied; the time budget grows with
    the number of proxy targets beyond the first.
    """
    s = SMOKE if args.smoke else QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.duration:
        changes["wrk_seconds"] = args.duration
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.idle_conns:
        changes["idle_conns"] = args.idle_conns
    if args.max_seconds:
        changes["max_seconds"] = args.max_seconds
    elif proxies > 1:
        changes["max_seconds"] = s.max_seconds + s.per_target_seconds * (proxies - 1)
    return Settings(**{**s.__dict__, **changes}) if changes else s


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every scenario ran, 1 if any failed outright, 130 on abort."""
    args = parse_args(argv)
    targets, skipped = select_targets(args)
    s = settings_for(args, sum(1 for name in targets if name != "direct"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children
    abort_on_signals(s.max_seconds)
    for name, why in skipped.items():
        log(f"{name}: {why}")
    log(f"targets: {', '.join(targets)}; time budget {s.max_seconds} s")
    bench = Bench(args, s, targets, skipped)
    status = run_bench(bench)
    print(render(bench), end="")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": s.__dict__,
                    "targets": targets,
                    "skipped": skipped,
                    "results": bench.results,
                    "versions": {**bench.versions, **bench.target_versions},
                    "commands": bench.commands,
                },
                indent=1,
                default=str,
            )
        )
    if status == 0 and bench.failures:
        status = 1
    return status
