"""
Proxy authentication: L{IAuthenticator} and L{HtpasswdAuthenticator}, which checks
C{Proxy-Authorization: Basic} credentials (RFC 7617, RFC 9110 section 11.7.2) against an
Apache htpasswd file.

Supported hashes, as written by Apache's C{htpasswd} and glibc's C{mkpasswd}:

  - bcrypt (C{$2y$}, C{$2b$}, C{$2a$}; C{htpasswd -B}), checked with the C{bcrypt} package;
  - Apache MD5 (C{$apr1$}; C{htpasswd -m}, Apache's default) and the MD5-crypt it is based
    on (C{$1$}; C{mkpasswd -m md5}), the same algorithm with a different magic string;
  - C{{SHA}} (C{htpasswd -s}): base64 of the unsalted SHA-1 of the password;
  - SHA-256 and SHA-512 crypt (C{$5$}, C{$6$}, optionally C{rounds=N$}; C{mkpasswd -m
    sha-256}/C{sha-512}), after Ulrich Drepper's specification
    U{https://www.akkadia.org/drepper/SHA-crypt.txt}.

Plain text, DES crypt and anything else are refused when the file is loaded, so a typo
can't silently lock everyone out or let a plain-text password through.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, cast

import bcrypt
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from aproxy.errors import ServiceUnavailable, TooManyRequests
from aproxy.workpool import FairQueue, WorkRefused, current_client, shared_runner

__all__ = [
    "AuthFileError",
    "HtpasswdAuthenticator",
    "IAuthenticator",
    "basic_challenge",
    "credential_key",
    "parse_basic_credentials",
]


class AuthFileError(ValueError):
    """
    A password file could not be used: it is unreadable or has a line in a format aproxy
    does not support. C{str()} of the error is one line naming the file (and the line).
    """


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
    return _decode_name(user_id), password


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


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# The "base64" alphabet of crypt(3) hashes, least significant six bits first.
_CRYPT64 = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _crypt64(digest: bytes, groups: Sequence[tuple[int, ...]]) -> bytes:
    """
    Encode C{digest} the way MD5-crypt and SHA-crypt do: each group names up to three
    digest bytes, most significant first, whose bits are written six at a time starting
    with the least significant; a group of 3 bytes gives 4 characters, of 2 gives 3, of 1
    gives 2.
    """
    out = bytearray()
    for group in groups:
        value = 0
        for index in group:
            value = (value << 8) | digest[index]
        for _ in range(len(group) + 1):
            out.append(_CRYPT64[value & 0x3F])
            value >>= 6
    return bytes(out)


def _repeat(block: bytes, length: int) -> bytes:
    """C{block} repeated and cut to exactly C{length} bytes."""
    return (block * (length // len(block) + 1))[:length]


# Output byte orders from the MD5-crypt and SHA-crypt reference implementations.
_MD5_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,))
_SHA256_ORDER = (
    *((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14)),
    *((15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29)),
    (31, 30),
)
_SHA512_ORDER = (
    *((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26)),
    *((6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32)),
    *((12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38)),
    *((18, 39, 60), (40, 61, 19), (62, 20, 41)),
    (63,),
)


def _md5_crypt(password: bytes, salt: bytes, magic: bytes) -> bytes:
    """
    The checksum part of Poul-Henning Kamp's MD5-crypt (C{magic} C{b"$1$"}), which Apache's
    C{$apr1$} reuses with its own magic string (Apache's password-format documentation and
    apr_md5_encode()).
    """
    alternate = hashlib.md5(password + salt + password).digest()
    context = hashlib.md5(password + magic + salt)
    context.update(_repeat(alternate, len(password)))
    # For each bit of the length, lowest first: a NUL byte for 1, the first password
    # byte for 0 (a quirk of the original C code that every implementation keeps).
    length = len(password)
    while length:
        context.update(b"\0" if length & 1 else password[:1])
        length >>= 1
    result = context.digest()
    for i in range(1000):
        context = hashlib.md5(password if i & 1 else result)
        if i % 3:
            context.update(salt)
        if i % 7:
            context.update(password)
        context.update(result if i & 1 else password)
        result = context.digest()
    return _crypt64(result, _MD5_ORDER)


def _sha_crypt(password: bytes, salt: bytes, rounds: int, bits: int) -> bytes:
    """
    The checksum part of SHA-256 or SHA-512 crypt, following the numbered steps of
    U{https://www.akkadia.org/drepper/SHA-crypt.txt}.

    @param salt: At most 16 bytes (longer salts are cut there by the spec).
    @param bits: 256 or 512.
    """
    new = hashlib.sha256 if bits == 256 else hashlib.sha512
    salt = salt[:16]
    # Steps 4-8: digest B.
    b = new(password + salt + password).digest()
    # Steps 1-3, 9-12: digest A.
    context = new(password + salt)
    context.update(_repeat(b, len(password)))
    length = len(password)
    while length:
        context.update(b if length & 1 else password)
        length >>= 1
    a = context.digest()
    # Steps 13-16: byte sequence P from DP.
    p = _repeat(new(password * len(password)).digest(), len(password))
    # Steps 17-20: byte sequence S from DS.
    s = _repeat(new(salt * (16 + a[0])).digest(), len(salt))
    # Step 21: the rounds.
    c = a
    for i in range(rounds):
        context = new(p if i & 1 else c)
        if i % 3:
            context.update(s)
        if i % 7:
            context.update(p)
        context.update(c if i & 1 else p)
        c = context.digest()
    return _crypt64(c, _SHA256_ORDER if bits == 256 else _SHA512_ORDER)


class _PasswordHash:
    """One user's stored hash; subclasses know how to check a password against it."""

    #: Whether checking takes long enough that it must not run on the reactor thread.
    slow: ClassVar[bool] = False

    def verify(self, password: bytes) -> bool:
        raise NotImplementedError

    def kind(self) -> Hashable:
        """What decides the cost of a check: the algorithm and its work factor."""
        return type(self).__name__


class _BcryptHash(_PasswordHash):
    slow = True

    def __init__(self, stored: bytes) -> None:
        # Apache writes $2y$; it is the same algorithm as $2b$ (both fixed the bug $2a$
        # had in some implementations), and the bcrypt package reads either.
        self._stored = b"$2b$" + stored[4:] if stored.startswith(b"$2y$") else stored

    def kind(self) -> Hashable:
        """bcrypt and its cost (the log2 of the rounds, in C{$2y$NN$})."""
        return ("bcrypt", self._stored[4:6])

    def verify(self, password: bytes) -> bool:
        # bcrypt only ever uses the first 72 bytes; the package refuses longer input
        # rather than cut it, but htpasswd cut it when the hash was made.
        try:
            return bcrypt.checkpw(password[:72], self._stored)
        except ValueError:
            return False


class _MD5CryptHash(_PasswordHash):
    # 1,000 MD5 rounds in Python: about a millisecond, too long for the reactor thread
    # when a client can send thousands of spellings (issue #12, item 5).
    slow = True

    def __init__(self, magic: bytes, salt: bytes, checksum: bytes) -> None:
        self._magic = magic
        self._salt = salt
        self._checksum = checksum

    def verify(self, password: bytes) -> bool:
        computed = _md5_crypt(password, self._salt, self._magic)
        return hmac.compare_digest(computed, self._checksum)


class _SHA1Hash(_PasswordHash):
    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha1(password).digest(), self._digest)


