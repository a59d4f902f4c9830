"""
L{Bench}: one benchmark run. Every scenario of L{loads} for each target in turn (direct,
then each proxy, started afresh for each phase), then the alternating rounds with every
target running; the results go to L{report}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
from pathlib import Path
from typing import Any

from .harness import Harness
from .httpio import Target
from .loads import download, idle_conns, load, slow_reader, upload
from .procs import Child, brief, log, rss_kib, tool_output
from .profiling import record_profile
from .settings import CHECKOUT, PACE_DELAY_MS, PHASE_KEYS
from .targets import APROXY_TARGETS, BUILD_B, PEERS, aproxy_version, peer_version

__all__ = ["Bench"]


class Bench(Harness):
    """One run: the scenarios per target, the alternating rounds, the versions."""

    def run_direct(self) -> None:
        """Every scenario against the origin itself (memory and CPU are the origin's)."""
        assert self.origin is not None
        pid, s, a = self.origin.pid, self.s, self.args
        t = Target("direct", self.origin_port, self.origin_port, False)
        self.results["direct"]["rss_start_mib"] = rss_kib(pid) / 1024
        self.scenario("direct", "idle", lambda: idle_conns(t, pid, s))
        self.scenario("direct", "slow_reader", lambda: slow_reader(t, self.big_path, pid, s))
        self.scenario("direct", "ka", lambda: load(t, "/100b", False, pid, s, a, self.tmp))
        if a.wrk:
            self.scenario(
                "direct",
                "paced",
                lambda: load(t, "/100b", False, pid, s, a, self.tmp, None, PACE_DELAY_MS),
            )
        self.scenario("direct", "close", lambda: load(t, "/100b", True, pid, s, a, self.tmp))
        big, size = self.big_path, s.big_bytes
        self.scenario(
            "direct", "download", lambda: self.transfers(lambda: download(t, big, size, pid, a))
        )
        if self.sink is not None:
            sink, f = self.sink.pid, self.upload_file()
            up = Target("direct", self.sink_port, self.sink_port, False)
            self.scenario(
                "direct", "upload", lambda: self.transfers(lambda: upload(up, f, size, sink, a))
            )

    def run_proxy(self, name: str) -> None:
        """Every scenario through proxy target C{name}, a fresh process for each phase."""
        s, a = self.s, self.args

        def idle(child: Child, t: Target) -> None:
            self.results[name]["rss_start_mib"] = rss_kib(child.pid) / 1024
            self.scenario(name, "idle", lambda: idle_conns(t, child.pid, s))
            self.probe(child, t, "the idle-connections scenario")

        def slow(child: Child, t: Target) -> None:
            self.scenario(name, "slow_reader", lambda: slow_reader(t, self.big_path, child.pid, s))
            self.probe(child, t, "the slow-reader scenario")

        def loads(child: Child, t: Target) -> None:
            pid = child.pid
            o = self.origin.pid if self.origin else None
            self.scenario(name, "ka", lambda: load(t, "/100b", False, pid, s, a, self.tmp, o))
            self.probe(child, t, "the keep-alive load")
            if a.wrk:
                self.scenario(
                    name,
                    "paced",
                    lambda: load(t, "/100b", False, pid, s, a, self.tmp, o, PACE_DELAY_MS),
                )
                self.probe(child, t, "the paced keep-alive load")
            if a.profile and name == "aproxy":
                self.profile(child, t)
            self.scenario(name, "close", lambda: load(t, "/100b", True, pid, s, a, self.tmp, o))
            self.probe(child, t, "the Connection: close load")
            big, size = self.big_path, s.big_bytes
            self.scenario(
                name, "download", lambda: self.transfers(lambda: download(t, big, size, pid, a))
            )
            self.probe(child, t, "the downloads")
            self.scenario(
                name,
                "tunnel",
                lambda: self.transfers(lambda: download(t, big, size, pid, a, tunnel=True)),
            )
            self.probe(child, t, "the CONNECT tunnel downloads")
            if self.sink is not None:
                f = self.upload_file()
                up = dataclasses.replace(t, origin_port=self.sink_port)
                self.scenario(
                    name, "upload", lambda: self.transfers(lambda: upload(up, f, size, pid, a))
                )
                self.probe(child, t, "the uploads")

        for phase, body in (("idle", idle), ("slow", slow), ("load", loads)):
            try:
                with self.proxy(name, phase) as (child, t):
                    body(child, t)
            except Exception as e:  # the other phases still run
                for key in PHASE_KEYS[phase]:  # what the phase did not get to: "failed"
                    self.results[name].setdefault(key, {"error": f"{phase} phase: {e}"})
                self.fail(name, f"{name} {phase} phase: {e}")

    def profile(self, child: Child, t: Target) -> None:
        """py-spy record during an extra keep-alive load run; summary into the report."""
        seconds = max(self.s.wrk_seconds, 2)
        s = dataclasses.replace(self.s, wrk_seconds=seconds)
        origin = self.origin.pid if self.origin else None
        done = record_profile(
            Path(self.args.profile).resolve(),
            self.args.profile_mode,
            child.pid,
            seconds,
            self.tmp / "py-spy.log",
            lambda: self.scenario(
                "aproxy",
                "ka_profiled",
                lambda: load(t, "/100b", False, child.pid, s, self.args, self.tmp, origin),
            ),
        )
        if done.command:
            self.commands["profile"] = done.command
        self.profile_lines = done.lines
        self.problems += done.problems

    def collect_versions(self) -> None:
        """Python, Twisted, the aproxy builds', the peers', wrk's and curl's versions."""
        a = self.args
        self.versions["Python (bench)"] = platform.python_version()
        sides = {"aproxy": aproxy_version(a, "aproxy")}
        if sides["aproxy"] is not None:
            self.versions["aproxy side"] = sides["aproxy"]
        if not a.aproxy_cmd:
            self.describe_checkout("aproxy checkout", CHECKOUT)
        if BUILD_B in self.targets:
            sides[BUILD_B] = side = aproxy_version(a, BUILD_B)
            if side is not None:
                self.versions["aproxy-b side"] = side
                self.check_build_b(side)
            if a.aproxy_b_checkout:
                self.describe_checkout("aproxy-b checkout", Path(a.aproxy_b_checkout).resolve())
        for name in self.targets:
            if name in APROXY_TARGETS:
                side = sides.get("aproxy" if name != BUILD_B else BUILD_B)
                flag = "--aproxy-cmd-b" if name == BUILD_B else "--aproxy-cmd"
                text = side if side is not None else f"unknown ({flag}: not queried)"
                self.target_versions[name] = text.split(" / from ")[0]
            elif name in PEERS:
                self.target_versions[name] = peer_version(name, a)
        if a.wrk:
            self.versions["wrk"] = tool_output([a.wrk, "--version"])
        if a.curl:
            self.versions["curl"] = tool_output([a.curl, "--version"])

    def check_build_b(self, side: str) -> None:
        """
        A problem when aproxy-b imports aproxy from elsewhere than C{--aproxy-b-checkout},
        or, without that option, from this checkout: the comparison would then not be of
        the build meant.
        """
        where = side.rpartition(" / from ")[2]
        if not where.endswith(".py"):
            return  # the query failed; the version line says why
        path = Path(where).resolve()
        if self.args.aproxy_b_checkout:
            expected = Path(self.args.aproxy_b_checkout).resolve()
            if not path.is_relative_to(expected):
                self.problems.append(
                    f"aproxy-b imports aproxy from {path}, not from --aproxy-b-checkout {expected}"
                )
        elif path.is_relative_to(CHECKOUT):
            self.problems.append(
                f"aproxy-b imports aproxy from this checkout ({path}): it measures the same "
                "code as aproxy (give --aproxy-b-checkout DIR)"
            )

    def run(self) -> None:
        """Origin, then every scenario for each target in turn."""
        self.collect_versions()
        self.start_origin()
        self.target_versions["direct"] = self.versions.get("nginx") or self.origin_kind
        try:
            self.start_sink()
        except Exception as e:  # the other scenarios still run
            self.failures.append(f"upload sink: {e}")
            log(f"upload sink FAILED: {e}")
        for name in self.targets:
            if name == "direct":
                self.run_direct()
            else:
                self.run_proxy(name)
        if self.args.wrk and self.s.rounds:
            self.run_rounds()

    def run_rounds(self) -> None:
        """
        The keep-alive and the Connection: close loads once more, in C{s.rounds} rounds
        that take every target in turn (each round starting one target later), with all
        proxies running; per target the medians of its rounds. A slow spell of a shared
        machine then lands on every target alike instead of on whichever one was being
        measured, so these medians are the figures to compare targets by (the single runs
        above are each target alone).
        """
        s, a = self.s, self.args
        settings = dataclasses.replace(s, wrk_seconds=s.round_seconds)
        origin = self.origin.pid if self.origin else None
        loads = (("rounds", False, "keep-alive"), ("rounds_close", True, "Connection: close"))
        # Comparing two aproxy builds: the CONNECT tunnel download in the rounds too, one per
        # round and proxy, so its median compares the builds like the loads' do.
        tunnel = BUILD_B in self.targets
        keys = [key for key, _, _ in loads] + (["rounds_tunnel"] if tunnel else [])
        with contextlib.ExitStack() as stack:
            live: list[tuple[str, Target, int, int | None]] = []
            for name in self.targets:
                if name == "direct":
                    if origin is not None:
                        t = Target("direct", self.origin_port, self.origin_port, False)
                        live.append((name, t, origin, None))
                    continue
                try:
                    child, t = stack.enter_context(self.proxy(name, "rounds"))
                except Exception as e:  # the others still run
                    for key in keys:
                        self.results[name][key] = {"error": f"rounds phase: {e}"}
                    self.fail(name, f"{name} rounds phase: {e}")
                    continue
                live.append((name, t, child.pid, origin))
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in range(s.rounds):
                k = r % len(live) if live else 0
                for name, t, pid, o in live[k:] + live[:k]:
                    for key, close, what in loads:
                        log(f"{name}: {what} round {r + 1} of {s.rounds} ...")
                        try:
                            result = load(t, "/100b", close, pid, settings, a, self.tmp, o)
                        except Exception as e:  # that target's rounds are incomplete
                            self.results[name][key] = {"error": f"round {r + 1}: {e}"}
                            self.fail(name, f"{name} {what} round {r + 1}: {e}")
                            continue
                        self.check_health(name, f"{what} round {r + 1}", result)
                        runs.setdefault((name, key), []).append(result)
                    if tunnel and name != "direct":
                        self.tunnel_round(name, t, pid, r, runs)
        for (name, key), results in runs.items():
            if key in self.results[name]:
                continue  # failed in some round
            summary: dict[str, Any] = {"rounds": len(results)}
            for field in ("rps", "p50_ms", "p99_ms", "cpu_per_10k", "mbps"):
                each = [float(x[field]) for x in results if x.get(field) is not None]
                if each:
                    summary[field] = statistics.median(each)
                    summary[f"{field}_each"] = [round(x, 2) for x in each]
            self.results[name][key] = summary
            log(f"{name}: {key}: {brief(summary)}")

    def tunnel_round(
        self,
        name: str,
        t: Target,
        pid: int,
        r: int,
        runs: dict[tuple[str, str], list[dict[str, Any]]],
    ) -> None:
        """One CONNECT tunnel download of the large file in round C{r}, into C{runs}."""
        log(f"{name}: CONNECT tunnel round {r + 1} of {self.s.rounds} ...")
        size = self.s.big_bytes
        try:
            result = download(t, self.big_path, size, pid, self.args, tunnel=True)
        except Exception as e:  # that target's rounds are incomplete
            self.results[name]["rounds_tunnel"] = {"error": f"round {r + 1}: {e}"}
            self.fail(name, f"{name} CONNECT tunnel round {r + 1}: {e}")
            return
        runs.setdefault((name, "rounds_tunnel"), []).append(result)
