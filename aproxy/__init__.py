"""
aproxy: an asynchronous HTTP/1.1 forward proxy on Twisted, to run with C{twistd aproxy} or
to embed with L{makeService} or L{ProxyFactory}.

The names here are the public API for embedders: the configuration, the two ways to run
the proxy, what observers see of each request (L{Exchange}, L{IExchangeObserver}), the
interfaces to plug in your own access policy, authentication and upstream connections,
and the error family the proxy answers with. Everything else may move between releases;
L{aproxy.testing} runs the proxy in memory for your own tests.
"""

from __future__ import annotations

from aproxy.access.auth import IAuthenticator
from aproxy.access.policy import IPolicy
from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.errors import ProxyError
from aproxy.observe.records import Exchange, IExchangeObserver
from aproxy.run.service import makeService
from aproxy.upstream.connector import IUpstreamConnector
from aproxy.version import VERSION

__all__ = [
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

__version__ = VERSION
