"""
L{Runtime}: what one request runs on, taken whole when the request starts.

A reload (C{SIGHUP}) builds a new runtime and the factory swaps it in; requests in flight
finish on the runtime they started with, and a keep-alive connection's next request takes
the new one. So a request never sees half of one configuration and half of another (the
policy of one and the port rules of the other, say). What must outlive a reload is not in
here but on the factory, handed over as it is: the failed-login counts, the upstream pool
(whose connections are checked against the runtime of the request that reuses them), the
thread pools for lookups and hashes, and what the proxy knows of its own addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aproxy.access.auth import IAuthenticator
from aproxy.access.policy import IPolicy
from aproxy.client.stages import IRequestStage
from aproxy.config import ProxyConfig
from aproxy.upstream.connector import IUpstreamConnector
from aproxy.upstream.dialer import Dialer

__all__ = ["Runtime"]


@dataclass(frozen=True, eq=False)
class Runtime:
    """
    One whole configuration in force: the settings and the objects built from them.

    @ivar config: The validated settings.
    @ivar policy: Who may use the proxy and where they may go.
    @ivar authenticator: Checks proxy credentials, or L{None} when no login is needed.
    @ivar connector: How origins are reached (the dialer's, for direct hops).
    @ivar dialer: Routes each request and opens its upstream connection.
    @ivar via: The C{Via} field value the proxy appends (with its loop marker), or L{None}.
    @ivar name: The proxy's name in its own answers (C{Proxy-Status}).
    @ivar stages: The request stages (see L{aproxy.client.stages}), in order; empty
        unless an embedder installs some.
    @ivar address_check: Whether the policy checks the addresses names resolve to (then
        a pooled connection's address is checked again before each reuse).
    @ivar allowed: Destinations (host, port) that passed this runtime's name rules and the
        loop check: remembered per runtime, so a reload's stricter rules start afresh.
    @ivar allowed_peers: (host, address) pairs of pooled connections that passed this
        runtime's address rules.
    @ivar interceptor: Which CONNECT tunnels are intercepted, and their certificates (an
        L{aproxy.intercept.session.Interceptor}); L{None} without C{--intercept}.
    @ivar pac_file: The C{--pac} file as read for this configuration, or L{None}.
    @ivar addons: The loaded addons (an L{aproxy.addons.run.AddonSet}), or L{None}
        when there are none: then no hook code runs at all.
    """

    config: ProxyConfig
    policy: IPolicy
    authenticator: IAuthenticator | None
    connector: IUpstreamConnector
    dialer: Dialer
    via: bytes | None
    name: bytes
    stages: tuple[IRequestStage, ...] = ()
    address_check: bool = False
    allowed: set[tuple[str, int]] = field(default_factory=set)
    allowed_peers: set[tuple[str, str]] = field(default_factory=set)
    interceptor: Any = None  # (Any: the intercept package sits above this layer)
    pac_file: bytes | None = None
    addons: Any = None  # (Any: the addons package sits above this layer)
