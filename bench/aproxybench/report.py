"""
The Markdown report: a table with a row per target, the project's targets for the aproxy
rows, the comparison of two aproxy builds, machine and versions, command lines, problems.
The pieces are plain functions of the results, so the tests can render made-up ones.
"""

from __future__ import annotations

import functools
import operator
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from .runner import Bench
from .settings import DISTURBED_SHARE, LOOPBACK, MIB, SLOW_TRANSFER_SECONDS, Settings
from .targets import APROXY_TARGETS, BUILD_B, PEERS

__all__ = [
    "build_lines",
    "cell",
    "detail_lines",
    "failed",
    "goal_lines",
    "machine_line",
    "notes_lines",
    "render",
    "size_label",
    "table_lines",
    "value",
]


def render(bench: Bench) -> str:
    """The Markdown report of a finished (or stopped) run."""
    s = bench.s
    big = size_label(s.big_bytes)
    commands = {name: bench.commands.get(name, "") for name in bench.targets}
    commands["direct"] = ""
    lines = [
        f"# aproxy benchmark ({s.name} run, {time.strftime('%Y-%m-%d %H:%M:%S')})",
        "",
        f"Machine: {machine_line()}. Client (wrk, curl, this script), origin and proxy share "
        "the CPUs, nothing is pinned; all traffic on 127.0.0.1.",
        "",
        *table_lines(bench.targets, bench.results, s, bench.target_versions, commands),
        "",
        "Rows: direct = client straight to the origin "
        f"({bench.origin_kind}; its memory and CPU figures are the origin's own, its upload "
        "RSS the upload sink's); every other row is that proxy's process tree (RSS and CPU "
        "summed over the started process and its descendants), started afresh for each "
        "phase (idle connections; slow reader; load runs and transfers). "
        '"failed": the scenario failed (see Problems); "-": not measured. '
        "In aproxy rows, (N.NNx) is aproxy / squid from this run (for CPU and KiB per "
        "connection lower is better). The alternating rounds come last: every target "
        f"running at once and measured in turn, {s.rounds} rounds of {s.round_seconds:g} s "
        "keep-alive then Connection: close, "
        "each round starting one target later; their medians are the fairest comparison "
        "on a shared machine (a slow spell hits every target alike). "
        "A transfer slower than "
        f"{SLOW_TRANSFER_SECONDS:g} s is not repeated, marked (1 run).",
        "",
        *detail_lines(bench, big),
    ]
    if bench.disturbed:
        lines += [
            "",
            f"**Disturbed**: in {len(bench.disturbed)} load run(s) "
            f"({', '.join(bench.disturbed)}) over {DISTURBED_SHARE:.0%} of the machine's CPU "
            "went to other work, so those figures, and ratios between rows, are not "
            "reliable: rerun on an idle machine.",
        ]
    builds = build_lines(bench.results, s)
    if builds:
        lines += ["", f"## Two aproxy builds: aproxy and {BUILD_B}", "", *builds]
        if not bench.args.wrk:
            lines.append("- (the alternating rounds need wrk, which was not used: no medians)")
    goals = [line for name in bench.targets for line in goal_lines(name, bench.results, s)]
    if goals:
        lines += ["", "## Targets (aproxy)", "", *goals]
        if s.big_bytes < 100 * MIB:
            lines.append(
                f"- (the transfer targets are about a 100 MiB body; this run moved {big}, "
                "so its MB/s are mostly connection setup)"
            )
    lines += ["", "## Machine and versions", ""]
    lines.append(f"- machine: {machine_line()}")
    lines += [f"- {k}: {v}" for k, v in bench.versions.items()]
    lines += [f"- {k}: {v}" for k, v in bench.target_versions.items() if k in PEERS]
    if bench.skipped:
        lines += ["", "## Targets not run", ""]
        lines += [f"- {name}: {why}" for name, why in bench.skipped.items()]
    lines += ["", "## Command lines", ""]
    for name in ("origin", "upload sink", *bench.targets, "profile"):
        if bench.commands.get(name):
            lines.append(f"- {name}: `{bench.commands[name]}`")
    if any(name in PEERS for name in bench.targets):
        lines.append(
            "- peers' configs (rendered into the temp dir, kept with --keep-tmp): squid: "
            "no cache (cache deny all, cache_mem 0, no cache_dir), http_port 127.0.0.1:PORT, "
            "access from 127.0.0.1 only, no access log; tinyproxy: Listen 127.0.0.1, Allow "
            "127.0.0.1, no Via header, LogLevel Critical; proxy.py: its defaults (threadless, "
            "one acceptor process per CPU), HOME in the temp dir"
        )
    # Client commands: direct's and the first proxy's; the other proxies' differ only
    # in the proxy port (the one in their command line).
    shown = [who for who in bench.targets if who == "direct"]
    shown += [who for who in bench.targets if who != "direct"][:1]
    for who in shown:
        for key in ("ka", "paced", "close", "download", "tunnel", "upload"):
            v = bench.results[who].get(key)
            if isinstance(v, dict) and "cmd" in v:
                lines.append(f"- {who} {key}: `{v['cmd']}`")
    others = [who for who in bench.targets if who not in shown]
    if others:
        lines.append(
            f"- {', '.join(others)}: the same client commands as {shown[-1]}'s, with that "
            "proxy's port"
        )
    lines.append(
        "- idle connections and slow reader: built-in clients (this script), "
        f"GET http://{LOOPBACK}:{bench.origin_port}/100b and {bench.big_path}"
    )
    if bench.profile_lines:
        lines += ["", "## Profile (aproxy under the keep-alive load)", ""]
        lines += bench.profile_lines
    lines += ["", "## Problems", ""]
    if not bench.failures and not bench.peer_failures and not bench.problems:
        lines.append("None seen.")
    lines += [f"- FAILED: {f}" for f in bench.failures]
    lines += [
        f"- FAILED (a peer; does not change the exit status): {f}" for f in bench.peer_failures
    ]
    lines += [f"- {x}" for x in bench.problems]
    return "\n".join(lines) + "\n"


