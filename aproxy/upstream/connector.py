"""
How the proxy reaches an origin or a parent: the L{IUpstreamConnector} interface, the
default L{EndpointConnector}, with its bounded, rebinding-safe name lookups, and
L{connect_error}, which explains a failed connection to the client.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from aproxy.errors import BadGateway, GatewayTimeout, ProxyError, ServiceUnavailable
from aproxy.upstream.routes import Parent
from aproxy.workpool import FairQueue, WorkRefused, current_client, shared_runner

__all__ = ["EndpointConnector", "IUpstreamConnector", "client_key", "connect_error", "domain_key"]


class IUpstreamConnector(Interface):
    """
    How the proxy opens a TCP connection to an origin or a parent (see
    L{aproxy.upstream.dialer}).
    """

    def connect(host: str, port: int, factory: Factory) -> Deferred[Protocol]:  # noqa: N805
        """
        Connect to C{host}:C{port} and build the connection's protocol with C{factory}.

        @return: A L{Deferred} firing with the connected protocol, or failing with the
            connection error (C{DNSLookupError}, C{ConnectionRefusedError}, ...).
        """


@implementer(IUpstreamConnector)
class EndpointConnector:
    """
    The default connector: Twisted client endpoints on the given reactor.

    IP literals get a plain TCP endpoint (no name resolution). A name is looked up by the
    connector itself, through C{lookups} (a L{FairQueue} that bounds the lookups running
    and waiting per client and per name, and drops those whose client gave up), then:

      - without C{check_address}, a L{HostnameEndpoint} connects to the addresses found,
        trying them as it does (Happy Eyeballs, RFC 8305);
      - with C{check_address}, every address is checked and exactly the addresses that
        passed are tried in turn, so a name that resolves differently a moment later
        (DNS rebinding) can't reach an address that was refused.

    Lookups use the system's resolver (C{getaddrinfo}: C{/etc/hosts}, nsswitch, search
    domains, as every other program on the host) in a dedicated pool of threads, never
    the reactor's own pool, which Twisted and the password hashes use.

    @param check_address: Called with the host and each resolved address; raises a
        L{aproxy.errors.ProxyError} to refuse that address.
    @param resolve: Resolves a host to its addresses; fails with C{DNSLookupError}.
        By default C{resolver} is asked, or, without one, C{getaddrinfo} runs in the
        dedicated lookup threads.
    @param lookups: Bounds and shares the lookups (one made from the C{LOOKUP_*}
        defaults if L{None}).
    @param resolver: An L{IHostnameResolver} to ask instead of C{getaddrinfo}; each
        lookup holds its place in C{lookups} until the resolver completes it.
    """

    #: Lookups that run at once (threads in the lookup pool).
    LOOKUP_THREADS = 10
    #: Lookups that may wait for a thread, in all.
    LOOKUP_QUEUE = 200
    #: Lookups one client may have running at once, and running or waiting.
    LOOKUP_CLIENT_RUNNING = 4
    LOOKUP_CLIENT_JOBS = 16
    #: Lookups for one name that may run at once, and run or wait.
    LOOKUP_NAME_RUNNING = 2
    LOOKUP_NAME_JOBS = 32

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        check_address: Callable[[str, str], None] | None = None,
        resolve: Callable[[str, int], Deferred[list[str]]] | None = None,
        lookups: FairQueue | None = None,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._check = check_address
        self._resolver = resolver
        if resolve is None:
            resolve = self._ask_resolver if resolver is not None else self._getaddrinfo
        self._resolve = resolve
        self.lookups = lookups if lookups is not None else self.default_lookups()

    @classmethod
    def default_lookups(cls) -> FairQueue:
        """A L{FairQueue} for name lookups with the C{LOOKUP_*} bounds."""
        return FairQueue(
            cls.LOOKUP_THREADS,
            cls.LOOKUP_QUEUE,
            cls.LOOKUP_CLIENT_RUNNING,
            cls.LOOKUP_CLIENT_JOBS,
            cls.LOOKUP_NAME_RUNNING,
            cls.LOOKUP_NAME_JOBS,
            "name lookups",
        )

    def connect(self, host: str, port: int, factory: Factory) -> Deferred[Protocol]:
        """Connect to C{host}:C{port} with the right kind of endpoint."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d = self.lookup(host, port)
            if self._check is not None:
                return d.addCallback(self._connect_checked, host, port, factory)
            return d.addCallback(self._connect_resolved, host, port, factory)
        return self._connect_address(host, port, factory)

    def lookup(self, host: str, port: int) -> Deferred[list[str]]:
        """
        Resolve C{host} through the bounded lookup queue, for the client in
        L{current_client}.

        @return: A L{Deferred} with the addresses, failing with C{DNSLookupError}, or
            with L{ServiceUnavailable} (C{dns_error}) when a bound on lookups is reached.
            Cancelling it drops a lookup that has not started yet.
        """
        d = self.lookups.submit(
            lambda: self._resolve(host, port),
            client_key(current_client.get()),
            domain_key(host),
        )
        return d.addErrback(_lookup_refused, host, port)

    def _connect_resolved(
        self, addresses: list[str], host: str, port: int, factory: Factory
    ) -> Deferred[Protocol]:
        endpoint = HostnameEndpoint(
            _ResolvedReactor(self._reactor, addresses),
            host.encode("idna"),
            port,
            timeout=self._timeout,
        )
        return cast("Deferred[Protocol]", endpoint.connect(factory))

    def _ask_resolver(self, host: str, port: int) -> Deferred[list[str]]:
        assert self._resolver is not None
        receiver = _Receiver(host)
        self._resolver.resolveHostName(receiver, host, port)
        return receiver.done

    def _connect_address(self, address: str, port: int, factory: Factory) -> Deferred[Protocol]:
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = kind(self._reactor, address, port, timeout=self._timeout)
        return cast("Deferred[Protocol]", endpoint.connect(factory))

    def _connect_checked(
        self, addresses: list[str], host: str, port: int, factory: Factory
    ) -> Deferred[Protocol]:
        assert self._check is not None
        allowed = []
        refusal: Exception | None = None
        for address in addresses:
            try:
                self._check(host, address)
            except Exception as e:
                refusal = refusal or e
            else:
                allowed.append(address)
        if not allowed:
            raise refusal or DNSLookupError(host)
        return self._try_each(allowed, port, factory)

    def _try_each(self, addresses: list[str], port: int, factory: Factory) -> Deferred[Protocol]:
        d = self._connect_address(addresses[0], port, factory)
        if len(addresses) > 1:
            rest = addresses[1:]

            def next_address(failure: Failure) -> Deferred[Protocol] | Failure:
                if failure.check(ConnectError) and not failure.check(ConnectingCancelledError):
                    return self._try_each(rest, port, factory)
                return failure

            d.addErrback(next_address)
        return d

    def _getaddrinfo(self, host: str, port: int) -> Deferred[list[str]]:
        runner = shared_runner(self._reactor, "aproxy-dns", self.LOOKUP_THREADS)
        return runner.run(_lookup, host, port)


