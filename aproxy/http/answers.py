"""
Responses the proxy writes itself: errors (with RFC 9209 C{Proxy-Status}) and the answer
to a C{TRACE} or C{OPTIONS} that reached its last hop. Pure functions: bytes out, no
transport.
"""

from __future__ import annotations

from http import HTTPStatus

from aproxy.errors import ProxyError
from aproxy.http.head import RequestHead

__all__ = ["error_response", "local_answer"]

_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def error_response(err: ProxyError, name: bytes | None, extra: bytes = b"") -> list[bytes]:
    """
    A complete C{text/plain} error response for C{err}, ending the connection.

    @param name: The proxy's name for C{Proxy-Status} (C{aproxy} when L{None}).
    @param extra: Further field lines, e.g. a C{Proxy-Authenticate} challenge.
    @return: The pieces, ready for C{writeSequence}.
    """
    body = err.reason.encode("utf-8", "replace") + b"\n"
    try:
        phrase = HTTPStatus(err.status).phrase.encode("ascii")
    except ValueError:
        phrase = b"Error"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (err.status, phrase),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if err.error_type is not None:
        status = (name or b"aproxy") + b"; error=" + err.error_type.encode("ascii")
        if err.details:
            quoted = err.details.replace("\\", "\\\\").replace('"', '\\"')
            status += b'; details="' + quoted.encode("ascii", "replace") + b'"'
        lines.append(b"Proxy-Status: " + status + b"\r\n")
    if extra:
        lines.append(extra)
    lines.append(b"Connection: close\r\n\r\n")
    lines.append(body)
    return lines


def local_answer(head: RequestHead, closing: bool) -> bytes:
    """
    The proxy's own answer to a C{TRACE} or C{OPTIONS} whose C{Max-Forwards} reached 0
    (RFC 9110 section 7.6.2). C{TRACE} echoes the request head, without the fields that
    carry credentials (RFC 9110 section 9.3.8).
    """
    if head.method == b"TRACE":
        lines = [b"TRACE " + head.target + b" HTTP/1.%d\r\n" % head.minor]
        lines += [n + b": " + v + b"\r\n" for n, v in head.fields if n.lower() not in _SENSITIVE]
        body = b"".join(lines) + b"\r\n"
        ctype = b"Content-Type: message/http\r\n"
    else:
        body = b""
        ctype = b""
    return (
        b"HTTP/1.1 200 OK\r\n"
        + ctype
        + b"Content-Length: %d\r\n" % len(body)
        + (b"Connection: close\r\n" if closing else b"")
        + b"\r\n"
        + body
    )
