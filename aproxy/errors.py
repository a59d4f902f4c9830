"""
The one family of "this request cannot be served" errors.

Parsing, policy and routing raise a L{ProxyError}; L{aproxy.client.protocol.ProxyProtocol} turns it
into a short C{text/plain} response carrying an RFC 9209 C{Proxy-Status} field, in one place.
"""

from __future__ import annotations

__all__ = [
    "BadGateway",
    "BadRequest",
    "Forbidden",
    "GatewayTimeout",
    "HeaderTooLarge",
    "InternalError",
    "MisdirectedRequest",
    "NotImplementedByProxy",
    "ProxyAuthRequired",
    "ProxyError",
    "RequestTimeout",
    "ServiceUnavailable",
    "TooManyRequests",
    "URITooLong",
    "VersionNotSupported",
]


class ProxyError(Exception):
    """
    A request that the proxy answers itself with an error status.

    @ivar status: The HTTP status code sent to the client.
    @ivar reason: A one-line explanation, sent as the response body.
    @ivar error_type: The RFC 9209 error type for C{Proxy-Status}, or L{None} when the
        error is the client's own (a malformed request) rather than the proxy's.
    @ivar details: Optional extra text for the C{Proxy-Status} C{details} parameter.
    """

    status = 500
    error_type: str | None = None

    def __init__(
        self,
        reason: str,
        error_type: str | None = None,
        details: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if error_type is not None:
            self.error_type = error_type
        self.details = details


class BadRequest(ProxyError):
    """A malformed or ambiguous request (400); never repaired, always rejected."""

    status = 400


class Forbidden(ProxyError):
    """A request that policy refuses (403)."""

    status = 403
    error_type = "http_request_denied"


class RequestTimeout(ProxyError):
    """A request head the client did not finish within the header timeout (408)."""

    status = 408


class ProxyAuthRequired(ProxyError):
    """Missing or wrong proxy credentials (407, with a C{Proxy-Authenticate} challenge)."""

    status = 407


class TooManyRequests(ProxyError):
    """
    Too many failed proxy logins from one address (429, RFC 6585), with a C{Retry-After}
    of C{retry_after} seconds.
    """

    status = 429

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class URITooLong(ProxyError):
    """A request line longer than the proxy accepts (414)."""

    status = 414


class HeaderTooLarge(ProxyError):
    """A request head larger than C{max_head_size} (431)."""

    status = 431


class NotImplementedByProxy(ProxyError):
    """A feature the proxy does not implement, e.g. an unknown transfer coding (501)."""

    status = 501


class InternalError(ProxyError):
    """
    A bug in the proxy met while handling a request (500): answered, logged once with
    its traceback, and confined to that one connection.
    """

    status = 500
    error_type = "proxy_internal_error"


class BadGateway(ProxyError):
    """The origin could not be reached or sent something that is not valid HTTP (502)."""

    status = 502
    error_type = "proxy_internal_error"


class MisdirectedRequest(ProxyError):
    """
    A request on an intercepted TLS connection for another host than the connection's
    (421, RFC 9110 section 15.5.20): the client should open a connection for that host.
    """

    status = 421


class ServiceUnavailable(ProxyError):
    """The proxy is at a connection limit (503)."""

    status = 503
    error_type = "connection_limit_reached"


class GatewayTimeout(ProxyError):
    """The origin did not connect or answer within the configured timeout (504)."""

    status = 504
    error_type = "connection_timeout"


class VersionNotSupported(ProxyError):
    """A request whose HTTP major version is not 1 (505)."""

    status = 505