class _SHACryptHash(_PasswordHash):
    slow = True

    def __init__(self, bits: int, rounds: int, salt: bytes, checksum: bytes) -> None:
        self._bits = bits
        self._rounds = rounds
        self._salt = salt
        self._checksum = checksum

    def kind(self) -> Hashable:
        """SHA-256 or SHA-512 crypt and its rounds."""
        return ("sha-crypt", self._bits, self._rounds)

    def verify(self, password: bytes) -> bool:
        computed = _sha_crypt(password, self._salt, self._rounds, self._bits)
        return hmac.compare_digest(computed, self._checksum)


_BCRYPT = re.compile(rb"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MD5_CRYPT = re.compile(rb"(\$apr1\$|\$1\$)([^$]{0,8})\$([./0-9A-Za-z]{22})")
# A salt can't start with "rounds=", or a bad rounds field would be read as part of it.
_SHA_CRYPT = re.compile(
    rb"\$([56])\$(?:rounds=([0-9]{1,10})\$)?(?!rounds=)([^$]{0,16})"
    rb"\$([./0-9A-Za-z]{43}|[./0-9A-Za-z]{86})"
)
# The spec's limits on rounds; a crypt() that honours them never writes others.
_MIN_ROUNDS = 1000
_MAX_ROUNDS = 999_999_999


def _parse_hash(stored: bytes) -> _PasswordHash | None:
    """The checker for a stored hash, or L{None} if its format is not supported."""
    if _BCRYPT.fullmatch(stored):
        return _BcryptHash(stored)
    match = _MD5_CRYPT.fullmatch(stored)
    if match:
        return _MD5CryptHash(match[1], match[2], match[3])
    if stored.startswith(b"{SHA}"):
        try:
            digest = binascii.a2b_base64(stored[5:], strict_mode=True)
        except binascii.Error:
            return None
        return _SHA1Hash(digest) if len(digest) == 20 else None
    match = _SHA_CRYPT.fullmatch(stored)
    if match:
        bits = 256 if match[1] == b"5" else 512
        if len(match[4]) != (43 if bits == 256 else 86):
            return None
        rounds = int(match[2]) if match[2] else 5000
        if not _MIN_ROUNDS <= rounds <= _MAX_ROUNDS:
            return None
        return _SHACryptHash(bits, rounds, match[3], match[4])
    return None


def _parse_file(path: str, data: bytes) -> dict[str, _PasswordHash]:
    """
    Parse htpasswd content: C{user:hash} lines, blank lines and C{#} comments ignored,
    surrounding whitespace stripped (as Apache's mod_authn_file reads it). A user listed
    twice keeps the first entry, as Apache does.

    @raise AuthFileError: Naming C{path} and the line number of the first bad line.
    """
    users: dict[str, _PasswordHash] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        raw_user, colon, stored = line.partition(b":")
        if not colon:
            raise AuthFileError(f"{path}:{number}: expected 'user:hash' but found no colon")
        user = _decode_name(raw_user)
        if not user:
            raise AuthFileError(f"{path}:{number}: empty user name")
        checker = _parse_hash(stored)
        if checker is None:
            raise AuthFileError(
                f"{path}:{number}: unsupported password hash for user {user!r}"
                " (use bcrypt, $apr1$, $1$, {SHA}, $5$ or $6$)"
            )
        users.setdefault(user, checker)
    return users


_Signature = tuple[int, int]


def _read_file(path: str) -> tuple[_Signature, dict[str, _PasswordHash]]:
    """
    Read and parse C{path}, returning its (mtime, size) signature with the users.

    @raise AuthFileError: If it can't be read or has a bad line.
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise AuthFileError(f"{path}: cannot read password file: {e.strerror or e}") from e
    return (info.st_mtime_ns, info.st_size), _parse_file(path, data)


def _decoy_for(users: dict[str, _PasswordHash]) -> _PasswordHash | None:
    """
    The hash an unknown user name is checked against: one of the kind (algorithm and
    work factor) most users of the file have, so that refusing a name the file doesn't
    have costs what a wrong password for a name it has costs.
    """
    if not users:
        return None
    kinds = Counter(checker.kind() for checker in users.values())
    common = kinds.most_common(1)[0][0]
    return next(c for c in users.values() if c.kind() == common)


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
        self._signature, self._users = _read_file(path)
        self._decoy = _decoy_for(self._users)
        self._last_check = clock.seconds()
        # What the last failed reload saw, so each bad version is reported once.
        self._failed: _Signature | str | None = None
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

    def _start(self, check: _Check, key: _Key, checker: _PasswordHash, known: bool) -> None:
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
            signature, users = _read_file(self._path)
        except AuthFileError as e:
            self._reload_failed(signature, str(e))
            return
        self._signature, self._users = signature, users
        self._decoy = _decoy_for(users)
        self._failed = None
        self._cache.clear()
        # Checks in flight answer their waiters but no new request joins them.
        self._checks.clear()
        self._generation += 1
        self.log.info("reloaded {path}: {count} users", path=self._path, count=len(users))

    def _reload_failed(self, seen: _Signature | str, reason: str) -> None:
        if seen == self._failed:
            return
        self._failed = seen
        self.log.warn(
            "{path} changed but can't be used, keeping the previous users: {reason}",
            path=self._path,
            reason=reason,
        )
