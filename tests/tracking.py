"""A trial mixin that closes every connection a test's factories made, and waits for it."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class ConnectionTracking:
    """
    For trial C{TestCase}s with real sockets: trial fails a test that leaves a connection
    open, so every protocol a tracked factory builds gets a cleanup that aborts it if still
    open and waits until it is really gone.
    """

    addCleanup: Any  # noqa: N815 (provided by the TestCase this is mixed into)

    def track(self, factory: Factory[Any]) -> list[Protocol]:
        """
        Record every protocol C{factory} builds and add a cleanup per connection that aborts
        it if still open and waits until it is really gone (trial fails a dirty reactor).

        @return: The list the built protocols are appended to.
        """
        built: list[Protocol] = []
        build = factory.buildProtocol

        def buildProtocol(addr: Any) -> Protocol | None:
            proto = build(addr)
            if proto is not None:
                built.append(proto)
                self._watch(proto)
            return proto

        factory.buildProtocol = buildProtocol  # type: ignore[method-assign]
        return built

    def _watch(self, proto: Protocol) -> None:
        gone: list[Deferred[None]] = []
        lost = False
        original = proto.connectionLost

        def connectionLost(reason: Failure) -> None:
            nonlocal lost
            try:
                original(reason)
            finally:
                lost = True
                for d in gone:
                    d.callback(None)

        proto.connectionLost = connectionLost  # type: ignore[method-assign, assignment]

        def disconnect() -> Deferred[None]:
            if lost:
                return succeed(None)
            d: Deferred[None] = Deferred()
            gone.append(d)
            transport: Any = proto.transport
            if transport is not None:
                transport.abortConnection()
            return d

        self.addCleanup(disconnect)