def size_label(n: int) -> str:
    """C{100 MiB} or C{512 B}."""
    return f"{n // MIB} MiB" if n >= MIB else f"{n} B"


def notes_lines(
    versions: dict[str, str], commands: dict[str, str], problems: list[str], failures: list[str]
) -> list[str]:
    """
    The end of a one-table report (bench/cache_bench.py's kind): versions, commands, then
    problems and failures when there are any.
    """
    out = ["", "Versions:"]
    out += [f"- {k}: {v}" for k, v in sorted(versions.items()) if v]
    out += ["", "Commands:"]
    out += [f"- {k}: `{v}`" for k, v in commands.items()]
    if problems:
        out += ["", "Problems:"] + [f"- {x}" for x in problems]
    if failures:
        out += ["", "Failed:"] + [f"- {x}" for x in failures]
    return out


def machine_line() -> str:
    """CPU count and model, architecture, kernel."""
    return (
        f"{os.cpu_count()} CPUs ({_cpu_model()}, {platform.machine()}), Linux {platform.release()}"
    )


def value(r: dict[str, Any], key: str, field: str) -> float | None:
    """A figure from one target's results, or None when missing or failed."""
    v = r.get(key)
    if isinstance(v, dict) and "error" not in v:
        x = v.get(field)
        return float(x) if isinstance(x, int | float) else None
    if key == field and isinstance(v, int | float):
        return float(v)
    return None


def failed(r: dict[str, Any], key: str) -> bool:
    """Whether a scenario of one target failed."""
    v = r.get(key)
    return isinstance(v, dict) and "error" in v


def cell(r: dict[str, Any], key: str, field: str, fmt: str, vs: dict[str, Any] | None) -> str:
    """One figure, formatted; C{failed} or C{-}; with C{vs} (squid's results) a ratio."""
    if failed(r, key):
        return "failed"
    x = value(r, key, field)
    if x is None:
        return "-"
    text = format(x, fmt)
    y = value(vs, key, field) if vs is not None else None
    return f"{text} ({x / y:.2f}x)" if x is not None and y else text


