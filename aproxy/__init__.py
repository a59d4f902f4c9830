"""
aproxy: an asynchronous HTTP/1.1 forward proxy on Twisted, to run with C{twistd aproxy} or
to embed with L{makeService} or L{ProxyFactory}.
"""

from __future__ import annotations

from aproxy.config import ProxyConfig
from aproxy.factory import ProxyFactory
from aproxy.service import makeService

__all__ = ["ProxyConfig", "ProxyFactory", "__version__", "makeService"]

__version__ = "0.1.0"
