"""
The targets: a direct connection to the origin, aproxy (this checkout, with one or two
workers, and optionally a second build, C{aproxy-b}, to compare two builds in one run) and
the comparison proxies (squid, tinyproxy, proxy.py): how each is configured and started, and
which of them a command line selects.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .procs import sbin, tool_output
from .settings import CHECKOUT, LOOPBACK, TEMPLATES

__all__ = [
    "APROXY_TARGETS",
    "BENCH_VENVS",
    "BUILD_B",
    "PEERS",
    "TARGETS",
    "aproxy_argv",
    "aproxy_env",
    "aproxy_version",
    "find_peer",
    "peer_version",
    "peer_where",
    "proxy_argv",
    "render",
    "select_targets",
    "target_list",
]

# aproxy targets and their --workers count. aproxy-b is a second aproxy build
# (--aproxy-cmd-b, --aproxy-b-checkout), measured like aproxy to compare the two.
BUILD_B = "aproxy-b"
APROXY_TARGETS = {"aproxy": 1, "aproxy-w2": 2, BUILD_B: 1}
# Comparison proxies, run when installed; their failures do not fail the run.
PEERS = ("squid", "tinyproxy", "proxypy")
TARGETS = ("direct", *APROXY_TARGETS, *PEERS)
# Where bench/../shared/bench's setup.sh puts proxy.py's venv.
BENCH_VENVS = Path(os.environ.get("BENCH_VENVS") or "/tmp/bench-venvs")


def render(template: str, **values: object) -> str:
    """
    The config file C{template} from C{bench/templates/} with each C{{name}} replaced by
    C{values[name]} (plain replacement: nginx's own braces stay as they are).
    """
    text = (TEMPLATES / template).read_text()
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def _is_checkout(entry: str) -> bool:
    """Whether a C{PYTHONPATH} entry is this checkout."""
    return bool(entry) and Path(entry).resolve() == CHECKOUT


def aproxy_env(args: argparse.Namespace, name: str) -> dict[str, str]:
    """
    The environment of aproxy target C{name}. aproxy and aproxy-w2 without C{--aproxy-cmd}
    import this checkout (C{PYTHONPATH} starts with it); with C{--aproxy-cmd} the
    environment is passed unchanged. aproxy-b never imports this checkout: it is dropped
    from an inherited C{PYTHONPATH}, and C{--aproxy-b-checkout DIR} is put first.
    """
    env = dict(os.environ)
    if name == BUILD_B:
        entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        entries = [p for p in entries if not _is_checkout(p)]
        if args.aproxy_b_checkout:
            entries.insert(0, str(Path(args.aproxy_b_checkout).resolve()))
        if entries:
            env["PYTHONPATH"] = os.pathsep.join(entries)
        else:
            env.pop("PYTHONPATH", None)
        return env
    if args.aproxy_cmd:
        return env
    if (CHECKOUT / "aproxy" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p
        )
    return env


def aproxy_argv(
    args: argparse.Namespace, name: str, port: int, origin_port: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of aproxy target C{name} for one start on C{port}."""
    env = aproxy_env(args, name)
    listen = f"tcp:{port}:interface={LOOPBACK}"
    # --connect-ports: the tunnel download's target. --max-clients-per-ip: every client
    # here comes from 127.0.0.1, and the default per-address limit (256) would refuse
    # most of the 1000 idle connections.
    extra = {
        "--connect-ports": str(origin_port),
        "--max-clients-per-ip": "100000",
    }
    workers = APROXY_TARGETS[name]
    if workers > 1:
        extra["--workers"] = str(workers)
    text = args.aproxy_cmd_b if name == BUILD_B else args.aproxy_cmd
    if text:
        argv = shlex.split(text.replace("{port}", str(port)))
        if "{port}" not in text:
            argv += ["--port", listen]
        for option, value in extra.items():
            if option not in text:
                argv += [option, value]
        return argv, env
    argv = [sys.executable, "-m", "twisted", "aproxy", "--port", listen]
    for option, value in extra.items():
        argv += [option, value]
    return argv, env


def aproxy_version(args: argparse.Namespace, name: str) -> str | None:
    """
    What aproxy target C{name} runs: aproxy's version, the Python and Twisted running it,
    and where aproxy was imported from; None when its command is not a Python interpreter
    this script can ask (C{--aproxy-cmd}, or a C{--aproxy-cmd-b} such as twistd).
    """
    python: str | None = sys.executable
    text = args.aproxy_cmd_b if name == BUILD_B else args.aproxy_cmd
    if text and name == BUILD_B:
        first = shlex.split(text)[0]
        python = first if Path(first).name.startswith("python") else None
    elif text:
        python = None
    if python is None:
        return None
    code = (
        "import platform, twisted, aproxy; print('aproxy', aproxy.__version__,"
        " '/ Python', platform.python_version(), '/ Twisted', twisted.__version__,"
        " '/ from', aproxy.__file__)"
    )
    try:
        p = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            env=aproxy_env(args, name),
            cwd="/",  # as the started aproxy: not this checkout's directory on sys.path
            timeout=30,
        )
        return (p.stdout or p.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError) as e:
        return f"unknown ({e!r})"


