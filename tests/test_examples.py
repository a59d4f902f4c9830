"""The files in examples/ and the README's examples work: the .tac, the TOML config, systemd
socket activation and the "Testing your embedding" test."""

from __future__ import annotations

import runpy
import socket
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

from twisted.application.service import IService
from twisted.trial.unittest import SynchronousTestCase

from aproxy.run.tap import Options
from tests.processes import TWISTD, start, stop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def readme_example(section: str, document: str = "README.rst") -> str:
    """The first literal block (after a C{::} paragraph) of section C{section} of the
    README (or of another reStructuredText C{document} of the checkout)."""
    lines = (ROOT / document).read_text().splitlines()
    start = lines.index(section)
    assert set(lines[start + 1]) == {"-"}, section
    index = start + 2
    while not lines[index].endswith("::"):
        index += 1
    block: list[str] = []
    for line in lines[index + 1 :]:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


class ExampleTests(SynchronousTestCase):
    """Each example is usable as shipped."""

    def test_tac_builds_an_application(self) -> None:
        """examples/aproxy.tac defines an application with the proxy service in it."""
        namespace = runpy.run_path(str(EXAMPLES / "aproxy.tac"))
        service = IService(namespace["application"])
        [proxy] = list(service)  # type: ignore[call-overload]
        self.assertEqual(proxy.factory.config.port, ("tcp:3128:interface=127.0.0.1",))

    def test_toml_example_loads(self) -> None:
        """examples/aproxy.toml is a valid config file."""
        options = Options()
        options.parseOptions(["--config", str(EXAMPLES / "aproxy.toml")])
        self.assertTrue(options["proxy-config"].block_private)

    def test_readme_testing_example_runs(self) -> None:
        """The README's "Testing your embedding" example is a test suite that passes."""
        self.run_example(readme_example("Testing your embedding"), "README.rst")

    def test_addon_testing_example_runs(self) -> None:
        """docs/addons.rst's "Testing an addon" example is a test suite that passes."""
        document = "docs/addons.rst"
        self.run_example(readme_example("Testing an addon", document), document)

    def run_example(self, source: str, document: str) -> None:
        """Run the test cases C{source} defines: two, both passing."""
        namespace: dict[str, object] = {"__name__": "readme_example"}
        exec(compile(source, document, "exec"), namespace)
        suite = unittest.TestSuite()
        for value in namespace.values():
            if (
                isinstance(value, type)
                and issubclass(value, unittest.TestCase)
                and value.__module__ == "readme_example"
            ):
                suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(value))
        result = unittest.TestResult()
        suite.run(result)
        self.assertEqual((result.testsRun, result.errors, result.failures), (2, [], []), source)

    def test_systemd_socket_activation(self) -> None:
        """--port systemd:domain=INET:index=0 serves on a socket passed as systemd does."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        # systemd passes sockets from fd 3 on, with LISTEN_FDS and LISTEN_PID (the PID of
        # the service itself): a small wrapper sets those and then execs twistd.
        launcher = (
            "import os, sys\n"
            "os.dup2(int(sys.argv[1]), 3)\n"
            "os.environ['LISTEN_FDS'] = '1'\n"
            "os.environ['LISTEN_FDNAMES'] = 'aproxy.socket'\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n"
        )
        with tempfile.TemporaryDirectory() as cwd:
            args = [sys.executable, "-c", launcher, str(listener.fileno()), TWISTD, "-n"]
            args += ["--pidfile=", "aproxy", "--port", "systemd:domain=INET:index=0"]
            proc = start(args, cwd, pass_fds=(listener.fileno(),))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    reply = client.recv(65536)
            finally:
                stop(proc)
        # Answered by aproxy (an origin-form request gets its explanation).
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 Bad Request"), reply)
        self.assertIn(b"forward proxy", reply)
