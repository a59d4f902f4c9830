"""
The C{--config FILE} TOML file: its keys are the long command-line option names
(C{connect-ports = [443, 8443]}, C{allow = ["10.0.0.0/8"]}, ...). L{load_config_file} checks
every key and type and reports the first problem in one line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigFileError", "load_config_file"]


class ConfigFileError(ValueError):
    """A config file that can't be used; C{str()} is one line naming the file and key."""


def _check(path: str, key: str, value: Any, kind: str) -> Any:
    """Check one value against C{kind}; return it in the form the options expect."""

    def bad(expected: str) -> ConfigFileError:
        return ConfigFileError(
            f"{path}: key {key!r} must be {expected}, not {type(value).__name__} {value!r}"
        )

    if kind == "flag":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if kind == "size":
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise bad('a size in bytes or a string such as "256MiB"')
    if kind == "workers":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
        raise bad('a whole number or "auto"')
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "ports":
        # connect-ports: a list of ports and "low-high" ranges, or a string as on the
        # command line ("443,8443" or "*").
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
        ):
            return ",".join(str(v) for v in value)
        raise bad('a list of ports (e.g. [443, "8000-8100"]) or "*"')
    # kind == "list": a repeatable option; a single string is taken as a list of one.
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
    ):
        return [str(v) for v in value]
    raise bad("a list of strings")


def load_config_file(path: str, schema: Mapping[str, str]) -> dict[str, Any]:
    """
    Read and check a TOML config file.

    @param schema: Each allowed key (a long option name) and its kind: C{"flag"},
        C{"float"}, C{"int"}, C{"str"}, C{"list"} (repeatable) or C{"ports"}.
    @return: The values by key, in the forms the command-line options use.
    @raise ConfigFileError: For an unreadable file, a TOML syntax error (with its line),
        an unknown key or a value of the wrong type.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: TOML syntax error: {e}") from None
    values = {}
    for key, value in data.items():
        kind = schema.get(key)
        if kind is None:
            if isinstance(value, dict):
                raise ConfigFileError(f"{path}: unknown table [{key}]: keys go at the top level")
            raise ConfigFileError(f"{path}: unknown key {key!r}")
        values[key] = _check(path, key, value, kind)
    return values
