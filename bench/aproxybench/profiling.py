"""
The optional profile (C{--profile FILE}): py-spy records aproxy during an extra keep-alive
load run, and the report lists where the time went.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Child, log

__all__ = ["Profile", "find_py_spy", "record_profile", "summarize_profile"]


def _function(frame: str) -> str:
    """C{'f (pkg/mod.py:12)'} -> C{'f (pkg/mod.py)'}: py-spy frames grouped by function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _is_ours(frame: str) -> bool:
    """Whether a py-spy frame is in aproxy's own code."""
    return "(aproxy/" in frame or "/aproxy/" in frame


def summarize_profile(raw: Path, top: int = 12) -> list[str]:
    """Markdown lines from a py-spy raw (collapsed stacks) file: where the time goes."""
    leaf: Counter[str] = Counter()
    own_self: Counter[str] = Counter()
    own_incl: Counter[str] = Counter()
    calls_out: Counter[str] = Counter()  # library leaf <- deepest aproxy line above it
    total = own_total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        top_frame = _function(frames[-1])
        if not _is_ours(frames[-1]) and len(frames) > 1:
            top_frame += f" <- {_function(frames[-2]).split(' (')[0]}"
        leaf[top_frame] += count
        ours = [f for f in frames if _is_ours(f)]
        for f in {_function(f) for f in ours}:
            own_incl[f] += count
        if _is_ours(frames[-1]):
            own_self[_function(frames[-1])] += count
            own_total += count
        elif ours:
            calls_out[f"{_function(frames[-1])} <- {ours[-1]}"] += count
    if not total:
        return ["(py-spy recorded no samples)"]

    def listing(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"- {100 * c / total:5.1f}%  {f}" for f, c in counter.most_common(top)]
        return ["", title, "", *rows]

    lines = [
        f"{total} samples; {100 * own_total / total:.1f}% with aproxy's own code on top of "
        "the stack (percentages are of all samples)."
    ]
    lines += listing("Hottest functions, self time (all code; library ones with caller):", leaf)
    lines += listing("aproxy functions, self time:", own_self)
    lines += listing("aproxy functions, inclusive (with everything they call):", own_incl)
    lines += listing("Library/kernel time by the aproxy line that called into it:", calls_out)
    return lines


def find_py_spy() -> str | None:
    """py-spy on PATH or next to the running interpreter."""
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


@dataclass
class Profile:
    """What L{record_profile} did: the py-spy command, the summary, and any problems."""

    command: str = ""
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def record_profile(
    out: Path, mode: str, pid: int, seconds: float, logfile: Path, run_load: Callable[[], object]
) -> Profile:
    """
    Run py-spy record on C{pid} (raw collapsed stacks to C{out}, sampling C{mode}
    nonblocking or blocking) while C{run_load} runs an extra load of C{seconds}.
    """
    result = Profile()
    py_spy = find_py_spy()
    if not py_spy:
        result.problems.append("--profile: py-spy not found (pip install py-spy)")
        return result
    argv = [py_spy, "record", "--format", "raw", "-r", "200", "-o", str(out)]
    if mode == "nonblocking":
        argv.insert(2, "--nonblocking")
    argv += ["-d", f"{seconds:g}", "-p", str(pid)]
    result.command = shlex.join(argv)
    log(f"profiling: {shlex.join(argv)}")
    spy = Child("py-spy", argv, logfile=logfile)
    try:
        time.sleep(0.5)
        run_load()
        spy.proc.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        result.problems.append("py-spy did not finish in time")
    finally:
        spy.stop()
    if out.exists():
        result.lines = summarize_profile(out)
    else:
        result.problems.append(f"py-spy wrote no profile: {spy.log_tail()}")
    return result
