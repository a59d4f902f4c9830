"""
Apache htpasswd files: reading them (L{read_file}, L{parse_file}) and checking a password
against each supported hash format (L{PasswordHash}, made by L{parse_hash}).

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
from collections.abc import Hashable, Sequence
from typing import ClassVar

import bcrypt

__all__ = [
    "AuthFileError",
    "PasswordHash",
    "Signature",
    "decode_user_name",
    "decoy_for",
    "parse_file",
    "parse_hash",
    "read_file",
]


class AuthFileError(ValueError):
    """
    A password file could not be used: it is unreadable or has a line in a format aproxy
    does not support. C{str()} of the error is one line naming the file (and the line).
    """


def decode_user_name(raw: bytes) -> str:
    """
    A user name as it came in a credential or a password file: UTF-8 when it is valid
    UTF-8, else Latin-1 (what older clients send), so that every byte string is a name.
    """
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


class PasswordHash:
    """One user's stored hash; subclasses know how to check a password against it."""

    #: Whether checking takes long enough that it must not run on the reactor thread.
    slow: ClassVar[bool] = False

    def verify(self, password: bytes) -> bool:
        """Whether C{password} is the one this hash was made from."""
        raise NotImplementedError

    def kind(self) -> Hashable:
        """What decides the cost of a check: the algorithm and its work factor."""
        return type(self).__name__


class _BcryptHash(PasswordHash):
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


class _MD5CryptHash(PasswordHash):
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


class _SHA1Hash(PasswordHash):
    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha1(password).digest(), self._digest)


class _SHACryptHash(PasswordHash):
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


def parse_hash(stored: bytes) -> PasswordHash | None:
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


def parse_file(path: str, data: bytes) -> dict[str, PasswordHash]:
    """
    Parse htpasswd content: C{user:hash} lines, blank lines and C{#} comments ignored,
    surrounding whitespace stripped (as Apache's mod_authn_file reads it). A user listed
    twice keeps the first entry, as Apache does.

    @raise AuthFileError: Naming C{path} and the line number of the first bad line.
    """
    users: dict[str, PasswordHash] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        raw_user, colon, stored = line.partition(b":")
        if not colon:
            raise AuthFileError(f"{path}:{number}: expected 'user:hash' but found no colon")
        user = decode_user_name(raw_user)
        if not user:
            raise AuthFileError(f"{path}:{number}: empty user name")
        checker = parse_hash(stored)
        if checker is None:
            raise AuthFileError(
                f"{path}:{number}: unsupported password hash for user {user!r}"
                " (use bcrypt, $apr1$, $1$, {SHA}, $5$ or $6$)"
            )
        users.setdefault(user, checker)
    return users


Signature = tuple[int, int]


def read_file(path: str) -> tuple[Signature, dict[str, PasswordHash]]:
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
    return (info.st_mtime_ns, info.st_size), parse_file(path, data)


def decoy_for(users: dict[str, PasswordHash]) -> PasswordHash | None:
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
