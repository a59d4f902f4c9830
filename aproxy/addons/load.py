"""
Loading addons from C{--addon} strings: C{MODULE:NAME} (an importable module) or
C{path/to/file.py:NAME} (a file). When C{NAME} is a class or a function, it is called with
no arguments and the result is the addon; otherwise the object itself is.

L{check_spec} only imports and looks the name up (what the command line checks before
any worker starts); L{load_addons} makes the addon objects (once per process: every
worker has its own). An attribute that looks like a misspelled hook name is a warning.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from aproxy.addons.api import HOOKS
from aproxy.addons.run import Addon

__all__ = ["AddonLoadError", "check_spec", "load_addons", "make_addon", "misspelled"]

log = Logger()


class AddonLoadError(ValueError):
    """An addon that can't be loaded: the message is one line naming it."""


def _source(spec: str) -> tuple[Any, str]:
    """Import what C{spec} names: (the object, its name)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not name.isidentifier():
        raise AddonLoadError(f"--addon {spec}: expected MODULE:NAME or path/to/file.py:NAME")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            module = _from_file(Path(where))
        else:
            module = importlib.import_module(where)
    except AddonLoadError:
        raise
    except Exception as e:
        raise AddonLoadError(f"--addon {spec}: can't import {where}: {_one_line(e)}") from None
    try:
        return getattr(module, name), name
    except AttributeError:
        raise AddonLoadError(f"--addon {spec}: {where} has no {name}") from None


def _from_file(path: Path) -> Any:
    if not path.is_file():
        raise AddonLoadError(f"--addon {path}: no such file")
    module_name = "aproxy_addon_" + "".join(c if c.isalnum() else "_" for c in str(path))
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise AddonLoadError(f"--addon {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


def check_spec(spec: str) -> None:
    """
    Check that C{spec} can be loaded (its module imports and has the name), without
    making the addon.

    @raise AddonLoadError: If not.
    """
    _source(spec)


def make_addon(obj: Any, name: str) -> Addon:
    """
    The addon C{obj} gives: called when it is a class or a function, itself otherwise;
    warns of attributes that look like misspelled hooks.

    @raise AddonLoadError: If calling it fails.
    """
    if inspect.isclass(obj) or inspect.isfunction(obj):
        try:
            obj = obj()
        except Exception as e:
            raise AddonLoadError(f"addon {name}: making it failed: {_one_line(e)}") from None
    for attr, hook in misspelled(obj):
        log.warn(
            "addon {name}: {attr!r} is not a hook; did you mean {hook!r}?",
            name=name,
            attr=attr,
            hook=hook,
        )
    return Addon(name, obj)


def misspelled(obj: Any) -> list[tuple[str, str]]:
    """
    (attribute, hook) for each public method of C{obj} whose name is close to a hook's
    (data attributes are not hooks: a counter named C{requests} is fine).
    """
    found = []
    for attr in dir(obj):
        if attr.startswith("_") or attr in HOOKS or not callable(getattr(obj, attr, None)):
            continue
        close = difflib.get_close_matches(attr.lower(), HOOKS, n=1, cutoff=0.8)
        if close:
            found.append((attr, close[0]))
    return found


def load_addons(specs: Sequence[str], objects: Sequence[Any] = ()) -> list[Addon]:
    """
    The addons of C{specs} (strings, as for C{--addon}), then C{objects} given by an
    embedder (made the same way), in that order.

    @raise AddonLoadError: If one can't be loaded (one line naming it).
    """
    addons = []
    for spec in specs:
        obj, name = _source(spec)
        addons.append(make_addon(obj, name))
    for obj in objects:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        addons.append(make_addon(obj, name))
    return addons
