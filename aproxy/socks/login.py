"""
L{SocksLogin}: the check of a SOCKS5 client's RFC 1929 username and password, through
the proxy's authenticator (its cache of checked credentials) and failed-login throttle,
as L{aproxy.client.login.LoginCheck} does for C{Proxy-Authorization}.

The credentials are handed to the authenticator as the C{Basic} value an HTTP client
would send, so a user's SOCKS5 and HTTP guesses count as the same guesses, joined and
throttled together.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.access.auth import credential_key
from aproxy.client.guard import guarded
from aproxy.errors import ProxyAuthRequired, ProxyError
from aproxy.socks.wire import Credentials
from aproxy.workpool import as_client

__all__ = ["SocksLogin"]


class SocksLogin:
    """
    One login check: L{start} it; it calls C{done} with the user name, or with the
    L{ProxyError} that refuses the client (407, or the throttle's 429). L{cancel} drops
    it (the client left): a queued hash never runs.

    @param conn: The session (a L{aproxy.socks.protocol.SocksProtocol}).
    """

    log = Logger()

    def __init__(
        self, conn: Any, event: Credentials, done: Callable[[str | ProxyError], None]
    ) -> None:
        self.conn = conn
        self.credentials = b"Basic " + base64.b64encode(event.username + b":" + event.password)
        self.key: Hashable = credential_key(self.credentials)
        self._done = done
        self._waiting: Deferred[Any] | None = None
        self._over = False

    def internal_error(self, failure: Failure) -> None:
        """A bug in one of the check's callbacks: the session handles it."""
        self.conn.internal_error(failure)

    def start(self) -> None:
        """Check now, or wait while checks in progress fill the address's limit."""
        conn = self.conn
        ip = conn.client_ip
        config = conn.config
        throttle = conn.factory.login_throttle
        if ip is not None:
            try:
                wait = throttle.admit(
                    ip, config.auth_max_failures, config.auth_failure_window, self.key
                )
            except ProxyError as e:
                self._finish(e)
                return
            if wait is not None:
                self._waiting = wait
                wait.addCallbacks(self._slot_free, _ignore_cancel)
                return
            throttle.begin(ip, self.key)
        authenticator = conn.runtime.authenticator
        assert authenticator is not None
        d = as_client(ip, authenticator.authenticate, self.credentials)
        self._waiting = d
        d.addCallbacks(self._authenticated, self._auth_failed)

    def cancel(self) -> None:
        """The client left: drop the check (or the wait for one)."""
        self._over = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()

    def _finish(self, result: str | ProxyError) -> None:
        if not self._over:
            self._over = True
            self._done(result)

    @guarded
    def _slot_free(self, ignored: None) -> None:
        self._waiting = None
        if not self._over:
            self.start()

    def _count(self, failed: bool | None) -> None:
        conn = self.conn
        if conn.client_ip is not None:
            window = conn.config.auth_failure_window
            conn.factory.login_throttle.end(conn.client_ip, self.key, failed, window)

    @guarded
    def _authenticated(self, user: str | None) -> None:
        self._waiting = None
        self._count(user is None)
        self._finish(user if user is not None else ProxyAuthRequired("SOCKS5 login refused"))

    @guarded
    def _auth_failed(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            self._count(None)
            return
        if isinstance(failure.value, ProxyError):
            # A bound on password checks was reached (429/503): nothing was checked.
            self._count(False)
            self._finish(failure.value)
            return
        self._count(True)
        self.log.failure("checking SOCKS5 credentials failed", failure)
        self._finish(ProxyAuthRequired("SOCKS5 login failed"))


def _ignore_cancel(failure: Failure) -> None:
    """A wait for the login throttle cancelled because the client went away."""
    failure.trap(CancelledError)
