"""
The addon API: Python hooks that see every exchange through the proxy and may edit its
header fields, refuse or answer it, pick its parent, and transform bodies as they stream
(see L{IAddon} and the README's "Addons" section). Load addons with C{--addon
MODULE:NAME} or pass objects to L{aproxy.makeService} / L{aproxy.ProxyFactory}.
"""

from __future__ import annotations

from aproxy.addons.api import AddonExchange, Fields, IAddon, ITransformer, RequestView, ResponseView
from aproxy.addons.bodies import Replace, decoded

__all__ = [
    "AddonExchange",
    "Fields",
    "IAddon",
    "ITransformer",
    "Replace",
    "RequestView",
    "ResponseView",
    "decoded",
]
