"""
twistd glue: the C{aproxy} command line (L{Options}) and L{makeService}, which turns the
parsed options into a L{ProxyConfig} and the service from L{aproxy.service}.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from aproxy.config import DEFAULT_PORT, ProxyConfig, listen_description
from aproxy.service import makeService as _makeService

__all__ = ["Options", "makeService"]


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _whole(text: str) -> int:
    return int(text)


class Options(usage.Options):
    """The command line of C{twistd aproxy}; every option is a L{ProxyConfig} field."""

    synopsis = "[options]"
    longdesc = (
        "aproxy: an HTTP/1.1 forward proxy. Point clients at it with, e.g., "
        "curl -x http://127.0.0.1:8080 http://example.com/. It listens on loopback only "
        "unless told otherwise with --port."
    )
    optFlags = [
        ["no-via", None, "Do not add a Via field to forwarded messages."],
    ]
    optParameters: list[list[Any]] = [
        ["connect-timeout", None, 10.0, "Seconds to connect to an origin before 504.", _seconds],
        [
            "read-timeout",
            None,
            60.0,
            "Seconds to wait for the origin's response head, and between body bytes.",
            _seconds,
        ],
        ["idle-timeout", None, 60.0, "Seconds an idle keep-alive client is kept.", _seconds],
        [
            "header-timeout",
            None,
            10.0,
            "Seconds a client has to send a complete request head (then 408).",
            _seconds,
        ],
        ["via", None, "aproxy", "Pseudonym used in the Via fields the proxy adds."],
        ["max-head-size", None, 65536, "Largest request or response head, bytes (431).", _whole],
        ["max-request-line", None, 16384, "Longest request line, bytes (414).", _whole],
        ["pool-size", None, 100, "Idle upstream connections kept per origin (0: none).", _whole],
        [
            "pool-idle-timeout",
            None,
            30.0,
            "Seconds an idle pooled upstream connection is kept.",
            _seconds,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []

    def opt_port(self, description: str) -> None:
        """
        Where to listen (repeatable): a bare port number means that port on 127.0.0.1;
        or any Twisted endpoint, e.g. tcp:8080:interface=0.0.0.0, tcp6:8080:interface=\\:\\:1,
        unix:/run/aproxy.sock. Default: tcp:8080:interface=127.0.0.1.
        """
        try:
            self["port"].append(listen_description(description))
        except ValueError as e:
            raise usage.UsageError(f"--port: {e}") from None

    opt_p = opt_port

    def postOptions(self) -> None:
        """Build the validated L{ProxyConfig}; a bad value is one usage error line."""
        try:
            self["config"] = ProxyConfig(
                ports=tuple(self["port"]) or (DEFAULT_PORT,),
                connect_timeout=self["connect-timeout"],
                read_timeout=self["read-timeout"],
                idle_timeout=self["idle-timeout"],
                header_timeout=self["header-timeout"],
                via=None if self["no-via"] else self["via"],
                max_head_size=self["max-head-size"],
                max_request_line=self["max-request-line"],
                pool_size=self["pool-size"],
                pool_idle_timeout=self["pool-idle-timeout"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


class _CommandLineService(MultiService):
    """
    The service twistd runs: a failure to listen ends the start with one line on
    standard error and exit status 1, instead of twistd's long traceback.
    """

    def __init__(self, inner: IService, exit: Callable[[str], None]) -> None:
        super().__init__()
        inner.setServiceParent(self)
        self._exit = exit

    def privilegedStartService(self) -> None:
        """Bind the ports, reporting one that can't be bound in a single line."""
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            self._exit(f"aproxy: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")


def _exit(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    raise SystemExit(1)


def makeService(options: Options) -> IService:
    """Make the proxy service from parsed command-line options."""
    try:
        inner = _makeService(options["config"])
    except ValueError as e:
        _exit(f"aproxy: {e}")
        raise  # unreachable: _exit raises
    return _CommandLineService(inner, _exit)
