"""
C{--parent-check S}: active health checks of the members of parent pools, apart from the
requests that find a member down (see L{aproxy.upstream.routes.Pool}).
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.config import ProxyConfig
from aproxy.http.target import parse_authority
from aproxy.upstream.dialer import Dialer

__all__ = ["ParentChecks"]


class _Owner(TypingProtocol):
    """What the checks need of the proxy that owns them (a L{ProxyFactory})."""

    config: ProxyConfig
    clock: IReactorTime
    runtime: Any


class ParentChecks:
    """
    C{--parent-check S}: every S seconds (of the configuration in force), a TCP
    connection to each parent of the pools; one that connects is up (its backoff reset),
    one that does not is down as after a failed request. At most one check per member is
    in flight, and the checks stop with the factory.
    """

    log = Logger()

    def __init__(self, factory: _Owner) -> None:
        self.factory = factory
        self._timer: Any = None
        self._pending: dict[tuple[int, int], Deferred[Any]] = {}

    def start(self) -> None:
        """Schedule the next round (when checks are on)."""
        interval = self.factory.config.parent_check
        if interval is not None:
            self._timer = self.factory.clock.callLater(interval, self._round)

    def stop(self) -> None:
        """Cancel the next round and the checks in flight."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in list(self._pending.values()):
            d.cancel()

    def _round(self) -> None:
        self._timer = None
        try:
            self._check_all()
        except Exception:
            self.log.failure("parent checks failed")
        self.start()

    def _check_all(self) -> None:
        dialer = self.factory.runtime.dialer
        for pool in dialer.router.pools:
            for index, member in enumerate(pool.members):
                key = (id(pool), index)
                if member.parent is None or key in self._pending:
                    continue
                d = self._check(dialer, member.parent)
                self._pending[key] = d
                d.addCallbacks(
                    self._reached,
                    self._missed,
                    callbackArgs=(pool, index),
                    errbackArgs=(pool, index),
                )
                d.addBoth(self._settled, key)

    def _check(self, dialer: Dialer, parent: Any) -> Deferred[Any]:
        """One check of C{parent}: a TCP connection, or a tunnel to the check target."""
        target = self.factory.config.parent_check_target
        if target is None:
            connect: Any = dialer.parent_connector.connect
            return connect(parent.host, parent.port, _CHECK_FACTORY)  # type: ignore[no-any-return]
        host, port = parse_authority(target.encode("ascii"))
        return dialer.open(dialer.via(parent, b"", host, port, True))

    def _settled(self, result: object, key: tuple[int, int]) -> None:
        self._pending.pop(key, None)

    def _reached(self, proto: Any, pool: Any, index: int) -> None:
        transport = getattr(proto, "transport", None)
        if transport is not None:
            transport.loseConnection()
        pool.succeeded(index)

    def _missed(self, failure: Failure, pool: Any, index: int) -> None:
        if failure.check(CancelledError):
            return
        member = pool.members[index]
        if member.up(self.factory.clock.seconds()):
            self.log.info("parent {member} failed its check: skipped", member=member.name)
            pool.failed(index, self.factory.clock.seconds(), "failed its check")


_CHECK_FACTORY = Factory.forProtocol(Protocol)
