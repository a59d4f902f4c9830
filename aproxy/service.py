"""
The embedding API: L{makeService} turns a L{ProxyConfig} into an C{IService} that listens on
every configured endpoint, for any Twisted C{Application} or C{MultiService}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString

from aproxy.config import ProxyConfig
from aproxy.proxy import ProxyFactory

__all__ = ["makeService"]


def makeService(config: ProxyConfig, reactor: Any = None) -> IService:
    """
    Build the proxy service: one L{ProxyFactory} shared by a listening service per
    endpoint description in C{config.ports}.

    @param config: The proxy's configuration.
    @param reactor: The reactor to listen and connect with (the global one by default).
    @return: A L{MultiService}; start it (or give it a parent) to listen. A port that
        can't be bound makes C{privilegedStartService} raise C{CannotListenError}.
    @raise ValueError: If an endpoint description is malformed.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    factory = ProxyFactory(config, reactor)
    top = MultiService()
    for description in config.ports:
        endpoint = serverFromString(reactor, description)
        service = StreamServerEndpointService(endpoint, factory)
        service._raiseSynchronously = True
        service.setName(description)
        service.setServiceParent(top)
    top.factory = factory  # type: ignore[attr-defined]
    return top
