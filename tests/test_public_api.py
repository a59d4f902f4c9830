"""
The public API an embedder relies on (C{aproxy.__all__}) is pinned, and the test suite is
laid out so that test modules share code through support modules, not through each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.interface import InterfaceClass

import aproxy

TESTS = Path(__file__).resolve().parent

PUBLIC = [
    "Exchange",
    "IAuthenticator",
    "IExchangeObserver",
    "IPolicy",
    "IUpstreamConnector",
    "ProxyConfig",
    "ProxyError",
    "ProxyFactory",
    "__version__",
    "makeService",
]


def imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """Every module C{path} imports (at any depth), with the names taken from it."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = "tests." + module if module else "tests"
            found.append((module, [alias.name for alias in node.names]))
            found.extend((f"{module}.{alias.name}", []) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


class PublicAPITests(SynchronousTestCase):
    """C{import aproxy} gives an embedder exactly the documented names."""

    def test_all_pinned(self) -> None:
        """C{aproxy.__all__} is this list: adding or removing a public name is a decision."""
        self.assertEqual(sorted(aproxy.__all__), PUBLIC)

    def test_names_resolve(self) -> None:
        """Each public name is the class, interface or function of that name (wherever
        inside the package it lives, which may change)."""
        for name in aproxy.__all__:
            if name != "__version__":
                value = getattr(aproxy, name)
                self.assertEqual(value.__name__, name)
                self.assertTrue(value.__module__.startswith("aproxy."), value.__module__)
        self.assertIsInstance(aproxy.__version__, str)

    def test_interfaces_are_zope_interfaces(self) -> None:
        """The C{I...} names are zope interfaces, usable with C{@implementer}."""
        for name in aproxy.__all__:
            if name.startswith("I"):
                self.assertIsInstance(getattr(aproxy, name), InterfaceClass, name)

    def test_public_names_documented(self) -> None:
        """Every public name (and L{aproxy.testing}) says what it is for."""
        import aproxy.testing

        for name in aproxy.__all__:
            if name != "__version__":
                self.assertTrue(getattr(aproxy, name).__doc__, name)
        for name in aproxy.testing.__all__:
            self.assertTrue(getattr(aproxy.testing, name).__doc__, name)


class TestLayoutTests(SynchronousTestCase):
    """Test modules depend on C{aproxy} and support modules, never on each other."""

    def test_no_test_module_imports_another(self) -> None:
        """No tests/test_*.py imports a tests/test_*.py module (shared code lives in
        tests/support.py and the other support modules, or in aproxy.testing)."""
        offenders = [
            f"{path.name}: {module}"
            for path in sorted(TESTS.glob("test_*.py"))
            for module, _ in imported_modules(path)
            if module.startswith("tests.test_")
        ]
        self.assertEqual(offenders, [])

    def test_no_private_names_across_test_modules(self) -> None:
        """No module in tests/ imports a leading-underscore name from another one."""
        offenders = [
            f"{path.name}: {module}.{name}"
            for path in sorted(TESTS.glob("*.py"))
            for module, names in imported_modules(path)
            if module.startswith("tests")
            for name in names
            if name.startswith("_")
        ]
        self.assertEqual(offenders, [])

    def test_layout_check_sees_an_offender(self) -> None:
        """The import scan finds both import forms (so the two tests above can fail)."""
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "test_x.py"
            path.write_text(
                "from tests.test_proxy import ProxyTestCase\n"
                "import tests.test_auth\n"
                "from .support import _hidden\n"
            )
            modules = imported_modules(path)
        self.assertIn(("tests.test_proxy", ["ProxyTestCase"]), modules)
        self.assertIn(("tests.test_auth", []), modules)
        self.assertIn(("tests.support", ["_hidden"]), modules)
