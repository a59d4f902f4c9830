"""
aproxy: an asynchronous HTTP/1.1 forward proxy on Twisted, to run with C{twistd aproxy} or
to embed with L{makeService} or L{ProxyFactory}.
"""

from __future__ import annotations

from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.run.service import makeService
from aproxy.version import VERSION

__all__ = ["ProxyConfig", "ProxyFactory", "__version__", "makeService"]

__version__ = VERSION