def load_cell(r: dict[str, Any], key: str, vs: dict[str, Any] | None) -> str:
    """Requests/s of a load run, with wrk's socket errors and non-2xx answers when any."""
    text = cell(r, key, "rps", ",.0f", vs)
    v = r.get(key)
    if isinstance(v, dict) and "error" not in v:
        notes = []
        if v.get("socket_errors"):
            notes.append(f"{v['socket_errors']:,} sock err")
        if v.get("non_2xx"):
            notes.append(f"{v['non_2xx']:,} non-2xx")
        if notes:
            text += f" [{', '.join(notes)}]"
    return text


def latency_cell(r: dict[str, Any], key: str) -> str:
    """C{p50 / p99} in ms."""
    if failed(r, key):
        return "failed"
    p50, p99 = value(r, key, "p50_ms"), value(r, key, "p99_ms")
    return "-" if p50 is None or p99 is None else f"{p50:.2f} / {p99:.2f}"


def paced_cell(r: dict[str, Any], vs: dict[str, Any] | None) -> str:
    """The paced load: requests/s and C{p50 / p99}, with the p99 ratio to squid's."""
    if failed(r, "paced"):
        return "failed"
    rps = value(r, "paced", "rps")
    if rps is None:
        return "-"
    text = f"{rps:,.0f}, {latency_cell(r, 'paced')}"
    p99, theirs = value(r, "paced", "p99_ms"), value(vs, "paced", "p99_ms") if vs else None
    if p99 is not None and theirs:
        text += f" ({p99 / theirs:.2f}x)"
    return text


def rounds_cell(r: dict[str, Any], key: str, vs: dict[str, Any] | None) -> str:
    """
    Alternating rounds (C{key}: C{rounds}, keep-alive, or C{rounds_close}): median
    requests/s and median C{p50 / p99}, with the ratios to squid's medians (requests/s,
    then p99).
    """
    if failed(r, key):
        return "failed"
    rps = value(r, key, "rps")
    if rps is None:
        return "-"
    text = f"{rps:,.0f}"
    theirs = value(vs, key, "rps") if vs else None
    if theirs:
        text += f" ({rps / theirs:.2f}x)"
    text += f", {latency_cell(r, key)}"
    p99, theirs = value(r, key, "p99_ms"), value(vs, key, "p99_ms") if vs else None
    if p99 is not None and theirs:
        text += f" ({p99 / theirs:.2f}x)"
    return text


def transfer_cell(r: dict[str, Any], key: str, s: Settings, vs: dict[str, Any] | None) -> str:
    """MB/s of the large transfers, noting a single run where the mode asks for more."""
    text = cell(r, key, "mbps", ",.0f", vs)
    v = r.get(key)
    if isinstance(v, dict) and v.get("runs", s.downloads) < s.downloads:
        text += f" ({v['runs']} run)"
    return text


