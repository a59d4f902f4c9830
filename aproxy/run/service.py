"""
The embedding API: L{makeService} turns a L{ProxyConfig} into an C{IService} that listens on
every configured endpoint, for any Twisted C{Application} or C{MultiService}.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.access.policy import normalize_address
from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig, proxy_protocol_inner
from aproxy.observe.accesslog import AccessLog
from aproxy.observe.cluster import SnapshotFactory
from aproxy.observe.metrics import Metrics, metrics_site
from aproxy.run.endpoints import public_listeners
from aproxy.socks.factory import SocksCollector, SocksFactory
from aproxy.upstream.routes import parse_route

__all__ = [
    "ProxyHeaderFactory",
    "ProxyService",
    "adopted_service",
    "makeService",
    "restart_settings",
]

log = Logger()


class ProxyHeaderFactory(Factory):
    """
    Serves a PROXY protocol (C{haproxy:}) listener for a L{ProxyFactory}.

    Only a peer in C{config.proxy_protocol_from} (a load balancer) gets a protocol, which
    reads the PROXY header before anything else and admits the client it names; any other
    peer is logged and closed before a byte is read, so nobody else can claim an address.
    The trusted networks are read from the factory's configuration at every connection,
    so a reload applies to new connections.
    """

    noisy = False

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self._trusted_from: tuple[str, ...] | None = None
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def trusted(self, host: str) -> bool:
        """Whether a peer at C{host} may send a PROXY header."""
        cidrs = self.factory.config.proxy_protocol_from
        if cidrs != self._trusted_from:
            self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
            self._trusted_from = cidrs
        address = normalize_address(host)
        if address is None:
            return False
        return any(address in net for net in self._networks if net.version == address.version)

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocol | None:
        """A protocol that reads a PROXY header first, or L{None} (close) if untrusted."""
        host = getattr(addr, "host", None)
        if host is None or not self.trusted(host):
            log.info(
                "connection from {peer} closed: not in --proxy-protocol-from, so not "
                "trusted to send a PROXY header",
                peer=host,
            )
            return None
        proto = self.factory.buildProtocol(addr)
        proto.expect_proxy_header()
        return proto

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """How the log names this listener ("ProxyFactory (PROXY protocol) starting on")."""
        return "ProxyFactory (PROXY protocol)"

    def startFactory(self) -> None:
        """Start the proxy's factory with the listener."""
        self.factory.doStart()

    def stopFactory(self) -> None:
        """Stop the proxy's factory with the listener."""
        self.factory.doStop()


class _ListeningService(Service):
    """
    Listens on one endpoint while running and tells the factory the address it got, so
    that requests aimed back at the proxy are recognised as loops. A failure to listen
    is raised from C{privilegedStartService} when the endpoint reports it at once (TCP,
    UNIX and TLS endpoints do), so a bad port stops the start.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: ProxyFactory,
        serve: IProtocolFactory | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._serve = serve if serve is not None else factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        """Listen; raise the error if listening failed synchronously."""
        super().privilegedStartService()
        failures: list[Failure] = []
        d = self.endpoint.listen(self._serve)
        d.addCallback(self._listened)
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        self._listening = d

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.factory.loops.note_listening(port.getHost())
        return port

    def startService(self) -> None:
        """Listen now if C{privilegedStartService} was not called (embedders)."""
        if self._listening is None and self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        """Stop listening; the Deferred fires once the port is closed."""
        super().stopService()
        port, self.port = self.port, None
        self._listening = None
        if port is not None:
            return port.stopListening()
        return None


class ProxyService(MultiService):
    """
    The listeners plus a graceful stop: stop accepting, then let the factory drain the
    connections in flight (up to C{shutdown_timeout}) before reporting stopped.
    """

    def __init__(self, factory: ProxyFactory) -> None:
        super().__init__()
        self.factory = factory

    @property
    def access_log(self) -> AccessLog | None:
        """The factory's access log, if the configuration names one (SIGUSR1 reopens it)."""
        return self.factory.access_log

    def reconfigure(self, config: ProxyConfig) -> ProxyConfig:
        """
        Apply a reloaded configuration (SIGHUP): the factory takes it for new requests
        (see L{ProxyFactory.reconfigure}, which also opens a changed access log). The
        settings fixed at start (see L{restart_settings}) keep their running values.

        @return: The configuration now in force.
        @raise ValueError: If the new access log, password file or CA file can't be
            used; then nothing changes.
        """
        running = self.factory.config
        config = replace(
            config,
            port=running.port,
            socks_port=running.socks_port,
            metrics=running.metrics,
            cache_memory=running.cache_memory,
            cache_dir=running.cache_dir,
            cache_size=running.cache_size,
            cache_max_object=running.cache_max_object,
            addon=running.addon,
        )
        self.factory.reconfigure(config)
        return config

    def stopService(self) -> Deferred[None]:
        """Stop listening, then wait for the connections in flight to finish."""
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        await self.factory.drain(self.factory.config.shutdown_timeout)
        if self.factory.access_log is not None:
            self.factory.access_log.close()
        if self.factory.cache is not None:
            self.factory.cache.close()


