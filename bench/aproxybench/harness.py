"""
L{Harness}: what one benchmark run holds: the temp dir, the origin and the upload sink, the
proxy targets (each started afresh for a phase), and the results, problems and failures that
go into the report. L{runner.Bench} decides what to run with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .httpio import Target, http_fetch
from .procs import Child, brief, free_port, log, sbin, settle, tool_output
from .settings import (
    DISTURBED_SHARE,
    LOOPBACK,
    MIB,
    PROGRAMS,
    SLOW_TRANSFER_SECONDS,
    SMALL_BODY,
    Settings,
)
from .targets import APROXY_TARGETS, BUILD_B, PEERS, proxy_argv, render

__all__ = ["Harness"]


class Harness:
    """Owns the temp dir, the origin, the proxies under test, the results and the problems."""

    def __init__(
        self, args: argparse.Namespace, s: Settings, targets: list[str], skipped: dict[str, str]
    ) -> None:
        self.args = args
        self.s = s
        self.targets = targets
        self.skipped = skipped
        self.tmp = Path(tempfile.mkdtemp(prefix="aproxy-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers and squid may run as another user
        self.results: dict[str, dict[str, Any]] = {name: {} for name in targets}
        self.problems: list[str] = []
        self.failures: list[str] = []  # direct and aproxy: these make the exit status 1
        self.peer_failures: list[str] = []  # squid, tinyproxy, proxy.py: reported only
        self.commands: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.target_versions: dict[str, str] = {}
        self.origin: Child | None = None
        self.origin_kind = ""
        self.origin_port = 0
        self.sink: Child | None = None
        self.sink_port = 0
        self.data = self.tmp / "data"
        self.big_path = f"/{s.big_bytes // MIB}m" if s.big_bytes >= MIB else "/big"
        self.profile_lines: list[str] = []
        self.disturbed: list[str] = []  # load runs with a large unattributed CPU share

    def fail(self, who: str, text: str) -> None:
        """Record a failure: a peer's is reported, aproxy's and direct's fail the run."""
        (self.peer_failures if who in PEERS else self.failures).append(text)
        log(f"FAILED: {text}")

    # ---- setup

    def write_files(self) -> Path:
        """The origin's files, in the temp dir."""
        data = self.data
        data.mkdir()
        os.chmod(data, 0o755)
        (data / "100b").write_bytes(SMALL_BODY)
        block = bytes(range(256)) * 4096  # 1 MiB
        with open(data / self.big_path.lstrip("/"), "wb") as f:
            left = self.s.big_bytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        for p in data.iterdir():
            os.chmod(p, 0o644)
        return data

    def start_origin(self) -> None:
        """nginx from a rendered config when available, else the asyncio fallback origin."""
        data = self.write_files()
        self.origin_port = free_port()
        nginx = None if self.args.no_nginx else shutil.which("nginx") or sbin("nginx")
        if nginx:
            work = self.tmp / "nginx"
            work.mkdir()
            conf = work / "nginx.conf"
            conf.write_text(
                render("nginx.conf", work=work, port=self.origin_port, data=data, location="")
            )
            argv = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
            self.origin_kind = "nginx (1 worker)"
            self.versions["nginx"] = tool_output([nginx, "-v"])
        else:
            script = PROGRAMS / "origin.py"
            argv = [sys.executable, str(script), str(self.origin_port), str(data)]
            self.origin_kind = "Python asyncio fallback origin (nginx not used)"
        self.commands["origin"] = shlex.join(argv)
        self.origin = Child("origin", argv, logfile=self.tmp / "origin.log", cwd=self.tmp)
        direct = Target("direct", self.origin_port, self.origin_port, False)
        self.wait_ready(self.origin, direct, 15)
        log(f"origin: {self.origin_kind}, pid {self.origin.pid}, {LOOPBACK}:{self.origin_port}")

    def start_sink(self) -> None:
        """
        The upload sink (a small threaded Python server): it answers only after the whole
        body, with its length. nginx's C{return 204} answers at once and discards the body
        afterwards, so the answer would overtake the body through a proxy.
        """
        script = PROGRAMS / "sink.py"
        self.sink_port = free_port()
        argv = [sys.executable, str(script), str(self.sink_port)]
        self.commands["upload sink"] = shlex.join(argv)
        self.sink = Child("sink", argv, logfile=self.tmp / "sink.log", cwd=self.tmp)
        self.wait_ready(self.sink, Target("sink", self.sink_port, self.sink_port, False), 15)
        log(f"upload sink: pid {self.sink.pid}, {LOOPBACK}:{self.sink_port}")

    def wait_ready(self, child: Child, t: Target, timeout: float) -> None:
        """Poll a GET of /100b until it answers 200; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                status, _ = http_fetch(t.port, t.target("/100b"), t.host, timeout=2)
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"{child.name} not ready after {timeout:.0f} s ({last})")

    @contextlib.contextmanager
    def proxy(self, name: str, phase: str) -> Iterator[tuple[Child, Target]]:
        """A fresh process of proxy target C{name} for one phase, stopped afterwards."""
        port = free_port()
        work = self.tmp / name / phase
        work.mkdir(parents=True)
        os.chmod(work, 0o777)  # squid, started as root, runs as its own user
        argv, env = proxy_argv(self.args, name, port, work, self.origin_port)
        command = shlex.join(argv)
        if name == BUILD_B and "PYTHONPATH" in env:  # which code it runs
            command = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {command}"
        self.commands[name] = command  # the last phase's (the load phase)
        child = Child(name, argv, logfile=work / "output.log", env=env, cwd=work)
        t = Target(name, port, self.origin_port, True)
        ready = False
        try:
            self.wait_ready(child, t, 30)
            settle(child.pid)
            ready = True
            log(f"{name} ({phase}): pid {child.pid}, {LOOPBACK}:{port}")
            yield child, t
        finally:
            alive = child.alive()
            child.stop()
            if not ready:
                pass  # wait_ready's exception says why
            elif not alive:
                self.problems.append(
                    f"{name} exited during the {phase} phase (status "
                    f"{child.proc.returncode}); log tail:\n```\n{child.log_tail()}\n```"
                )
            elif name in APROXY_TARGETS:
                self.scan_log(child, phase)

    def scan_log(self, child: Child, phase: str) -> None:
        """Report tracebacks and error-level lines from an aproxy log."""
        if child.logfile is None or not child.logfile.exists():
            return
        text = child.logfile.read_text(errors="replace")
        bad = [
            line
            for line in text.splitlines()
            if "Traceback" in line
            or '"isError": 1' in line
            or '"name": "error"' in line
            or '"name": "critical"' in line
        ]
        if bad:
            sample = "\n".join(x[:400] for x in bad[:5])
            self.problems.append(
                f"{child.name} logged {len(bad)} error line(s) in the {phase} phase, e.g.:\n"
                f"```\n{sample}\n```"
            )

    # ---- scenarios

    def scenario(self, who: str, key: str, fn: Callable[[], Any]) -> Any:
        """Run one scenario; an exception is recorded as a failure, not raised."""
        log(f"{who}: {key} ...")
        try:
            r = fn()
        except Exception as e:  # every failure is reported, the run goes on
            self.results[who][key] = {"error": str(e)}
            self.fail(who, f"{who} {key}: {e}")
            return None
        self.results[who][key] = r
        log(f"{who}: {key}: {brief(r)}")
        self.check_health(who, key, r)
        return r

    def check_health(self, who: str, key: str, r: Any) -> None:
        """Note errors and non-2xx answers seen by a load run, and runs disturbed by others."""
        if not isinstance(r, dict):
            return
        noise = r.get("unattributed")
        if isinstance(noise, float) and noise > DISTURBED_SHARE:
            self.disturbed.append(f"{who} {key}")
            self.problems.append(
                f"{who} {key}: {noise:.0%} of all CPUs were busy with work not charged to the "
                "client, the origin or the proxy: other work on the machine disturbed this run"
            )
        errs, bad = r.get("socket_errors", 0), r.get("non_2xx", 0)
        if errs or bad:
            self.problems.append(
                f"{who} {key}: {errs} socket errors {r.get('errors_detail')}, {bad} non-2xx "
                f"answers ({r.get('non_2xx_note')}) out of {r.get('requests')} requests"
            )
        if who != "direct" and r.get("eof") and key == "slow_reader":
            self.problems.append(f"{who} slow_reader: the connection ended before the body did")

    def probe(self, child: Child, t: Target, after: str) -> None:
        """After a scenario: does the proxy still answer promptly? A stall is a problem."""
        t0 = time.monotonic()
        try:
            status, n = http_fetch(t.port, t.target("/100b"), t.host, timeout=5)
            if status != 200 or n != len(SMALL_BODY):
                self.problems.append(
                    f"{t.name} after {after}: probe got status {status}, {n} bytes"
                )
        except OSError as e:
            self.problems.append(
                f"{t.name} after {after}: no answer to a GET of /100b within 5 s ({e!r}); "
                f"alive={child.alive()}"
            )
            return
        if time.monotonic() - t0 > 1:
            self.problems.append(
                f"{t.name} after {after}: probe took {time.monotonic() - t0:.1f} s"
            )

    def transfers(self, one: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """
        Median MB/s over C{s.downloads} large transfers (downloads or uploads); one only
        when the first took longer than L{SLOW_TRANSFER_SECONDS}.
        """
        runs = [one()]
        while len(runs) < self.s.downloads and runs[0]["seconds"] <= SLOW_TRANSFER_SECONDS:
            runs.append(one())
        return {
            "cmd": runs[0]["cmd"],
            "mbps": statistics.median(r["mbps"] for r in runs),
            "runs": len(runs),
            "runs_mbps": [round(r["mbps"], 1) for r in runs],
            "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
        }

    def upload_file(self) -> Path:
        """The file POSTed by the upload scenario: the origin's large file."""
        return self.data / self.big_path.lstrip("/")

    def describe_checkout(self, key: str, path: Path) -> None:
        """Name a git checkout's commit (C{git describe}) under C{key} in the versions."""
        if (path / ".git").exists():
            git = tool_output(["git", "-C", str(path), "describe", "--always", "--dirty"])
            if git:
                self.versions[key] = f"{path} at {git}"

    def cleanup(self) -> None:
        """Stop every child and remove the temp dir (unless --keep-tmp)."""
        Child.stop_all()
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
