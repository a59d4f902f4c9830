"""Running a real C{twistd aproxy} in a subprocess for the signal and process tests."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(
    args: list[str],
    cwd: str,
    pass_fds: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """
    Start C{args} with the checkout on PYTHONPATH, output (both streams) to a pipe;
    C{env} adds to (or overrides) the environment.
    """
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=pass_fds,
        # Unbuffered: wait_for_line selects on the descriptor, so no line may wait in a
        # buffer of ours (two lines arriving together would hide the second one).
        bufsize=0,
    )


def stop(proc: subprocess.Popen[bytes], seconds: float = 20) -> int:
    """SIGTERM the process, wait (bounded), kill it if it is still there; its exit code."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def twistd(
    args: list[str], cwd: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """C{twistd -n aproxy ARGS} for the duration of the block, stopped afterwards."""
    proc = start([TWISTD, "-n", "--pidfile=", "aproxy", *args], cwd, env=env)
    try:
        yield proc
    finally:
        stop(proc)


def wait_for_line(proc: subprocess.Popen[bytes], text: bytes, seconds: float = 20) -> bytes:
    """Read the process's output until a line contains C{text} (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen in output:\n{seen.decode(errors='replace')}")


def status_of(port: int, target: bytes, sock: socket.socket | None = None) -> bytes:
    """Send one GET for C{target} (on C{sock} if given, kept open) and return its status line."""
    own = sock is None
    conn = sock or socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        conn.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += conn.recv(65536)
        return head.split(b"\r\n")[0]
    finally:
        if own:
            conn.close()
