"""
Running the hooks of the loaded addons: L{AddonSet} keeps, per hook, the addons that
implement it (so a hook nobody implements costs nothing), calls them in order, waits for
those that return a L{Deferred} or a coroutine, and turns a hook's exception into an
L{AddonFailure} that names the addon (logged once, with its traceback).
L{TransformFilter} runs the body transformers they return as a stage body filter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.addons.api import AddonExchange, as_body
from aproxy.client.stages import IBodyFilter

__all__ = ["Addon", "AddonFailure", "AddonSet", "Hooks", "TransformFilter"]

log = Logger()


class AddonFailure(Exception):
    """
    A hook (or a transformer) of an addon raised: the exchange answers 500 (or is cut
    short), naming the addon. The traceback was logged when it was caught.
    """

    def __init__(self, addon: str, hook: str) -> None:
        super().__init__(f"addon {addon} failed in {hook}")
        self.addon = addon
        self.hook = hook


@dataclass(frozen=True)
class Addon:
    """
    A loaded addon.

    @ivar name: How logs and C{Proxy-Status} name it (its spec, or its class's name).
    @ivar obj: The addon object whose methods are the hooks.
    """

    name: str
    obj: Any


Hooks = Sequence[tuple[str, Callable[..., Any]]]


def _failed(addon: str, hook: str, failure: Failure) -> AddonFailure:
    log.failure("addon {addon} failed in its {hook} hook", failure, addon=addon, hook=hook)
    return AddonFailure(addon, hook)


def _took(result: Any, name: str, exchange: AddonExchange, collect: list[Any] | None) -> bool:
    """Keep a hook's C{result} (a transformer) in C{collect}; whether the hooks stop here
    (an addon refused or answered)."""
    if collect is not None and result is not None:
        collect.append((name, result))
    return exchange.reply is not None


def _waits(result: Any) -> bool:
    return isinstance(result, Deferred) or inspect.isawaitable(result)


class AddonSet:
    """
    The addons of a proxy, in order, and per hook those that implement it.

    @ivar timeout: How long an exchange waits for a hook that returns a L{Deferred}.
    @ivar ranges_whole: Some addon may transform response bodies, so Range requests are
        answered in full (a transformer sees whole bodies, never parts).
    """

    def __init__(self, addons: Sequence[Addon], timeout: float) -> None:
        self.addons = tuple(addons)
        self.timeout = timeout

        def having(hook: str) -> tuple[tuple[str, Callable[..., Any]], ...]:
            found = []
            for addon in self.addons:
                method = getattr(addon.obj, hook, None)
                if callable(method):
                    found.append((addon.name, method))
            return tuple(found)

        self.request = having("request")
        self.request_body = having("request_body")
        self.response = having("response")
        self.response_body = having("response_body")
        self.tunnel_open = having("tunnel_open")
        self.tunnel_close = having("tunnel_close")
        self.error = having("error")
        self.done = having("done")
        self.ranges_whole = bool(self.response_body)

    def run(
        self, hook: str, hooks: Hooks, exchange: AddonExchange, collect: list[Any] | None = None
    ) -> Deferred[None] | None:
        """
        Call C{hooks} in order with C{exchange}; a refusal or an answer (C{exchange.reply})
        stops the rest. With C{collect}, what each hook returns (a body transformer, or
        L{None}) is gathered there as (addon, result).

        @return: L{None} when every hook returned at once; otherwise a L{Deferred} that
            fires once the rest ran (failing with L{AddonFailure}, or L{CancelledError}
            when cancelled; cancelling it cancels the hook waited for).
        @raise AddonFailure: If a hook raised at once.
        """
        for index, (name, method) in enumerate(hooks):
            exchange.addon = name
            try:
                result = method(exchange)
            except Exception:
                raise _failed(name, hook, Failure()) from None
            if result is not None and _waits(result):
                return Deferred.fromCoroutine(
                    self._later(hook, hooks, index, result, exchange, collect)
                )
            if _took(result, name, exchange, collect):
                return None
        return None

    async def _later(
        self,
        hook: str,
        hooks: Hooks,
        index: int,
        waiting: Any,
        exchange: AddonExchange,
        collect: list[Any] | None,
    ) -> None:
        """The rest of L{run} from C{hooks[index]}, whose result C{waiting} is awaited."""
        result = waiting
        for at in range(index, len(hooks)):
            name, method = hooks[at]
            exchange.addon = name
            try:
                if at != index:
                    result = method(exchange)
                if _waits(result):
                    result = await ensureDeferred(result)
            except CancelledError:
                raise
            except Exception:
                raise _failed(name, hook, Failure()) from None
            if _took(result, name, exchange, collect):
                return

    def phase(
        self,
        first: str,
        second: str | None,
        exchange: AddonExchange,
        collect: list[Any],
    ) -> Deferred[Any] | None:
        """
        Run the C{first} hooks (C{request} or C{response}), then, unless one refused or
        answered, the C{second} (the body hooks, whose transformers go to C{collect};
        L{None} when the message has no body). Returns and raises as L{run}.
        """
        later = self.run(first, getattr(self, first), exchange)
        if second is None:
            return later
        body_hooks = getattr(self, second)
        if not body_hooks:
            return later
        if later is None:
            if exchange.reply is not None:
                return None
            return self.run(second, body_hooks, exchange, collect)

        def then(_: object) -> Deferred[None] | None:
            if exchange.reply is not None:
                return None
            return self.run(second, body_hooks, exchange, collect)

        return later.addCallback(then)

    def notify(self, hook: str, hooks: Hooks, exchange: AddonExchange, *args: Any) -> None:
        """
        Call notification hooks (C{done}, C{error}, tunnels): not waited for; whatever
        they raise, at once or later, is logged and goes no further.
        """
        for name, method in hooks:
            exchange.addon = name
            try:
                result = method(exchange, *args)
                if result is not None and _waits(result):
                    ensureDeferred(result).addErrback(self._later_failed, name, hook)
            except Exception:
                _failed(name, hook, Failure())

    @staticmethod
    def _later_failed(failure: Failure, name: str, hook: str) -> None:
        _failed(name, hook, failure)


@implementer(IBodyFilter)
class TransformFilter:
    """
    The body transformers addons returned for one body, chained in order (each feeds the
    next), as a stage body filter: the proxy re-frames what they give.

    @ivar length: The transformed body's length, given up front by a request body's
        single transformer; L{None} when unknown.
    """

    observe_only = False

    def __init__(self, transformers: Sequence[tuple[str, Any]], hook: str) -> None:
        self._chain = tuple(transformers)
        self._hook = hook
        self.length: int | None = None
        if len(self._chain) == 1 and hook == "request_body":
            length = getattr(self._chain[0][1], "length", None)
            if isinstance(length, int) and length >= 0:
                self.length = length
        self._sent = 0

    def data(self, chunk: bytes) -> bytes:
        """Feed C{chunk} through the chain."""
        for name, transformer in self._chain:
            if not chunk:
                break
            try:
                chunk = as_body(transformer.feed(chunk))
            except Exception:
                raise _failed(name, self._hook + " transformer", Failure()) from None
        return self._count(chunk)

    def end(self) -> bytes:
        """End every transformer, feeding what one still held to the next."""
        tail = b""
        for name, transformer in self._chain:
            try:
                if tail:
                    tail = as_body(transformer.feed(tail))
                tail += as_body(transformer.end())
            except Exception:
                raise _failed(name, self._hook + " transformer", Failure()) from None
        out = self._count(tail)
        if self.length is not None and self._sent != self.length:
            raise _failed(
                self._chain[0][0],
                self._hook + " transformer",
                Failure(ValueError(f"gave {self._sent} bytes, not the {self.length} it said")),
            )
        return out

    def _count(self, data: bytes) -> bytes:
        self._sent += len(data)
        if self.length is not None and self._sent > self.length:
            raise _failed(
                self._chain[0][0],
                self._hook + " transformer",
                Failure(ValueError(f"gave more than the {self.length} bytes it said")),
            )
        return data

    def abandoned(self, can_finish: bool) -> bool:
        """The body won't be complete: the transformers are dropped."""
        return False