def proxy_argv(
    args: argparse.Namespace, name: str, port: int, work: Path, origin_port: int
) -> tuple[list[str], dict[str, str]]:
    """
    The command line and environment of proxy target C{name} listening on
    127.0.0.1:C{port}; a peer's config is rendered into C{work} first.
    """
    if name in APROXY_TARGETS:
        return aproxy_argv(args, name, port, origin_port)
    exe = find_peer(name, args)
    if exe is None:
        raise RuntimeError(f"{name} is not installed")
    env = dict(os.environ)
    if name == "squid":
        # squid as a plain forwarder: no cache in memory or on disk (no cache_dir), nothing
        # sent off the machine (no DNS server but 127.0.0.1, no ICP/HTCP, no ICMP pinger),
        # logs in its temp dir. CONNECT may reach any port (no SSL_ports rule): the tunnel
        # scenario targets the origin's plain-HTTP port. squid waits shutdown_lifetime
        # before it exits on SIGTERM.
        conf = work / "squid.conf"
        conf.write_text(render("squid.conf", listen=f"{LOOPBACK}:{port}", work=work))
        os.chmod(conf, 0o644)
        return [exe, "-N", "-f", str(conf)], env
    if name == "tinyproxy":
        # Loopback only, no Via/X-Tinyproxy headers, CONNECT to any port (no ConnectPort
        # lines), quiet. It closes the client connection after every response.
        conf = work / "tinyproxy.conf"
        conf.write_text(render("tinyproxy.conf", port=port, host=LOOPBACK, work=work))
        return [exe, "-d", "-c", str(conf)], env
    # proxy.py keeps its data (certificates, cache) under ~/.proxy: use the temp dir.
    env["HOME"] = str(work)
    return [exe, "--hostname", LOOPBACK, "--port", str(port), "--log-level", "WARNING"], env


def find_peer(name: str, args: argparse.Namespace) -> str | None:
    """
    The executable of comparison proxy C{name}, or None when it is not installed: the
    C{--squid}/C{--tinyproxy}/C{--proxypy} option when given, else squid and tinyproxy on
    C{PATH} or in /usr/sbin, and proxy.py in BENCH_VENVS/proxypy (default /tmp/bench-venvs).
    """
    given: str | None = getattr(args, name, None)
    if given:
        return shutil.which(given)
    if name == "proxypy":
        return shutil.which(str(BENCH_VENVS / "proxypy" / "bin" / "proxy"))
    return shutil.which(name) or sbin(name)


def peer_where(name: str, args: argparse.Namespace) -> str:
    """Where L{find_peer} looked, for the report's "not installed" line."""
    given = getattr(args, name, None)
    if given:
        return f"--{name} {given} is not an executable"
    if name == "proxypy":
        return f"no {BENCH_VENVS}/proxypy/bin/proxy (--proxypy PATH, or BENCH_VENVS)"
    return f"no {name} on PATH or in /usr/sbin (--{name} PATH)"


def peer_version(name: str, args: argparse.Namespace) -> str:
    """The first line of a peer's version output (proxy.py's with its venv's Python)."""
    exe = find_peer(name, args)
    if exe is None:
        return "-"
    if name == "squid":
        return tool_output([exe, "-v"]) or "squid (version unknown)"
    if name == "tinyproxy":
        return tool_output([exe, "-v"]) or "tinyproxy (version unknown)"
    text = f"proxy.py {tool_output([exe, '--version']) or '(version unknown)'}"
    python = Path(exe).parent / "python"
    if python.exists():
        text += f" / {tool_output([str(python), '--version'])}"
    return text


def target_list(text: str) -> list[str]:
    """C{--targets}: comma-separated names from L{TARGETS}, in the order given."""
    names: list[str] = []
    for name in (x.strip() for x in text.split(",")):
        if name not in TARGETS:
            raise argparse.ArgumentTypeError(
                f"unknown target {name!r} (choose from {', '.join(TARGETS)})"
            )
        if name not in names:
            names.append(name)
    return names


def select_targets(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """
    The targets to run, and those left out with the reason. Default: direct, aproxy and
    every installed peer; C{--smoke} without C{--targets}: direct and aproxy only. A peer
    that is not installed is left out, never a failure. A second build (C{--aproxy-cmd-b}
    or C{--aproxy-b-checkout}) adds aproxy-b after aproxy unless C{--targets} is given.
    """
    skipped: dict[str, str] = {}
    if args.targets is not None:
        wanted = list(args.targets)
    elif args.smoke:
        wanted = ["direct", "aproxy"]
        for name in PEERS:
            skipped[name] = "not run: --smoke runs direct and aproxy unless --targets names more"
    else:
        wanted = ["direct", "aproxy", *PEERS]
    if args.targets is None and (args.aproxy_cmd_b or args.aproxy_b_checkout):
        wanted.insert(wanted.index("aproxy") + 1, BUILD_B)
    chosen = []
    for name in wanted:
        if name in PEERS and find_peer(name, args) is None:
            skipped[name] = f"skipped, not installed: {peer_where(name, args)}"
        else:
            chosen.append(name)
    return chosen, skipped