def table_lines(
    names: list[str],
    results: dict[str, dict[str, Any]],
    s: Settings,
    versions: dict[str, str],
    commands: dict[str, str],
) -> list[str]:
    """The report's table: a row per target (direct, aproxy, peers), a column per figure."""
    big = size_label(s.big_bytes)
    squid = results.get("squid")
    if squid is not None and value(squid, "ka", "rps") is None:
        squid = None  # no ratios against a squid that did not run
    headers = [
        "target",
        "100 B keep-alive: req/s",
        "keep-alive p50 / p99, ms",
        "keep-alive CPU s / 10k req",
        "paced keep-alive: req/s, p50 / p99 ms",
        f"keep-alive, {s.rounds} alternating rounds: req/s, p50 / p99 ms (medians)",
        f"Connection: close, {s.rounds} alternating rounds: req/s, p50 / p99 ms (medians)",
        "100 B Connection: close: req/s",
        "close p50 / p99, ms",
        "close CPU s / 10k req",
        f"{big} plain download, MB/s",
        f"{big} CONNECT tunnel download, MB/s",
        f"{big} upload (POST body), MB/s",
        "transfer peak RSS growth, MiB (plain / tunnel / upload)",
        "RSS at start, MiB",
        f"idle keep-alive conns held (of {s.idle_conns})",
        "RSS per idle conn, KiB",
        f"slow reader: RSS growth, MiB (MB read in {s.slow_seconds:g} s)",
        "version",
        "command",
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 3) + "---|---|",
    ]
    for name in names:
        r = results.get(name, {})
        vs = squid if name in APROXY_TARGETS else None
        growth = " / ".join(
            cell(r, key, "rss_growth_mib", ".1f", None) for key in ("download", "tunnel", "upload")
        )
        slow = cell(r, "slow_reader", "growth_mib", ".2f", None)
        got = value(r, "slow_reader", "bytes")
        if got is not None:
            slow += f" ({got / 1e6:.1f})"
        command = commands.get(name, "")
        row = [
            name,
            load_cell(r, "ka", vs),
            latency_cell(r, "ka"),
            cell(r, "ka", "cpu_per_10k", ".3f", vs),
            paced_cell(r, vs),
            rounds_cell(r, "rounds", vs),
            rounds_cell(r, "rounds_close", vs),
            load_cell(r, "close", vs),
            latency_cell(r, "close"),
            cell(r, "close", "cpu_per_10k", ".3f", vs),
            transfer_cell(r, "download", s, vs),
            "n/a (no proxy)" if name == "direct" else transfer_cell(r, "tunnel", s, vs),
            transfer_cell(r, "upload", s, vs),
            growth,
            cell(r, "rss_start_mib", "rss_start_mib", ".1f", None),
            cell(r, "idle", "held", ".0f", None),
            cell(r, "idle", "kib_per_conn", ".2f", vs),
            slow,
            versions.get(name, "-"),
            f"`{command}`" if command else "- (no proxy)" if name == "direct" else "-",
        ]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in row) + " |")
    return lines


def goal_lines(name: str, results: dict[str, dict[str, Any]], s: Settings) -> list[str]:
    """The project's targets for an aproxy row: each with its figure and met / NOT met."""
    if name not in APROXY_TARGETS:
        return []
    r = results.get(name, {})
    big = size_label(s.big_bytes)
    one = " through one aproxy process" if APROXY_TARGETS[name] == 1 else ""
    goals: list[tuple[str, str, str, str, Callable[[float], bool]]] = [
        (f"100 B keep-alive >= 15,000 requests/s{one}", "ka", "rps", ",.0f", lambda x: x >= 15000),
        (
            "RSS per idle keep-alive connection <= 4 KiB",
            "idle",
            "kib_per_conn",
            ".2f",
            lambda x: x <= 4,
        ),
        ("slow-reader RSS growth < 2 MiB", "slow_reader", "growth_mib", ".2f", lambda x: x < 2),
        (f"{big} plain download >= 1,000 MB/s", "download", "mbps", ",.0f", lambda x: x >= 1000),
        (
            f"{big} CONNECT tunnel download >= 1,000 MB/s",
            "tunnel",
            "mbps",
            ",.0f",
            lambda x: x >= 1000,
        ),
        (
            f"{big} upload (plain forwarded POST body) >= 1,000 MB/s",
            "upload",
            "mbps",
            ",.0f",
            lambda x: x >= 1000,
        ),
    ]
    squid = results.get("squid", {})
    for key, what in (("rounds", "keep-alive"), ("rounds_close", "Connection: close")):
        theirs = value(squid, key, "rps")
        if theirs is not None:
            goals.append(
                (
                    f"{what} requests/s >= squid's, median of {s.rounds} alternating rounds "
                    f"({theirs:,.0f})",
                    key,
                    "rps",
                    ",.0f",
                    functools.partial(operator.le, theirs),  # theirs <= x
                )
            )
    for key, what in (
        ("ka", "keep-alive"),
        ("paced", "paced keep-alive"),
        ("rounds", f"keep-alive (median of {s.rounds} alternating rounds)"),
    ):
        theirs = value(squid, key, "p99_ms")
        if theirs is not None:
            goals.append(
                (
                    f"{what} p99 <= squid's ({theirs:.2f} ms, same run)",
                    key,
                    "p99_ms",
                    ".2f",
                    functools.partial(operator.ge, theirs),  # theirs >= x
                )
            )
    lines = []
    for text, key, field, fmt, ok in goals:
        x = value(r, key, field)
        if failed(r, key):
            lines.append(f"- {name}: {text}: failed (NOT met)")
        elif x is not None:
            lines.append(f"- {name}: {text}: {format(x, fmt)} ({'met' if ok(x) else 'NOT met'})")
    return lines


