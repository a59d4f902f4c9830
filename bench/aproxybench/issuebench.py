"""
What the benchmarks of one issue each (C{bench/cache_bench.py}, C{intercept_bench.py},
C{addon_bench.py}) share: L{IssueBench}, one run with its temp dir, parts that fail on
their own, a five-column Markdown table followed by versions, commands, problems and
failures, and the cleanup; starting an aproxy tree as a child (checking which copy of
aproxy it imports) and waiting until a child answers; L{median} and L{met}.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .httpio import Target
from .procs import Child, abort_on_signals, free_port, log, run_bench, sbin, settle, tool_output
from .report import machine_line, notes_lines
from .settings import IO_TIMEOUT, LOOPBACK
from .targets import render

__all__ = [
    "IssueBench",
    "Row",
    "aproxy_version",
    "checkout_env",
    "clients",
    "fetch",
    "median",
    "met",
    "mitmdump",
    "run_main",
    "which_aproxy",
]

# One table row: scenario or part, target, figure, ratio, goal.
Row = tuple[str, str, str, str, str]
# Where mitmproxy is when it is not on PATH (python3 -m venv /tmp/venv-mitm &&
# /tmp/venv-mitm/bin/pip install mitmproxy).
MITMDUMP_VENV = Path("/tmp/venv-mitm/bin/mitmdump")


def median(values: list[float]) -> float:
    """The median (a one-element list is its element)."""
    return float(statistics.median(values))


def met(goal: str, ok: bool) -> str:
    """A goal and whether the figure meets it."""
    return f"{goal}: {'met' if ok else '**NOT met**'}"


def fetch(
    port: int, target: str, host: str, method: str = "GET", keep: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """
    One request on a new connection, the whole body read (and returned only with C{keep}):
    the status, the header fields (names lower-cased) and the body. Raises OSError or
    http.client.HTTPException.
    """
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, target, headers={"Host": host, "User-Agent": "aproxy-bench"})
        response = conn.getresponse()
        kept = []
        while data := response.read(1 << 20):
            if keep:
                kept.append(data)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(kept)
    finally:
        conn.close()


def mitmdump(given: str | None) -> str | None:
    """mitmdump: C{given} (C{--mitmdump}), else on PATH, else in /tmp/venv-mitm; or None."""
    if given:
        return given
    found = shutil.which("mitmdump")
    return found or (str(MITMDUMP_VENV) if MITMDUMP_VENV.exists() else None)


def clients(args: argparse.Namespace) -> None:
    """
    What L{loads} reads from C{args}: wrk and curl (None with C{--no-wrk}, C{--no-curl} or
    when not installed: the built-in clients) and wrk's one thread.
    """
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.curl = None if args.no_curl else shutil.which("curl")
    args.threads = 1


def run_main(bench: IssueBench) -> int:
    """
    Run C{bench} within its mode's time budget (C{mode.max_seconds}) and print its report:
    0 when every part ran, 1 if one failed, 130 when aborted.
    """
    abort_on_signals(bench.mode.max_seconds)
    status = run_bench(bench)
    print(bench.report(), end="")
    return 1 if status == 0 and bench.failures else status


def checkout_env(tree: Path) -> dict[str, str]:
    """This process's environment with C{tree} first on C{PYTHONPATH}: aproxy from it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return env


def aproxy_version() -> str:
    """aproxy's and Python's versions, as this interpreter imports them."""
    code = "import aproxy, sys; print(aproxy.__version__, sys.version)"
    return tool_output([sys.executable, "-c", code])


