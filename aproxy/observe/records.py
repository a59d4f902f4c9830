"""
L{Exchange}: what the proxy reports about each finished request or tunnel, for access logs
and metrics. Observers (L{IExchangeObserver}) are plain callables registered with
C{ProxyFactory.observers.append(observer)}; they must return quickly and not raise.
"""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import Interface

__all__ = ["MAX_LOGGED_FIELD", "Exchange", "ExchangeObserver", "IExchangeObserver"]

MAX_LOGGED_FIELD = 2048
"""The most bytes of a C{Referer} or C{User-Agent} value a record carries (the rest is cut)."""


class Exchange:
    """
    One finished request (or tunnel) as the proxy saw it: what every
    L{IExchangeObserver} is given (public as C{aproxy.Exchange}). Who asked (C{client},
    C{user}), what was asked (C{method}, C{target}, C{version}, C{referer},
    C{user_agent}), what was answered (C{status}), how much moved (C{bytes_to_client},
    C{bytes_to_origin}) and how it ended (C{duration}, C{upstream}, C{error}).

    @ivar time: When the request head was complete (seconds since the epoch, UTC).
    @ivar client: The client's address (C{"unix"} for a UNIX socket).
    @ivar user: The authenticated user, or L{None}.
    @ivar method: The request method, e.g. C{"GET"}.
    @ivar target: The request target as received (C{host:port} for CONNECT).
    @ivar status: The status sent to the client (0 if none was sent).
    @ivar bytes_to_client: Bytes written to the client, heads included (as Squid counts).
    @ivar bytes_to_origin: Bytes written to the origin, heads included.
    @ivar duration: Seconds from the complete request head to the end of the exchange.
    @ivar upstream: How the origin was reached: C{"direct"}, or the parent proxy's URL
        without credentials (e.g. C{"http://10.1.2.3:3128"}).
    @ivar error: The RFC 9209 C{Proxy-Status} error type, or L{None}.
    @ivar version: The request's HTTP version as the client sent it, e.g. C{"HTTP/1.0"}.
    @ivar cache: With the cache on, what it did, in Squid's result codes (C{"TCP_HIT"},
        C{"TCP_MEM_HIT"}, C{"TCP_MISS"}, C{"TCP_REFRESH_UNMODIFIED"}, ...); L{None}
        without a cache, or for requests it does not see (CONNECT).
    """

    __slots__ = (
        "_fields",
        "_referer",
        "_user_agent",
        "bytes_to_client",
        "bytes_to_origin",
        "cache",
        "client",
        "datagrams",
        "duration",
        "error",
        "method",
        "status",
        "target",
        "time",
        "upstream",
        "user",
        "version",
    )

    def __init__(
        self,
        time: float,
        client: str,
        user: str | None,
        method: str,
        target: str,
        status: int,
        bytes_to_client: int,
        bytes_to_origin: int,
        duration: float,
        upstream: str,
        error: str | None,
        version: str = "HTTP/1.1",
        referer: str | None = None,
        user_agent: str | None = None,
        fields: bytes | None = None,
        cache: str | None = None,
        datagrams: int | None = None,
    ) -> None:
        """
        @param referer: The C{Referer} value, if not to be read from C{fields}.
        @param user_agent: The C{User-Agent} value, if not to be read from C{fields}.
        @param fields: The request's field lines as received (each ending in CRLF):
            C{referer} and C{user_agent} are read from them when first asked for, so a
            record that no observer formats costs nothing more.
        """
        self.time = time
        self.client = client
        self.user = user
        self.method = method
        self.target = target
        self.status = status
        self.bytes_to_client = bytes_to_client
        self.bytes_to_origin = bytes_to_origin
        self.duration = duration
        self.upstream = upstream
        self.error = error
        self.version = version
        self._referer = referer
        self._user_agent = user_agent
        self._fields = fields
        self.cache = cache
        self.datagrams = datagrams

    @property
    def referer(self) -> str | None:
        """
        The request's C{Referer} as sent, or L{None} without one (several fields are
        joined with C{", "}, as Apache logs them). Bytes that are not UTF-8 are kept as
        lone surrogates (C{surrogateescape}), so C{.encode("utf-8", "surrogateescape")}
        gives back what the client sent; at most L{MAX_LOGGED_FIELD} bytes.
        """
        if self._fields is not None:
            self._read_fields()
        return self._referer

    @property
    def user_agent(self) -> str | None:
        """The request's C{User-Agent} as sent, or L{None}; see L{referer}."""
        if self._fields is not None:
            self._read_fields()
        return self._user_agent

    def _read_fields(self) -> None:
        """Take C{referer} and C{user_agent} (those not given) from the field lines."""
        block, self._fields = self._fields, None
        assert block is not None
        found: dict[bytes, list[bytes]] = {}
        for line in block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            lname = name.lower()
            if lname in (b"referer", b"user-agent"):
                found.setdefault(lname, []).append(value.strip(b" \t"))
        if self._referer is None:
            self._referer = _text(found.get(b"referer"))
        if self._user_agent is None:
            self._user_agent = _text(found.get(b"user-agent"))

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method} {self.target} {self.status} from {self.client}"
            f" {self.bytes_to_client}/{self.bytes_to_origin} bytes>"
        )


def _text(values: list[bytes] | None) -> str | None:
    """Field values joined, bounded and decoded losslessly, or L{None} for none."""
    if values is None:
        return None
    joined = b", ".join(values)[:MAX_LOGGED_FIELD]
    return joined.decode("utf-8", "surrogateescape")


class IExchangeObserver(Interface):
    """
    Something told about every finished request and tunnel: an access log, metrics, an
    embedder's own accounting. Any callable taking one L{Exchange} will do (a function, a
    bound method); declaring the interface is optional. Register it with
    C{ProxyFactory.observers.append(observer)}.

    Observers run on the reactor thread as each exchange ends, so they must return quickly
    and must not raise (a failing observer is a bug in it, not in the request).
    """

    def __call__(exchange: Exchange) -> None:  # noqa: N805 (zope interfaces take no self)
        """
        Take note of one finished exchange.

        @param exchange: The finished request or tunnel; its fields do not change after.
        """


ExchangeObserver = Callable[[Exchange], None]
"""The type of an L{IExchangeObserver}, for annotations."""
