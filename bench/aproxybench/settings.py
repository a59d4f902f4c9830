"""The benchmark's modes (full, --quick, --smoke) and the constants the modules share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BENCH_DIR",
    "CHECKOUT",
    "CONNECT_PARALLEL",
    "DISTURBED_SHARE",
    "FULL",
    "HZ",
    "IO_TIMEOUT",
    "LOOPBACK",
    "MIB",
    "PACE_DELAY_MS",
    "PHASE_KEYS",
    "PROGRAMS",
    "QUICK",
    "SLOW_TRANSFER_SECONDS",
    "SMALL_BODY",
    "SMOKE",
    "TEMPLATES",
    "Settings",
]

# bench/, with the programs run as separate processes and the configs rendered for them.
BENCH_DIR = Path(__file__).resolve().parent.parent
PROGRAMS = BENCH_DIR / "programs"
TEMPLATES = BENCH_DIR / "templates"
CHECKOUT = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"
HZ = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
SMALL_BODY = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes
CONNECT_PARALLEL = 64
IO_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    """How long and how big each scenario is (full run, --quick or --smoke)."""

    name: str
    wrk_seconds: float
    big_bytes: int
    downloads: int
    idle_conns: int
    slow_seconds: float
    slow_rate: int
    max_seconds: int  # time budget for direct and one proxy target
    per_target_seconds: int  # added to the budget for each further proxy target
    rounds: int  # alternating keep-alive rounds over all targets (see Bench.run_rounds)
    round_seconds: float


FULL = Settings("full", 10, 100 * MIB, 3, 1000, 5, 1_000_000, 1200, 360, 5, 5)
QUICK = Settings("quick", 3, 100 * MIB, 1, 1000, 3, 1_000_000, 400, 180, 3, 3)
SMOKE = Settings("smoke", 1, 1 * MIB, 1, 20, 1, 1_000_000, 90, 30, 1, 1)

# A load run in which more than this share of all CPUs was busy with work not charged to the
# client, the origin or the proxy was disturbed by other work (quiet runs: under 10%).
DISTURBED_SHARE = 0.2

# A large transfer slower than this is not repeated (proxy.py forwards a 100 MiB body at
# about 6 MB/s, 17 s a run): its median is then of one run, and the report says so.
SLOW_TRANSFER_SECONDS = 12.0

# phase -> the result keys it fills (marked "failed" when the phase fails before them)
PHASE_KEYS = {
    "idle": ("rss_start_mib", "idle"),
    "slow": ("slow_reader",),
    "load": ("ka", "paced", "close", "download", "tunnel", "upload"),
}

# The paced keep-alive load: each of wrk's connections pauses this long before each
# request, so every proxy gets about the same modest rate (at most connections * 1000 /
# PACE_DELAY_MS requests/s; 5,000 with 50 connections) and the latencies compare the work
# per request rather than how each proxy queues at its own saturation point, which is what
# the unpaced run measures (a faster proxy answers more requests there, each waiting
# behind more).
PACE_DELAY_MS = 10
