"""
Proxy authentication: L{IAuthenticator} and L{HtpasswdAuthenticator}, which checks
C{Proxy-Authorization: Basic} credentials (RFC 7617, RFC 9110 section 11.7.2) against an
Apache htpasswd file (read and checked by L{aproxy.access.htpasswd}).
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from aproxy.access.htpasswd import (
    AuthFileError,
    PasswordHash,
    Signature,
    decode_user_name,
    decoy_for,
    read_file,
)
from aproxy.errors import ServiceUnavailable, TooManyRequests
from aproxy.workpool import FairQueue, WorkRefused, current_client, shared_runner

__all__ = [
    "HtpasswdAuthenticator",
    "IAuthenticator",
    "basic_challenge",
    "credential_key",
    "parse_basic_credentials",
]


class IAuthenticator(Interface):
    """
    Decides whether a request's C{Proxy-Authorization} credentials are valid.
    """

    realm = Attribute("The protection space (C{str}) named in the challenge.")

    def authenticate(credentials: bytes | None) -> Deferred[str | None]:  # noqa: N805
        """
        Check a C{Proxy-Authorization} field value.

        @param credentials: The field value, or L{None} if the request had none.
        @return: A L{Deferred} firing with the user name when the credentials are valid and
            with L{None} otherwise (absent, malformed, unknown user, wrong password). It
            never fails because of bad input.
        """


def parse_basic_credentials(credentials: bytes | None) -> tuple[str, bytes] | None:
    """
    Decode C{Basic} credentials (RFC 7617 section 2).

    The scheme is case-insensitive; the token must be strict base64 (no stray characters,
    correct padding). The user-id is decoded as UTF-8, or as ISO-8859-1 when it is not
    valid UTF-8; the password is returned as the raw bytes a hash is computed over.

    @param credentials: A C{Proxy-Authorization} (or C{Authorization}) field value.
    @return: C{(user, password)}, or L{None} if C{credentials} is absent or malformed.
    """
    if not credentials:
        return None
    scheme, space, token = credentials.strip(b" \t").partition(b" ")
    if not space or scheme.lower() != b"basic":
        return None
    # credentials = auth-scheme 1*SP token68 (RFC 9110 section 11.4).
    token = token.lstrip(b" ")
    if not token:
        return None
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return None
    user_id, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return decode_user_name(user_id), password


def credential_key(credentials: bytes) -> Hashable:
    """
    What identifies a guess: the decoded C{(user, password)} of C{Basic} credentials, so
    that C{basic}, C{BASIC} or extra spaces are the same guess; the raw value otherwise.
    """
    parsed = parse_basic_credentials(credentials)
    return parsed if parsed is not None else credentials


def basic_challenge(realm: str) -> bytes:
    """
    Build a C{Proxy-Authenticate} field value asking for C{Basic} credentials.

    @param realm: The protection space; C{"} and C{\\} are escaped (RFC 9110 section
        5.6.4, quoted-string).
    @return: For example C{b'Basic realm="aproxy", charset="UTF-8"'} (RFC 7617 section 2.1).
    @raise ValueError: If C{realm} holds a control character, which no quoted-string may.
    """
    _check_realm(realm)
    escaped = realm.replace("\\", "\\\\").replace('"', '\\"')
    return b'Basic realm="' + escaped.encode("utf-8") + b'", charset="UTF-8"'


def _check_realm(realm: str) -> None:
    # qdtext and quoted-pair allow HTAB, SP, VCHAR and obs-text, never CR, LF or other
    # controls: those would split the header (RFC 9110 section 5.6.4).
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in realm):
        raise ValueError(f"realm {realm!r} contains a control character")


_Key = tuple[str, bytes]


class _Check:
    """
    One slow hash in flight for a (user, password), shared by every request that asks
    for it meanwhile. Each request waits on a L{Deferred} of its own; when the last one
    gives up (its client left), the hash is dropped if it has not started yet.
    """

    def __init__(self) -> None:
        self.waiters: list[Deferred[str | None]] = []
        self.job: Deferred[Any] | None = None

    def join(self) -> Deferred[str | None]:
        """A L{Deferred} for one more request waiting on this check."""
        d: Deferred[str | None] = Deferred(self._leave)
        self.waiters.append(d)
        return d

    def _leave(self, d: Deferred[str | None]) -> None:
        if d in self.waiters:
            self.waiters.remove(d)
        if not self.waiters and self.job is not None:
            job, self.job = self.job, None
            job.cancel()

    def settle(self, result: str | Failure | None) -> None:
        """Give every waiting request the answer (a copy of a failure for each)."""
        waiters, self.waiters = self.waiters, []
        self.job = None
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


@implementer(IAuthenticator)
class HtpasswdAuthenticator:
    """
    Check C{Basic} proxy credentials against an Apache htpasswd file.

    The file is loaded at once and re-read when its modification time or size changes,
    looked at no more than once a second, on the first L{authenticate} after that second.
    If a new version can't be used, the last good one stays in force and the reason is
    logged once; fixing the file brings it back.

    Valid credentials are remembered by their decoded user and password (up to
    L{cache_size} of them, forgotten when the file is re-read), so a slow hash runs once
    per credential, however the header spells it. Slow hashes (bcrypt, MD5-crypt and
    C{$apr1$}, SHA-crypt) run off the reactor thread, through a L{FairQueue} that bounds
    the checks running and waiting per client address; a request that asks for a check
    already running joins it instead of starting another, and a check nobody waits for
    any more is dropped before it starts. A user name the file doesn't have is checked
    against a decoy hash of the file's most common kind, so it costs the same.

    @ivar realm: The protection space sent in the challenge.
    """

    log = Logger()

    #: How many valid credentials are remembered.
    cache_size: ClassVar[int] = 1024
    #: How often, in seconds, the file's modification time and size are looked at.
    check_interval: ClassVar[float] = 1.0
    #: Hashes that run at once (threads in the hashing pool).
    HASH_THREADS: ClassVar[int] = 4
    #: Hashes that may wait for a thread, in all.
    HASH_QUEUE: ClassVar[int] = 128
    #: Hashes one client address may have running at once, and running or waiting.
    HASH_CLIENT_RUNNING: ClassVar[int] = 2
    HASH_CLIENT_JOBS: ClassVar[int] = 16

    def __init__(
        self,
        path: str,
        realm: str = "aproxy",
        clock: IReactorTime | None = None,
        hash_in_thread: Callable[..., Deferred[Any]] | None = None,
        hashing: FairQueue | None = None,
    ) -> None:
        """
        @param path: The htpasswd file.
        @param realm: The protection space named in L{challenge}.
        @param clock: Time source for the reload check; the global reactor if L{None}.
        @param hash_in_thread: Runs C{f(*args)} off the reactor thread and returns a
            L{Deferred} of its result; a dedicated pool of L{HASH_THREADS} threads (not
            the reactor's, which name lookups used to share) if L{None}.
        @param hashing: Bounds the slow hashes per client address (see L{FairQueue});
            one from L{default_hashing} if L{None}. Pass the same one to every
            authenticator that replaces another (a reload), so the bounds hold across.
        @raise AuthFileError: If the file is unreadable or has a line in an unsupported
            format.
        @raise ValueError: If C{realm} holds a control character.
        """
        _check_realm(realm)
        if clock is None:
            from twisted.internet import reactor

            clock = IReactorTime(reactor)
        if hash_in_thread is None:
            hash_in_thread = shared_runner(clock, "aproxy-hash", self.HASH_THREADS).run
        self.realm = realm
        self._path = path
        self._clock = clock
        self._hash_in_thread = hash_in_thread
        self.hashing = hashing if hashing is not None else self.default_hashing()
        self._signature, self._users = read_file(path)
        self._decoy = decoy_for(self._users)
        self._last_check = clock.seconds()
        # What the last failed reload saw, so each bad version is reported once.
        self._failed: Signature | str | None = None
        self._cache: dict[_Key, str] = {}
        self._checks: dict[_Key, _Check] = {}
        # Bumped on every reload; a check that started before one must not fill the cache.
        self._generation = 0

    @classmethod
    def default_hashing(cls) -> FairQueue:
        """A L{FairQueue} for password hashes with the C{HASH_*} bounds."""
        return FairQueue(
            cls.HASH_THREADS,
            cls.HASH_QUEUE,
            cls.HASH_CLIENT_RUNNING,
            cls.HASH_CLIENT_JOBS,
            what="password checks",
        )

    @property
    def path(self) -> str:
        """The password file."""
        return self._path

    def challenge(self) -> bytes:
        """
        The C{Proxy-Authenticate} field value for a 407 response.

        @return: For example C{b'Basic realm="aproxy", charset="UTF-8"'}.
        """
        return basic_challenge(self.realm)

    def authenticate(self, credentials: bytes | None) -> Deferred[str | None]:
        """
        Check a C{Proxy-Authorization} field value; see L{IAuthenticator.authenticate}.

        A slow hash is counted against the client in L{current_client}; when a bound is
        reached the result fails with L{TooManyRequests} (this client) or
        L{ServiceUnavailable} (every client), and no hash runs.
        """
        self._maybe_reload()
        parsed = parse_basic_credentials(credentials)
        if parsed is None:
            return defer.succeed(None)
        cached = self._cache.get(parsed)
        if cached is not None:
            return defer.succeed(cached)
        user, password = parsed
        checker = self._users.get(user)
        known = checker is not None
        if checker is None:
            # Not in the file: check the decoy all the same (and refuse whatever it says).
            checker = self._decoy
            if checker is None:
                return defer.succeed(None)
        if not checker.slow:
            valid = checker.verify(password) and known
            return defer.succeed(self._remember(parsed, user, valid))
        check = self._checks.get(parsed)
        if check is not None:
            return check.join()
        check = self._checks[parsed] = _Check()
        # Joined first: the hash may answer at once (a test's synchronous hasher).
        d = check.join()
        self._start(check, parsed, checker, known)
        return d

    def _start(self, check: _Check, key: _Key, checker: PasswordHash, known: bool) -> None:
        """Queue the slow hash for C{key}; every request for it meanwhile joins C{check}."""
        user, password = key
        generation = self._generation
        client = current_client.get()
        job: Deferred[Any] = self.hashing.submit(
            lambda: self._hash_in_thread(checker.verify, password), client
        )
        check.job = job

        def checked(valid: bool) -> str | None:
            valid = valid and known
            if generation != self._generation:
                return user if valid else None
            return self._remember(key, user, valid)

        def failed(failure: Failure) -> str | Failure | None:
            if failure.check(defer.CancelledError):
                return failure
            if failure.check(WorkRefused):
                refusal = cast("WorkRefused", failure.value)
                self.log.info(
                    "password check refused: {reason}", reason=refusal.reason, client=client
                )
                if refusal.scope == "client":
                    return Failure(TooManyRequests(refusal.reason, 1))
                return Failure(ServiceUnavailable(refusal.reason, "proxy_internal_response"))
            self.log.failure("checking the password of {user!r} failed", failure, user=user)
            return None

        def settle(result: str | Failure | None) -> None:
            if self._checks.get(key) is check:
                del self._checks[key]
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                return  # nobody waits any more
            check.settle(result)

        job.addCallbacks(checked, failed).addBoth(settle)

    def _remember(self, key: _Key, user: str, valid: bool) -> str | None:
        if not valid:
            return None
        if len(self._cache) >= self.cache_size:
            # Forget the oldest entry (dicts keep insertion order).
            del self._cache[next(iter(self._cache))]
        self._cache[key] = user
        return user

    def _maybe_reload(self) -> None:
        now = self._clock.seconds()
        if now - self._last_check < self.check_interval:
            return
        self._last_check = now
        try:
            info = os.stat(self._path)
        except OSError as e:
            self._reload_failed(f"{e.strerror or e}", f"{self._path}: {e.strerror or e}")
            return
        signature = (info.st_mtime_ns, info.st_size)
        if signature == self._signature:
            # Back to the version in force (or never changed): report the next problem.
            self._failed = None
            return
        if signature == self._failed:
            return
        try:
            signature, users = read_file(self._path)
        except AuthFileError as e:
            self._reload_failed(signature, str(e))
            return
        self._signature, self._users = signature, users
        self._decoy = decoy_for(users)
        self._failed = None
        self._cache.clear()
        # Checks in flight answer their waiters but no new request joins them.
        self._checks.clear()
        self._generation += 1
        self.log.info("reloaded {path}: {count} users", path=self._path, count=len(users))

    def _reload_failed(self, seen: Signature | str, reason: str) -> None:
        if seen == self._failed:
            return
        self._failed = seen
        self.log.warn(
            "{path} changed but can't be used, keeping the previous users: {reason}",
            path=self._path,
            reason=reason,
        )
