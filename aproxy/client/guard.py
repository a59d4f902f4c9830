"""
The last line of defence (STYLE.md section 5), for every way into the client side: reactor
callbacks, timers, Deferred callbacks. An unexpected exception is a bug, and it costs the
request it happened in, not the proxy: the object's C{internal_error} answers or closes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from twisted.python.failure import Failure

__all__ = ["Guarded", "guarded"]


class Guarded(Protocol):
    """What a guarded method's object offers: a way to end its request after a bug."""

    def internal_error(self, failure: Failure) -> None:
        """Log C{failure} once and end the request (500, or a close) and its connection."""


_P = ParamSpec("_P")
_G = TypeVar("_G", bound=Guarded)


def guarded(method: Callable[Concatenate[_G, _P], None]) -> Callable[Concatenate[_G, _P], None]:
    """
    Wrap an entry point so that an exception it raises goes to the object's
    C{internal_error} instead of the reactor. A C{try} block costs nothing until it
    catches, so the hot paths pay no more than the call.
    """

    def wrapper(self: _G, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.internal_error(Failure())

    functools.update_wrapper(wrapper, method)
    return wrapper
