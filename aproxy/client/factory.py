"""
L{ProxyFactory}: builds a L{ProxyProtocol} per client connection and holds what they share:
the configuration, the clock, the policy and authenticator, the upstream connector and
connection pool, and what the proxy knows about its own addresses (for loop detection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from aproxy.access.auth import HtpasswdAuthenticator, IAuthenticator
from aproxy.access.loops import LoopGuard
from aproxy.access.pac import read_pac
from aproxy.access.policy import AccessPolicy, HostPatterns, IPolicy
from aproxy.access.throttle import LoginThrottle
from aproxy.addons.load import load_addons
from aproxy.addons.run import AddonSet
from aproxy.cache.stage import open_cache
from aproxy.client.background import background_request
from aproxy.client.protocol import ProxyProtocol
from aproxy.client.runtime import Runtime
from aproxy.client.stages import IRequestStage
from aproxy.config import ProxyConfig
from aproxy.errors import Forbidden
from aproxy.http.head import Target, parse_absolute_target
from aproxy.intercept.ca import CAError, default_ca_dir, load_or_create
from aproxy.intercept.leaves import LeafContexts
from aproxy.intercept.session import Interceptor
from aproxy.observe.accesslog import AccessLog
from aproxy.observe.records import ExchangeObserver
from aproxy.upstream.checks import ParentChecks
from aproxy.upstream.connector import EndpointConnector, IUpstreamConnector
from aproxy.upstream.dialer import Dialer, Hop
from aproxy.upstream.pool import UpstreamPool
from aproxy.upstream.protocol import UpstreamFactory, UpstreamProtocol
from aproxy.upstream.routes import Router
from aproxy.upstream.tls import ClientTLS

__all__ = ["ProxyFactory"]

# How many parsed request targets and passed destinations the factory remembers.
_CACHE_SIZE = 1024


@implementer(IProtocolNegotiationFactory)
class ProxyFactory(Factory):
    """
    Builds a L{ProxyProtocol} per client connection and holds what they share: the
    configuration, the clock, the upstream connector and the connection pool.

    @param config: The validated configuration.
    @param reactor: The reactor for timers and connections (the global one by default).
    @param connector: How to reach origins (an L{EndpointConnector} on C{reactor} by
        default); tests pass a fake.
    @param policy: Who may use the proxy and where they may go (an L{AccessPolicy} built
        from C{config} by default).
    @param authenticator: Checks C{Proxy-Authorization} (an L{HtpasswdAuthenticator} on
        C{config.auth} by default, none without one).
    @param stages: Request stages (L{aproxy.client.stages}): code that may answer
        requests itself or see their bodies; kept across reloads. With the cache on in
        C{config} (C{cache_memory} or C{cache_dir}), the cache
        (L{aproxy.cache.stage.CacheStage}) comes first.
    @param addons: Addon objects (see L{aproxy.addons.IAddon}), run after those
        C{config.addon} names; kept across reloads.
    @raise aproxy.observe.accesslog.AccessLogError: If C{config.access_log} can't be
        opened.
    @raise aproxy.addons.load.AddonLoadError: If an addon can't be loaded (a
        C{ValueError} whose message is one line naming it).
    @raise ValueError: If C{config.cache_dir} can't be used.

    @ivar cache: The cache, or L{None} when it is off.
    @ivar access_log: The access log that C{config.access_log} names, written by the
        factory itself (so a factory used without L{aproxy.run.service.makeService}
        logs too), or L{None}. L{reconfigure} opens a changed one; whoever stops the
        proxy closes it (the service of C{makeService} does).
    """

    protocol = ProxyProtocol
    noisy = False
    log = Logger()

    def __init__(
        self,
        config: ProxyConfig | None = None,
        reactor: Any = None,
        connector: IUpstreamConnector | None = None,
        policy: IPolicy | None = None,
        authenticator: IAuthenticator | None = None,
        stages: Sequence[IRequestStage] = (),
        addons: Sequence[Any] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        config = config if config is not None else ProxyConfig()
        self.cache = open_cache(config, reactor)
        if self.cache is not None:
            # (stale-while-revalidate: the cache revalidates through this proxy.)
            self.cache.revalidations.start = partial(background_request, self, reactor)
        self._stages = ((self.cache,) if self.cache is not None else ()) + tuple(stages)
        # Made once, kept across reloads (a changed --addon list needs a restart).
        self._addons = load_addons(config.addon, addons)
        self._leaves: LeafContexts | None = None
        self.clock: IReactorTime = reactor
        # What outlives a reload, handed from one runtime to the next:
        # bounded, fairly shared password hashes and name lookups (so their bounds count
        # the work still running), the failed logins per client address (a new password
        # file does not give a guesser a fresh start) and the upstream pool.
        self.hashing = HtpasswdAuthenticator.default_hashing()
        self.lookups = EndpointConnector.default_lookups()
        self.login_throttle = LoginThrottle(reactor)
        self._given_connector = connector
        self._given_policy = policy
        self._given_authenticator = authenticator
        self._upstream_factory = UpstreamFactory(config.max_head_size, reactor)
        self.pool = UpstreamPool(
            reactor, max(config.pool_size, 1), config.pool_idle_timeout, config.pool_max_age
        )
        # What this proxy knows of its own addresses and its random Via marker: a
        # request that would reach it again is a loop (outlives reloads).
        self.loops = LoopGuard()
        # Each request takes the runtime in force when it starts (see Runtime).
        self.runtime = self._build_runtime(config)
        self.open_connections = 0
        self.clients_per_ip: dict[str, int] = {}
        self._targets: dict[bytes, Target] = {}
        self.connections: set[ProxyProtocol] = set()
        # Open tunnels (CONNECT and Upgrade), counted as they open and close, so the
        # metrics read a number instead of walking every connection per request.
        self.tunnels = 0
        # Called with an Exchange for every finished request and tunnel (access logs,
        # metrics); empty by default, so nothing is built per request.
        self.observers: list[ExchangeObserver] = []
        self.access_log: AccessLog | None = None
        if config.access_log is not None:
            self.access_log = AccessLog(config.access_log, config.access_log_format, reactor)
            self.observers.append(self.access_log)
        # Called with the seconds each new upstream connection took (metrics).
        self.connect_observers: list[Callable[[float], None]] = []
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None

    def _build_runtime(self, config: ProxyConfig, tls: ClientTLS | None = None) -> Runtime:
        """
        The runtime for C{config}: its policy and authenticator (the ones given to the
        factory, else built from C{config}), connector, dialer and names.

        @raise ValueError: If the password file or CA file can't be used.
        """
        policy = self._given_policy
        if policy is None:
            policy = AccessPolicy(
                config.allow, config.deny_host, config.allow_host, config.block_private
            )
        authenticator = self._given_authenticator
        if authenticator is None and config.auth is not None:
            authenticator = HtpasswdAuthenticator(
                config.auth, config.auth_realm, self.clock, hashing=self.hashing
            )
        own = self._given_connector is None
        connector: IUpstreamConnector = (
            EndpointConnector(
                self.clock,
                config.connect_timeout,
                policy.check_address if policy.needs_address_check() else None,
                lookups=self.lookups,
            )
            if self._given_connector is None
            else self._given_connector
        )
        # Parents are configured, not requested: the destination address rules don't
        # apply to them (a parent on a private network is normal).
        parent_connector = (
            EndpointConnector(self.clock, config.connect_timeout, lookups=self.lookups)
            if own
            else connector
        )
        router = Router(config.all_routes, config.own_addresses)
        for fleet in router.fleets:
            if fleet.own is None:
                self.log.warn(
                    "cache fleet {members}: none of them is this proxy by its listening"
                    " addresses; if it is a member, name it with --fleet-self URL",
                    members=", ".join(m.name for m in fleet.members),
                )
        dialer = Dialer(
            connector,
            parent_connector,
            tls if tls is not None else ClientTLS(config.ca_file, config.insecure_host),
            self._upstream_factory,
            router,
        )
        via = self.loops.via(config.via)
        name = (config.via or "aproxy").encode("ascii")
        return Runtime(
            config,
            policy,
            authenticator,
            connector,
            dialer,
            via,
            name,
            self._stages,
            policy.needs_address_check(),
            interceptor=self._interceptor(config),
            pac_file=read_pac(config),
            addons=AddonSet(self._addons, config.addon_timeout) if self._addons else None,
        )

    def _interceptor(self, config: ProxyConfig) -> Interceptor | None:
        """
        What C{--intercept} asks for; the CA is loaded (or made) once per factory, at
        the first configuration that intercepts: a new CA needs a restart.

        @raise ValueError: If the CA can't be used (one line, see L{CAError}).
        """
        if not config.intercept:
            return None
        if self._leaves is None:
            try:
                ca = load_or_create(config.ca_dir or default_ca_dir())
            except CAError as e:
                raise ValueError(f"ca-dir: {e}") from None
            self.log.info(
                "intercepting HTTPS with the CA {path} (SHA-256 {fingerprint}){made}",
                path=ca.path,
                fingerprint=ca.fingerprint,
                made=(
                    ", made now. Clients must trust it: copy it to"
                    " /usr/local/share/ca-certificates/aproxy.crt and run"
                    " update-ca-certificates, or give it to each client (curl --cacert,"
                    " REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, a browser's authorities);"
                    " see the README"
                    if ca.created
                    else ""
                ),
            )
            self._leaves = LeafContexts(ca)
        return Interceptor(
            self._leaves, HostPatterns(config.intercept), HostPatterns(config.no_intercept)
        )

    # What the runtime in force holds, for the code that asks the factory.

    @property
    def config(self) -> ProxyConfig:
        """The configuration in force."""
        return self.runtime.config

    @config.setter
    def config(self, config: ProxyConfig) -> None:
        self.runtime = replace(self.runtime, config=config)

    @property
    def policy(self) -> IPolicy:
        """The policy in force."""
        return self.runtime.policy

    @property
    def authenticator(self) -> IAuthenticator | None:
        """The authenticator in force (L{None}: no login needed)."""
        return self.runtime.authenticator

    @authenticator.setter
    def authenticator(self, authenticator: IAuthenticator | None) -> None:
        self._given_authenticator = authenticator
        self.runtime = replace(self.runtime, authenticator=authenticator)

    @property
    def connector(self) -> IUpstreamConnector:
        """How origins are reached, in force."""
        return self.runtime.connector

    @property
    def dialer(self) -> Dialer:
        """The dialer in force."""
        return self.runtime.dialer

    @property
    def via(self) -> bytes | None:
        """The C{Via} value in force."""
        return self.runtime.via

    @via.setter
    def via(self, via: bytes | None) -> None:
        self.runtime = replace(self.runtime, via=via)

    @property
    def name(self) -> bytes:
        """The proxy's name in its own answers."""
        return self.runtime.name

    def reconfigure(self, config: ProxyConfig) -> None:
        """
        Apply a new configuration to new requests (SIGHUP): a new L{Runtime} (the policy,
        the authenticator re-reading its file, the limits) that each request takes when
        it starts; requests in flight finish on the one they started with and nothing is
        dropped. The listening ports are not changed here.

        The pool takes its new size and times at once, new upstream connections the new
        response head limit, and an idle pooled connection is checked against the new
        address rules before its next use (see L{reuse}).

        A changed access log path or format opens the new log in place of the old one,
        which is closed.

        @raise ValueError: If the new authenticator's file, CA file or access log can't
            be used; nothing changes.
        """
        runtime = self._build_runtime(config)
        self._swap_access_log(config)
        runtime.dialer.router.keep_health(self.runtime.dialer.router)
        self.runtime = runtime
        self._targets.clear()
        self.upstream_factory.max_head_size = config.max_head_size
        self.pool.reconfigure(
            max(config.pool_size, 1), config.pool_idle_timeout, config.pool_max_age
        )

    def _swap_access_log(self, config: ProxyConfig) -> None:
        """
        Open the access log C{config} names in place of the running one, if its path or
        format changed, keeping its place among the observers, and close the old one.

        @raise ValueError: If the new log can't be opened; nothing changes.
        """
        running = self.config
        if (config.access_log, config.access_log_format) == (
            running.access_log,
            running.access_log_format,
        ):
            return
        old_log = self.access_log
        new_log = (
            AccessLog(config.access_log, config.access_log_format, self.clock)
            if config.access_log is not None
            else None
        )
        observers = self.observers
        if old_log is not None and old_log in observers:
            index = observers.index(old_log)
            if new_log is None:
                del observers[index]
            else:
                observers[index] = new_log
        elif new_log is not None:
            observers.insert(0, new_log)
        self.access_log = new_log
        if old_log is not None:
            old_log.close()

    def reuse(self, hop: Hop, runtime: Runtime | None = None) -> UpstreamProtocol | None:
        """
        An idle pooled connection for C{hop}, if there is one, checked against the
        address rules in force: they were applied when it was made, but a reload may have
        tightened them since, and each use keeps the connection alive. A TLS connection
        verified under TLS settings a reload replaced is closed instead of reused.

        @param runtime: The runtime of the request (the one in force by default).
        @raise Forbidden: If the address the connection goes to is refused now; the
            connection is closed.
        """
        up = self.pool.acquire(hop.key)
        if up is None:
            return None
        rt = runtime if runtime is not None else self.runtime
        while up is not None and up.verified_by is not None and up.verified_by is not rt.dialer.tls:
            # Verified under TLS settings (trust store, --insecure-host) that a reload has
            # replaced since: make a new connection, verified under the ones in force.
            self.pool.reused -= 1
            up.transport.loseConnection()
            up = self.pool.acquire(hop.key)
        if up is None or hop.parent is not None or not rt.address_check:
            # Parents are configured, not requested: the address rules don't apply.
            return up
        address = getattr(up.transport.getPeer(), "host", None)
        if address is None:
            return up
        key = (hop.host, address)
        allowed = rt.allowed_peers
        if key not in allowed:
            try:
                rt.policy.check_address(hop.host, address)
            except Forbidden:
                self.pool.reused -= 1  # taken from the pool, but not reused after all
                up.transport.loseConnection()
                raise
            if len(allowed) >= _CACHE_SIZE:
                allowed.clear()
            allowed.add(key)
        return up

    @property
    def upstream_factory(self) -> UpstreamFactory:
        """Builds the protocol of each upstream connection (tests may replace it)."""
        return self._upstream_factory

    @upstream_factory.setter
    def upstream_factory(self, factory: UpstreamFactory) -> None:
        self._upstream_factory = factory
        self.runtime.dialer.upstream_factory = factory

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Shut down gracefully: close idle client connections at once, let requests and
        tunnels in flight finish, and close whatever is left after C{timeout} seconds.

        @return: A L{Deferred} that fires as soon as no connection is left.
        """
        d: Deferred[None] = Deferred()
        self._drained = d
        for proto in list(self.connections):
            proto.drain()
        if not self.connections:
            self._drained = None
            d.callback(None)
            return d
        self.log.info(
            "shutting down: waiting up to {timeout} s for {count} connections",
            timeout=timeout,
            count=len(self.connections),
        )
        self._drain_timer = self.clock.callLater(timeout, self._drain_timeout)
        return d

    def _drain_timeout(self) -> None:
        self._drain_timer = None
        self.log.info("shutdown timeout: closing {count} connections", count=len(self.connections))
        for proto in list(self.connections):
            proto.transport.abortConnection()

    def connection_gone(self, proto: ProxyProtocol) -> None:
        """A client connection ended; finish a pending shutdown once none is left."""
        self.connections.discard(proto)
        if self._drained is not None and not self.connections:
            d, self._drained = self._drained, None
            timer, self._drain_timer = self._drain_timer, None
            if timer is not None and timer.active():
                timer.cancel()
            d.callback(None)

    def parse_target(self, raw: bytes, method: bytes) -> Target:
        """
        L{parse_absolute_target}, remembering recent results: clients ask for the same
        targets again and again, and a L{Target} never changes.
        """
        cache = self._targets
        target = cache.get(raw)
        if target is None or method == b"OPTIONS":
            target = parse_absolute_target(raw, method)
            if method != b"OPTIONS":
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[raw] = target
        return target

    def check_destination(self, host: str, port: int, runtime: Runtime | None = None) -> None:
        """
        Apply the policy's name rules to a destination as written, and the loop check
        and address rules to a literal address.

        @param runtime: The runtime of the request (the one in force by default).
        @raise Forbidden: If the destination is refused.
        """
        rt = runtime if runtime is not None else self.runtime
        key = (host, port)
        allowed = rt.allowed
        if key not in allowed:
            rt.policy.check_name(host)
            # Name rules and literal addresses always decide the same way: remember the
            # destinations that passed (bounded), so a busy client pays for the check once.
            if len(allowed) >= _CACHE_SIZE:
                allowed.clear()
            allowed.add(key)
        # Not cached: the proxy's own addresses grow as it listens and is reached.
        self.loops.check_target(host, port)

    def acceptableProtocols(self) -> list[bytes]:
        """
        The ALPN protocols a TLS listener (C{--port ssl:...}) agrees to: HTTP/1.1.

        Clients such as curl offer C{http/1.1} to an HTTPS proxy; Twisted's TLS server
        answers an offer it has no protocol in common with by a fatal "internal error"
        alert, so a proxy without this list could not be reached over TLS by them.
        """
        return [b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocol:
        """Make the protocol for one client connection."""
        return ProxyProtocol(self, addr)

    def startFactory(self) -> None:
        """Start the active checks of the parent pools, if asked (C{--parent-check})."""
        self._checks = ParentChecks(self)
        self._checks.start()

    def stopFactory(self) -> None:
        """Close the idle upstream connections when the last listener stops."""
        self.pool.close()
        checks = getattr(self, "_checks", None)
        if checks is not None:
            checks.stop()