def which_aproxy(env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """
    Where C{python -m twisted aproxy} started with C{env} in C{cwd} imports aproxy and its
    twistd plugin from (the files), asked of the same interpreter, environment and
    directory.
    """
    code = (
        "import aproxy, twisted.plugins.aproxy_plugin as p; print(aproxy.__file__); "
        "print(p.__file__)"
    )
    out = Child("which-aproxy", [sys.executable, "-c", code], env=env, cwd=cwd)
    try:
        text, err = out.proc.communicate(timeout=30)
    finally:
        out.stop(timeout=1)
    lines = (text or "").split()
    if out.proc.returncode != 0 or len(lines) != 2:
        raise RuntimeError(f"can't import aproxy with PYTHONPATH={env.get('PYTHONPATH')}: {err}")
    return lines[0], lines[1]


class IssueBench:
    """
    One run: the temp dir, the origin and proxies started, the table's rows, problems
    (reported, the exit status unchanged) and failures (exit status 1). A subclass names
    its C{title}, C{columns} and temp dir C{prefix} and has C{run}; L{procs.run_bench}
    runs it and always calls L{cleanup}.
    """

    title: ClassVar[str] = "aproxy benchmark"
    columns: ClassVar[tuple[str, str, str, str, str]] = (
        "scenario",
        "target",
        "figure",
        "ratio",
        "goal",
    )
    prefix: ClassVar[str] = "aproxy-issue-bench-"

    def __init__(self, args: argparse.Namespace, mode: Any) -> None:
        self.args = args
        self.mode = mode
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
        os.chmod(self.tmp, 0o755)  # nginx workers and squid run as other users
        self.data = self.tmp / "data"
        self.origin: Child | None = None
        self.origin_port = 0
        self.origin_kind = ""
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.failures: list[str] = []
        self.commands: dict[str, str] = {}
        self.versions: dict[str, str] = {}

    # ---- processes

    def nginx_argv(self, template: str, **values: object) -> list[str] | None:
        """
        nginx's command line with C{bench/templates/TEMPLATE} rendered into the temp dir
        (C{work} and C{port} filled in), or None when nginx is not installed or not wanted
        (C{--no-nginx}).
        """
        nginx = None if self.args.no_nginx else shutil.which("nginx") or sbin("nginx")
        if not nginx:
            return None
        work = self.tmp / "nginx"
        work.mkdir()
        conf = work / "nginx.conf"
        conf.write_text(render(template, work=work, port=self.origin_port, **values))
        self.versions["nginx"] = tool_output([nginx, "-v"])
        return [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]

    @property
    def host(self) -> str:
        """The origin's authority (the Host header and the absolute-form target's)."""
        return f"{LOOPBACK}:{self.origin_port}"

    def direct(self) -> Target:
        """The origin itself as a target."""
        return Target("direct", self.origin_port, self.origin_port, False)

    def wait_ready(self, child: Child, t: Target, timeout: float = 30.0) -> None:
        """Poll a GET of /100b until it answers 200; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                status, _, _ = fetch(t.port, t.target("/100b"), t.host)
                if status == 200:
                    return
                last = f"status {status}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s ({last})")

    def start_aproxy(
        self, name: str, options: list[str], checkout: Path | None = None
    ) -> tuple[Child, Target]:
        """
        aproxy from C{checkout} (C{--checkout} by default) with C{options} on a free port,
        in its own work dir; ready and settled. Which files it imports is checked first
        and goes into the versions.
        """
        tree = (checkout or self.args.checkout).resolve()
        port = free_port()
        work, n = self.tmp / name, 1
        while work.exists():  # the same name started again, in another part
            n += 1
            work = self.tmp / f"{name}-{n}"
        work.mkdir()
        argv = [sys.executable, "-m", "twisted", "aproxy"]
        argv += ["--port", f"tcp:{port}:interface={LOOPBACK}", *options]
        env = checkout_env(tree)
        # Not in the checkout's directory: "python -m" puts the working directory first on
        # sys.path, so a checkout there would be imported instead of the one PYTHONPATH names.
        module, plugin = which_aproxy(env, work)
        for path in (module, plugin):
            if not Path(path).resolve().is_relative_to(tree):
                raise RuntimeError(f"{name}: {path} is imported, not the copy in {tree}")
        git = tool_output(["git", "-C", str(tree), "describe", "--always", "--dirty"])
        self.versions[name] = f"aproxy from {tree}" + (f" at {git}" if git else "")
        self.commands[name] = f"PYTHONPATH={shlex.quote(str(tree))} {shlex.join(argv)}"
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        t = Target(name, port, self.origin_port, True)
        self.wait_ready(child, t)
        settle(child.pid, 5)
        log(f"{name}: pid {child.pid}, {LOOPBACK}:{port}")
        return child, t

    def stop(self, child: Child) -> None:
        """
        Stop one child; an early exit is a problem, and so are error lines in an aproxy's
        log (a child whose name starts with C{aproxy}).
        """
        if not child.alive():
            self.problems.append(
                f"{child.name} exited early (status {child.proc.returncode}):\n"
                f"```\n{child.log_tail()}\n```"
            )
        child.stop()
        if child.name.startswith("aproxy") and child.logfile and child.logfile.exists():
            bad = [
                line
                for line in child.logfile.read_text(errors="replace").splitlines()
                if "Traceback" in line or '"isError": 1' in line or '"name": "error"' in line
            ]
            if bad:
                sample = "\n".join(x[:300] for x in bad[:3])
                self.problems.append(
                    f"{child.name} logged {len(bad)} error line(s), e.g.:\n```\n{sample}\n```"
                )

    # ---- the run

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """One part of the run: a failure is recorded and the run goes on with the next."""
        log(f"part {name} ...")
        try:
            yield
        except Exception as e:  # every failure is reported, the run goes on
            self.failures.append(f"{name}: {e}")
            log(f"FAILED: {name}: {e}")

    def intro(self) -> str:
        """The paragraph under the title: machine, origin, how to read the rows."""
        return (
            f"Machine: {machine_line()}. Origin: {self.origin_kind}. Client, origin and "
            "proxies share the CPUs; compare rows of the same run."
        )

    def report(self) -> str:
        """The Markdown report: the table, then how it ran, then problems and failures."""
        out = [
            f"# {self.title} ({self.mode.name})",
            "",
            self.intro(),
            "",
            f"| {' | '.join(self.columns)} |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {' | '.join(row)} |" for row in self.rows]
        out += notes_lines(self.versions, self.commands, self.problems, self.failures)
        return "\n".join(out) + "\n"

    def after_stop(self) -> None:
        """In L{cleanup}, once every child has stopped: read their logs, say."""

    def cleanup(self) -> None:
        """Stop every child and remove the temp dir (unless --keep-tmp)."""
        Child.stop_all()
        self.after_stop()
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