def domain_key(host: str) -> str:
    """
    What the per-name bound on lookups counts: the domain a name belongs to, its last two
    labels (three when the second-last is a short one such as C{co} in C{example.co.uk}).
    A client that asks for endless random names under one slow domain
    (C{x1.slow.example}, C{x2.slow.example}, ...) then takes that domain's share of the
    threads only, not all of them.
    """
    labels = host.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-2]) <= 3 else 2
    return ".".join(labels[-keep:])


def client_key(address: str | None) -> str | None:
    """
    What the per-client bound on lookups counts: the address, or for IPv6 its /64
    network, since one host commonly has a whole /64 to pick source addresses from.
    """
    if address is None or ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    except ValueError:
        return address


def _lookup_refused(failure: Failure, host: str, port: int) -> Failure:
    """Turn a refused lookup (a bound reached) into the 503 the client gets."""
    refused = failure.check(WorkRefused)
    if refused is None:
        return failure
    reason = cast("WorkRefused", failure.value).reason
    raise ServiceUnavailable(
        f"cannot look up {host} now: {reason}", "dns_error", details=reason
    ) from None


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects the addresses an L{IHostnameResolver} finds into a L{Deferred}."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N802, N803
        """The lookup started; nothing to do."""

    def addressResolved(self, address: IAddress) -> None:  # noqa: N802
        """Keep each distinct IP address, in the resolver's order."""
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self._addresses:
            self._addresses.append(host)

    def resolutionComplete(self) -> None:  # noqa: N802
        """Fire with the addresses, or fail with C{DNSLookupError} if there were none."""
        if self._addresses:
            self.done.callback(self._addresses)
        else:
            self.done.errback(DNSLookupError(self._host))


@implementer(IHostResolution)
class _Resolution:
    """A finished lookup of C{name} (nothing left to cancel)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to cancel: the answer was given at once."""


@implementer(IHostnameResolver)
class _FixedResolver:
    """An L{IHostnameResolver} that knows one answer: addresses already looked up."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = addresses

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        """Report the addresses at once."""
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ResolvedReactor:
    """
    The reactor as a L{HostnameEndpoint} sees it: the real one (timers, C{connectTCP}),
    but with a name resolver that answers with the addresses the connector already
    looked up, so the endpoint's own lookup can't bypass the bounded lookup queue.
    """

    def __init__(self, reactor: Any, addresses: list[str]) -> None:
        self._reactor = reactor
        self.nameResolver: IHostnameResolver = _FixedResolver(addresses)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:  # noqa: N802
        """Not used: the resolver is fixed."""
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _lookup(host: str, port: int) -> list[str]:
    """Resolve C{host} with getaddrinfo: its distinct addresses, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise DNSLookupError(f"{host}: {e}") from None
    seen: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    if not seen:
        raise DNSLookupError(host)
    return seen


def connect_error(
    failure: Failure, host: str, port: int, parent: Parent | None = None
) -> ProxyError:
    """
    The error the client gets when a connection could not be made: 502 naming what could
    not be reached and why, or 504 when connecting timed out.

    @param failure: Why the connector failed (C{DNSLookupError}, C{ConnectionRefusedError},
        C{TimeoutError}, ...); a L{ProxyError} (a policy refusal, a full lookup queue) is
        passed on as it is.
    @param host: The origin's host.
    @param port: The origin's port.
    @param parent: The parent proxy the connection was going to, when the origin is
        reached through one: then the parent is named, not the origin.
    """
    if isinstance(failure.value, ProxyError):
        return failure.value
    if parent is None:
        where = details = f"{host}:{port}"
        resolving = host
    else:
        where = resolving = f"parent proxy {parent.name}"
        details = f"parent {parent.name}"
    if failure.check(ierror.DNSLookupError):
        return BadGateway(f"cannot resolve {resolving}", "dns_error", details)
    if failure.check(ierror.ConnectionRefusedError):
        return BadGateway(f"connection to {where} refused", "connection_refused", details)
    if failure.check(ierror.TimeoutError):
        return GatewayTimeout(f"connecting to {where} timed out", "connection_timeout", details)
    return BadGateway(
        f"cannot connect to {where}: {failure.getErrorMessage()}",
        "destination_unavailable",
        details,
    )