class _AdoptedService(Service):
    """Serves on a listening socket inherited from the parent (a C{--workers} worker)."""

    def __init__(
        self,
        fd: int,
        family: int,
        factory: ProxyFactory,
        reactor: Any,
        serve: IProtocolFactory | None = None,
    ) -> None:
        self.fd = fd
        self.family = family
        self.factory = factory
        self._serve = serve if serve is not None else factory
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Adopt the socket."""
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self._serve)
        self.factory.loops.note_listening(self.port.getHost())

    def stopService(self) -> Deferred[None] | None:
        """Stop accepting on the socket (the parent keeps it)."""
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def adopted_service(
    config: ProxyConfig,
    fds: list[tuple[int, int]],
    reactor: Any = None,
    snapshot: str | None = None,
    own: Sequence[IAddress] = (),
) -> IService:
    """
    The proxy service of one C{--workers} worker: like L{makeService}, but serving on
    inherited listening sockets, given as (file descriptor, address family) pairs in the
    order of C{config.port} (so that a C{haproxy:} port's socket takes PROXY headers),
    then of C{config.socks_port}.

    @param snapshot: With C{config.metrics}: the unix socket path where the worker
        serves its figures to the parent (L{aproxy.observe.cluster}), which serves the
        metrics endpoint; the worker does not listen on C{config.metrics} itself.
    @param own: Other addresses of this proxy (the parent's metrics endpoint) that
        requests must not be sent to (loops).
    """
    return _build(config, reactor, _Adopted(fds, snapshot, own))


def restart_settings(running: ProxyConfig, new: ProxyConfig) -> list[str]:
    """
    The settings that differ between C{running} and C{new} but take effect only at a
    restart: the listening ports and the metrics endpoint (bound at start), the cache
    (its store is opened at start) and the addons (loaded at start). C{--workers} is not
    in L{ProxyConfig}; the command line checks it.

    @return: Their option names, in a stable order.
    """
    names = []
    if new.port != running.port:
        names.append("port")
    if new.socks_port != running.socks_port:
        names.append("socks-port")
    if new.metrics != running.metrics:
        names.append("metrics")
    for name in ("cache_memory", "cache_dir", "cache_size", "cache_max_object", "addon"):
        if getattr(new, name) != getattr(running, name):
            names.append(name.replace("_", "-"))
    return names


def makeService(config: ProxyConfig, reactor: Any = None, addons: Sequence[Any] = ()) -> IService:
    """
    Build the proxy service: one L{ProxyFactory} shared by a listening service per
    endpoint description in C{config.port}.

    @param config: The proxy's configuration.
    @param reactor: The reactor to listen and connect with (the global one by default).
    @param addons: Addon objects (see L{aproxy.addons.IAddon}), run after those
        C{config.addon} names.
    @return: A L{MultiService}; start it (or give it a parent) to listen. A port that
        can't be bound makes C{privilegedStartService} raise C{CannotListenError}.
    @raise ValueError: If an endpoint description is malformed, or the access log can't
        be opened.
    """
    top = _build(config, reactor, None, addons)
    _warn_if_exposed(config)
    if config.insecure_host:
        log.warn(
            "TLS certificates are NOT verified for {hosts} (--insecure-host): anyone on "
            "the path to them can read and change that traffic",
            hosts=", ".join(config.insecure_host),
        )
    for route in config.all_routes:
        pattern, parent = parse_route(route)
        if parent is not None:
            log.info("route {pattern} -> {parent}", pattern=pattern, parent=parent.name)
    return top


class _Adopted:
    """What a C{--workers} worker serves on: the sockets it inherited (see L{adopted_service})."""

    def __init__(
        self, fds: list[tuple[int, int]], snapshot: str | None, own: Sequence[IAddress]
    ) -> None:
        self.fds = fds
        self.snapshot = snapshot
        self.own = own


def _build(
    config: ProxyConfig, reactor: Any, adopted: _Adopted | None, addons: Sequence[Any] = ()
) -> ProxyService:
    """
    The proxy service that L{makeService} and L{adopted_service} both return: the factory,
    a listener per port (bound here, or the inherited sockets of C{adopted}), the access
    log, and the metrics (an endpoint of their own, or a worker's snapshot socket).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    factory = ProxyFactory(config, reactor, addons=addons)
    top = ProxyService(factory)
    # One SOCKS5 factory for every --socks-port, on the proxy's own factory.
    socks = SocksFactory(factory, reactor) if config.socks_port else None
    if adopted is None:
        for description in config.port:
            inner = proxy_protocol_inner(description)
            if inner is None:
                service = _ListeningService(serverFromString(reactor, description), factory)
            else:
                # Not Twisted's haproxy: wrapper, which believes any peer's header.
                endpoint = serverFromString(reactor, inner)
                service = _ListeningService(endpoint, factory, ProxyHeaderFactory(factory))
            service.setName(description)
            service.setServiceParent(top)
        for description in config.socks_port:
            endpoint = serverFromString(reactor, description)
            service = _ListeningService(endpoint, factory, socks)
            service.setName("socks " + description)
            service.setServiceParent(top)
    else:
        for address in adopted.own:
            factory.loops.note_listening(address)
        for index, (fd, family) in enumerate(adopted.fds):
            serve: IProtocolFactory | None = None
            if index >= len(config.port):
                serve = socks
            elif proxy_protocol_inner(config.port[index]) is not None:
                serve = ProxyHeaderFactory(factory)
            _AdoptedService(fd, family, factory, reactor, serve).setServiceParent(top)
    if config.metrics is not None and (adopted is None or adopted.snapshot is not None):
        metrics = Metrics(factory, reactor)
        if socks is not None:
            metrics.registry.register(SocksCollector(socks))
        factory.observers.append(metrics)
        factory.connect_observers.append(metrics.observe_connect)
        if adopted is None:
            # Its address is noted like the proxy's own, so requests through the proxy to
            # the metrics endpoint are refused as loops.
            endpoint = serverFromString(reactor, config.metrics)
            service = _ListeningService(endpoint, factory, metrics_site(metrics, factory))
            service.setName("metrics " + config.metrics)
        else:
            snapshot = adopted.snapshot
            assert snapshot is not None
            # A socket left by a worker that was killed would stop this one from listening.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(snapshot)
            endpoint = UNIXServerEndpoint(reactor, snapshot, mode=0o600)
            service = _ListeningService(endpoint, factory, SnapshotFactory(metrics, reactor))
        service.setServiceParent(top)
    return top


def _warn_if_exposed(config: ProxyConfig) -> None:
    if config.proxy_protocol_from and not any(
        proxy_protocol_inner(description) is not None for description in config.port
    ):
        log.warn(
            "--proxy-protocol-from is set but no --port is a haproxy: listener; it has no effect"
        )
    public = public_listeners(config)
    if not public:
        return
    open_networks = [
        cidr
        for cidr in config.allow
        if not ipaddress.ip_network(cidr, strict=False).is_private
        or ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    ]
    if config.allow == ProxyConfig().allow:
        log.warn(
            "listening on {ports} without --allow: only loopback clients are served; "
            "add --allow NETWORK for the clients that should use this proxy",
            ports=", ".join(public),
        )
    elif open_networks:
        log.warn(
            "listening on {ports} and allowing {networks}: this is an open proxy that "
            "anyone on the internet can use",
            ports=", ".join(public),
            networks=", ".join(open_networks),
        )