def detail_lines(bench: Bench, big: str) -> list[str]:
    """How the load ran: tool and settings, and per target the CPU share and machine noise."""
    a, s = bench.args, bench.s
    load_tool = "wrk" if a.wrk else "built-in asyncio load client (wrk not found)"
    lines = [
        f"Load: {load_tool}, {a.threads} thread(s), {a.connections} connections, "
        f"{s.wrk_seconds:g} s per run, absolute-form target through proxies; CPU from "
        "/proc/PID/stat utime+stime before/after, per 10k requests. Transfers: curl, median of "
        f"{s.downloads}, MB/s = 10^6 B/s; the CONNECT tunnel goes to the origin's port (aproxy "
        "runs with --connect-ports set to it), then a GET inside the tunnel (curl -p -x); the "
        f"upload POSTs the {big} file to a Python sink that reads the whole body before it "
        "answers with its byte count (checked). Idle connections: opened 64 at a time, one "
        "keep-alive request each, RSS before opening vs. while all are held. Slow reader: "
        "64 KiB SO_RCVBUF, peak RSS during the read minus RSS before.",
        "",
        "CPU of the load runs (keep-alive; close): share in the kernel, machine busy (% of all "
        "CPUs), and unattributed (not charged to the client, origin or proxy: other processes "
        "and kernel work; a large value means the run was disturbed):",
        "",
    ]
    for name in bench.targets:
        r = bench.results.get(name, {})
        parts = []
        for key in ("ka", "close"):
            share, busy = value(r, key, "cpu_sys_share"), value(r, key, "machine_busy")
            noise = value(r, key, "unattributed")
            if share is None or busy is None or noise is None:
                parts.append("-")
            else:
                parts.append(f"{share:.0%} kernel, {busy:.0%} busy, {noise:.0%} unattributed")
        lines.append(f"- {name}: {parts[0]}; {parts[1]}")
    return lines


# The figures that compare two aproxy builds: (result key, field, what, format).
BUILD_FIGURES = (
    ("rounds", "rps", "keep-alive requests/s", ",.0f"),
    ("rounds_close", "rps", "Connection: close requests/s", ",.0f"),
    ("rounds_tunnel", "mbps", "CONNECT tunnel download MB/s", ",.0f"),
    ("rounds", "p99_ms", "keep-alive p99 ms (lower is better)", ".2f"),
)


def build_lines(results: dict[str, dict[str, Any]], s: Settings) -> list[str]:
    """
    aproxy against aproxy-b (a second build) by the medians of the alternating rounds:
    each figure of both and the change, aproxy / aproxy-b - 1 (with aproxy-b the old
    build, -3% means the new one is 3% slower). Empty unless both ran.
    """
    mine, theirs = results.get("aproxy"), results.get(BUILD_B)
    if mine is None or theirs is None:
        return []
    lines = [
        f"Medians of the {s.rounds} alternating rounds (every target running, taken in turn; "
        f"the tunnel download runs once per round and proxy when {BUILD_B} runs); change = "
        f"aproxy / {BUILD_B} - 1:",
        "",
    ]
    for key, field, what, fmt in BUILD_FIGURES:
        if failed(mine, key) or failed(theirs, key):
            lines.append(f"- {what}: failed")
            continue
        x, y = value(mine, key, field), value(theirs, key, field)
        if x is None or y is None:
            lines.append(f"- {what}: - (not measured)")
            continue
        change = f"{x / y - 1:+.1%}" if y else "-"
        lines.append(
            f"- {what}: aproxy {format(x, fmt)}, {BUILD_B} {format(y, fmt)}: change {change}"
        )
    return lines


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
