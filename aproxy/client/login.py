"""
L{LoginCheck}: the check of one request's proxy credentials, between its head and its
routing, in step with the login throttle (L{aproxy.access.throttle.LoginThrottle}).

A guess counts from the moment its check starts, not when its hash ends (issue #12, item
5); checks of one credential are joined; while checks in progress fill the address's limit
a request waits for one of them to end, since they may all be valid (many users behind one
address). The connection is not paused meanwhile: its bytes are held (bounded), and a
client that hangs up is noticed, so its queued hash is dropped and never runs.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from aproxy.access.auth import credential_key
from aproxy.client.exchange import ClientExchange
from aproxy.client.guard import guarded
from aproxy.client.phases import Phase
from aproxy.client.side import ClientSide
from aproxy.errors import ProxyAuthRequired, ProxyError
from aproxy.workpool import as_client

__all__ = ["LoginCheck"]


class LoginCheck:
    """The credential check of one request (see the module docstring)."""

    log = Logger()

    def __init__(self, conn: ClientSide, x: ClientExchange) -> None:
        self.conn = conn
        self.x = x
        values = x.head.noted.get(b"proxy-authorization")
        self.credentials = values[0] if values is not None and len(values) == 1 else None
        self.key: Hashable | None = (
            credential_key(self.credentials) if self.credentials is not None else None
        )

    def internal_error(self, failure: Failure) -> None:
        """A bug in one of the check's callbacks: the connection handles it."""
        self.conn.internal_error(failure)

    def start(self) -> None:
        """
        Check the credentials once the login throttle lets this request, or wait.

        @raise ProxyError: A 429 from the throttle.
        """
        conn, x = self.conn, self.x
        ip = conn.client_ip
        if ip is not None:
            config = x.runtime.config
            throttle = conn.factory.login_throttle
            wait = throttle.admit(
                ip, config.auth_max_failures, config.auth_failure_window, self.key
            )
            if wait is not None:
                x.checking = wait
                wait.addCallbacks(self._slot_free, _ignore_cancel)
                return
            if self.key is not None:
                throttle.begin(ip, self.key)
        authenticator = x.runtime.authenticator
        assert authenticator is not None
        d = as_client(ip, authenticator.authenticate, self.credentials)
        x.checking = d
        d.addCallbacks(self._authenticated, self._auth_failed)

    def _current(self) -> bool:
        """Whether this check's request is still the one waiting for it."""
        conn = self.conn
        return conn.phase is Phase.AUTHENTICATING and conn.exchange is self.x

    @guarded
    def _slot_free(self, ignored: None) -> None:
        """A check this request waited for ended: ask the throttle again."""
        self.x.checking = None
        if not self._current():
            return
        try:
            self.start()
        except ProxyError as e:
            self.conn.fail(e)

    def _count(self, failed: bool | None) -> None:
        """Tell the throttle how this check ended."""
        ip = self.conn.client_ip
        if self.key is not None and ip is not None:
            window = self.x.runtime.config.auth_failure_window
            self.conn.factory.login_throttle.end(ip, self.key, failed, window)

    @guarded
    def _authenticated(self, user: str | None) -> None:
        self.x.checking = None
        self._count(user is None)
        if not self._current():
            return
        conn = self.conn
        try:
            if user is None:
                raise ProxyAuthRequired("proxy authentication required")
            conn.user = user
            self.x.authorized(conn.take_pending())
        except ProxyError as e:
            conn.fail(e)

    @guarded
    def _auth_failed(self, failure: Failure) -> None:
        self.x.checking = None
        if failure.check(CancelledError):
            # The client left while its check waited or ran.
            self._count(None)
            return
        if isinstance(failure.value, ProxyError):
            # A bound on password checks was reached (429/503): nothing was checked.
            self._count(False)
            self.conn.fail(failure.value)
            return
        self._count(True)
        self.log.failure("checking proxy credentials failed", failure)
        self.conn.fail(ProxyAuthRequired("proxy authentication failed"))


def _ignore_cancel(failure: Failure) -> None:
    """A wait for the login throttle cancelled because its request went away."""
    failure.trap(CancelledError)
