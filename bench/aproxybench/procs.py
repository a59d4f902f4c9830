"""
Child processes and what the benchmark measures of them: each child runs in its own process
group (so stopping it stops its descendants too), and CPU seconds and RSS come from
C{/proc}, summed over a process and its descendants.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from .settings import HZ, LOOPBACK

__all__ = [
    "Abort",
    "Child",
    "RssSampler",
    "brief",
    "cpu_seconds",
    "free_port",
    "log",
    "machine_busy_seconds",
    "own_and_children_cpu",
    "proc_tree",
    "raise_abort",
    "rss_kib",
    "run_bounded",
    "sbin",
    "settle",
    "tool_output",
]

# --------------------------------------------------------------------------------------------
# logging and aborts


def log(message: str) -> None:
    """Write one progress line to standard error."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Abort(BaseException):
    """Raised from a signal handler (SIGTERM, time budget) to unwind and clean up."""


def raise_abort(signum: int, _frame: Any) -> None:
    """Signal handler: turn SIGTERM, SIGHUP or SIGALRM into an L{Abort}."""
    reason = "time budget exceeded" if signum == signal.SIGALRM else f"signal {signum}"
    raise Abort(reason)


def abort_on_signals(max_seconds: int) -> None:
    """Turn Ctrl-C, SIGTERM, SIGHUP and the time budget (C{max_seconds}) into L{Abort}."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, raise_abort)
    signal.alarm(max_seconds)


def run_bench(bench: Any) -> int:
    """
    Run C{bench} (its C{run}, then always its C{cleanup}), within the budget set by
    L{abort_on_signals}; what went wrong goes to C{bench.failures}.

    @return: 0 when it ran through, 1 when it stopped on an error, 130 when aborted.
    """
    started = time.monotonic()
    status = 0
    try:
        bench.run()
    except (KeyboardInterrupt, Abort) as e:
        bench.failures.append(f"run aborted: {e!r}")
        status = 130
    except Exception as e:  # report what we have, then fail
        bench.failures.append(f"run stopped: {e}")
        status = 1
    finally:
        signal.alarm(0)
        bench.cleanup()
    log(f"finished in {time.monotonic() - started:.1f} s")
    return status


# --------------------------------------------------------------------------------------------
# child processes


class Child:
    """A process started in its own process group; L{stop} kills that whole group."""

    registry: ClassVar[list[Child]] = []

    def __init__(
        self,
        name: str,
        argv: list[str],
        logfile: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        out: Any = subprocess.PIPE
        self._log = None
        if logfile is not None:
            self._log = open(logfile, "wb")  # closed in stop()
            out = self._log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if logfile is not None else subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            text=logfile is None,
        )
        self.pid = self.proc.pid
        Child.registry.append(self)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running after SIGTERM; SIGKILL to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in Child.registry:
            Child.registry.remove(self)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the child's log file, for error messages."""
        if self.logfile is None or not self.logfile.exists():
            return ""
        text = self.logfile.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    @classmethod
    def stop_all(cls) -> None:
        """Stop every child still registered (newest first)."""
        for child in reversed(list(cls.registry)):
            try:
                child.stop(timeout=3)
            except Exception as e:  # keep stopping the others
                log(f"stopping {child.name} failed: {e!r}")


def run_bounded(
    name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool in its own process group, killed after C{timeout} seconds."""
    child = Child(name, argv, env=env)
    try:
        out, err = child.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.stop(timeout=1)
        raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from None
    finally:
        if child.alive() or child in Child.registry:
            child.stop(timeout=1)
    return subprocess.CompletedProcess(argv, child.proc.returncode, out or "", err or "")


def tool_output(argv: list[str]) -> str:
    """First line of a tool's version output (stdout or stderr), or an empty string."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return text[0] if text else ""


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that is free right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# /proc accounting (summed over a process and its descendants)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def proc_tree(root: int) -> list[int]:
    """C{root} and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, i = [root], 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out


def cpu_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process tree, reaped children included."""
    user = system = 0
    for pid in proc_tree(root):
        f = _stat_fields(pid)
        if f:  # from field 3: utime=11, stime=12, cutime=13, cstime=14
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user / HZ, system / HZ


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / HZ


def own_and_children_cpu() -> float:
    """CPU seconds of this process and its reaped children (wrk, curl): the load client."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def settle(root: int, seconds: float = 10.0) -> None:
    """
    Wait (bounded) until the process tree's RSS stops changing: a proxy with worker
    processes answers as soon as one worker runs, while the others may still be starting,
    and their growth would otherwise be charged to the first scenario measured.
    """
    deadline = time.monotonic() + seconds
    last = rss_kib(root)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(root)
        if abs(now - last) < 256:
            return
        last = now


def rss_kib(root: int) -> int:
    """VmRSS of the process tree from /proc/PID/status, in KiB."""
    total = 0
    for pid in proc_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples a process tree's RSS in a thread while in use; C{peak} afterwards (KiB)."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.peak = rss_kib(root)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """Sampling loop."""
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.root))


def brief(r: Any) -> str:
    """A one-line summary of a scenario result for the progress log."""
    if not isinstance(r, dict):
        return str(r)
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_per_10k",
        "cpu_sys_share",
        "socket_errors",
        "non_2xx",
        "mbps",
        "held",
        "kib_per_conn",
        "growth_mib",
        "bytes",
    )
    parts = []
    for k in keys:
        if k in r and r[k] is not None:
            v = r[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def sbin(name: str) -> str | None:
    """A tool in /usr/sbin or /sbin when PATH lacks those."""
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None
