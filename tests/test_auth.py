"""
Tests for L{aproxy.access.auth} and L{aproxy.access.htpasswd}: htpasswd parsing, every
supported hash format, C{Basic} credential parsing, the cache of verified users and
reloading the file.

The hashes below are fixed strings made when the tests were written, so running them needs
no tools: C{htpasswd} from apache2-utils 2.4 (C{-nbB}, C{-nbm}, C{-nbs}) and C{mkpasswd}
from whois (C{-m sha-256}, C{-m sha-512}, C{-m md5}, C{-m bcrypt}, C{-m bcrypt-a},
C{-R N}), plus the examples in U{https://www.akkadia.org/drepper/SHA-crypt.txt}, each
checked against glibc's crypt(3).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aproxy.access.auth import (
    HtpasswdAuthenticator,
    IAuthenticator,
    basic_challenge,
    parse_basic_credentials,
)
from aproxy.access.htpasswd import AuthFileError
from tests.hashes import (
    APR1,
    APR1_EMPTY,
    BCRYPT_2A,
    BCRYPT_2B,
    BCRYPT_2Y,
    BCRYPT_LONG,
    MD5_CRYPT,
    SHA1,
    SHA256,
    SHA256_ROUNDS,
    SHA512,
    SHA512_ROUNDS,
)
from tests.support import basic

# The SHA-crypt specification's examples: (password, hash). Salts longer than 16
# characters appear cut to 16, and rounds=10 as the minimum 1000, as crypt() writes them.
LONG_TEXT = "a very much longer text to encrypt.  This one even stretches over morethan one line."
SPEC_VECTORS = [
    ("Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "the minimum number is still observed",
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
    (
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEd"
        "FCoEOfaS35inz1",
    ),
    (
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0D"
        "p8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx"
        "1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        LONG_TEXT,
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs6"
        "6x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTf"
        "F4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]


class _Case(SynchronousTestCase):
    """Shared fixtures: a temporary password file, a fake clock, a counting hasher."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "htpasswd")
        self.clock = Clock()
        self.clock.advance(1000)
        self.hash_calls = 0
        self._mtime = 1_000_000_000
        # EventLoggingObserver.createWithCleanup does this, but is annotated for the
        # asynchronous TestCase only, which mypy holds against a SynchronousTestCase.
        self.log_events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.log_events)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events)

    def hash_in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        """Stand-in for deferToThread: runs C{f} at once and counts the calls."""
        self.hash_calls += 1
        return defer.maybeDeferred(f, *args)

    def write(self, text: str | bytes) -> None:
        """Write the password file with a modification time later than the last one."""
        with open(self.path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        # Set the mtime explicitly: two writes within the file system's timestamp
        # granularity would otherwise look unchanged.
        self._mtime += 10
        os.utime(self.path, ns=(self._mtime * 10**9, self._mtime * 10**9))

    def make(self, text: str | bytes, realm: str = "aproxy") -> HtpasswdAuthenticator:
        """Write C{text} as the password file and load it."""
        self.write(text)
        return HtpasswdAuthenticator(
            self.path, realm=realm, clock=self.clock, hash_in_thread=self.hash_in_thread
        )

    def auth(self, authenticator: HtpasswdAuthenticator, credentials: bytes | None) -> Any:
        """The result L{HtpasswdAuthenticator.authenticate} has already fired with."""
        return self.successResultOf(authenticator.authenticate(credentials))

    def assert_hash(self, stored: str, password: str | bytes, user: str = "user") -> None:
        """A file holding C{stored} for C{user} accepts C{password} and nothing else."""
        authenticator = self.make(f"{user}:{stored}\n")
        self.assertEqual(self.auth(authenticator, basic(user, password)), user)
        raw = password.encode("utf-8") if isinstance(password, str) else password
        for wrong in [raw + b"x", raw[:-1], b"", b"wrong", raw.upper()]:
            if wrong != raw:
                self.assertIsNone(self.auth(authenticator, basic(user, wrong)), wrong)
        self.assertIsNone(self.auth(authenticator, basic("nobody", password)))

    def warnings(self) -> list[str]:
        """The text of every warning logged so far."""
        return [formatEvent(e) for e in self.log_events if e["log_level"] == LogLevel.warn]


class FormatTests(_Case):
    """Each supported hash format accepts its password and rejects others."""

    def test_bcrypt_2y(self) -> None:
        """Apache's bcrypt (C{htpasswd -B}, C{$2y$}) is accepted."""
        self.assert_hash(BCRYPT_2Y, "alice-secret")

    def test_bcrypt_2b(self) -> None:
        """bcrypt with the C{$2b$} prefix is accepted."""
        self.assert_hash(BCRYPT_2B, "niaj-secret")

    def test_bcrypt_2a(self) -> None:
        """bcrypt with the older C{$2a$} prefix is accepted."""
        self.assert_hash(BCRYPT_2A, "mallory-secret")

    def test_bcrypt_uses_first_72_bytes(self) -> None:
        """As when htpasswd made the hash, bcrypt sees only the first 72 password bytes."""
        authenticator = self.make(f"user:{BCRYPT_LONG}\n")
        for accepted in ["p" * 80, "p" * 72, "p" * 72 + "anything"]:
            self.assertEqual(self.auth(authenticator, basic("user", accepted)), "user")
        for refused in ["p" * 71, "p" * 71 + "q", "q" + "p" * 79]:
            self.assertIsNone(self.auth(authenticator, basic("user", refused)))

    def test_apr1(self) -> None:
        """Apache MD5 (C{htpasswd -m}) works, over the UTF-8 bytes of the password."""
        self.assert_hash(APR1, "carol pässword")
        authenticator = self.make(f"carol:{APR1}\n")
        latin1 = basic(b"carol", "carol pässword".encode("latin-1"))
        self.assertIsNone(self.auth(authenticator, latin1))

    def test_apr1_empty_password(self) -> None:
        """An empty password hashed with apr1 is accepted, and only it."""
        authenticator = self.make(f"empty:{APR1_EMPTY}\n")
        self.assertEqual(self.auth(authenticator, basic("empty", "")), "empty")
        self.assertIsNone(self.auth(authenticator, basic("empty", "x")))

    def test_md5_crypt(self) -> None:
        """MD5-crypt (C{$1$}), apr1's algorithm with its own magic, is accepted."""
        self.assert_hash(MD5_CRYPT, "judy-secret")

    def test_apr1_and_md5_crypt_magic_differs(self) -> None:
        """The magic string is part of the hash: an apr1 checksum relabelled C{$1$} fails."""
        authenticator = self.make("judy:" + MD5_CRYPT.replace("$1$", "$apr1$") + "\n")
        self.assertIsNone(self.auth(authenticator, basic("judy", "judy-secret")))

    def test_sha1(self) -> None:
        """C{{SHA}} (C{htpasswd -s}) is accepted."""
        self.assert_hash(SHA1, "erin-secret")

    def test_sha256_crypt(self) -> None:
        """SHA-256 crypt from C{mkpasswd -m sha-256} is accepted."""
        self.assert_hash(SHA256, "frank-secret")

    def test_sha256_crypt_rounds(self) -> None:
        """SHA-256 crypt with an explicit C{rounds=} is accepted."""
        self.assert_hash(SHA256_ROUNDS, "ivan-secret")

    def test_sha512_crypt(self) -> None:
        """SHA-512 crypt from C{mkpasswd -m sha-512} is accepted."""
        self.assert_hash(SHA512, "grace-secret")

    def test_sha512_crypt_rounds(self) -> None:
        """SHA-512 crypt with an explicit C{rounds=} is accepted."""
        self.assert_hash(SHA512_ROUNDS, "heidi-secret")

    def test_sha_crypt_spec_vectors(self) -> None:
        """Every example of the SHA-crypt specification verifies."""
        lines = "".join(f"u{i}:{stored}\n" for i, (_, stored) in enumerate(SPEC_VECTORS))
        authenticator = self.make(lines)
        for i, (password, stored) in enumerate(SPEC_VECTORS):
            self.assertEqual(self.auth(authenticator, basic(f"u{i}", password)), f"u{i}", stored)
            self.assertIsNone(self.auth(authenticator, basic(f"u{i}", password + "!")), stored)

    def test_rounds_change_the_hash(self) -> None:
        """The rounds field is used: the same checksum under other rounds fails."""
        stored = SPEC_VECTORS[1][1].replace("rounds=10000", "rounds=10001")
        authenticator = self.make(f"user:{stored}\n")
        self.assertIsNone(self.auth(authenticator, basic("user", "Hello world!")))

    def test_slow_hashes_run_in_thread(self) -> None:
        """
        bcrypt, SHA-crypt and apr1 go through C{hash_in_thread}; only the single SHA-1 of
        C{{SHA}} runs on the reactor thread (apr1's 1,000 MD5 rounds in Python stalled
        other clients when sent in many spellings: issue #12, item 5).
        """
        authenticator = self.make(
            f"b:{BCRYPT_2Y}\ns:{SHA256}\nm:{APR1}\nh:{SHA1}\n",
        )
        self.auth(authenticator, basic("h", "erin-secret"))
        self.assertEqual(self.hash_calls, 0)
        self.auth(authenticator, basic("m", "carol pässword"))
        self.assertEqual(self.hash_calls, 1)
        self.auth(authenticator, basic("b", "alice-secret"))
        self.auth(authenticator, basic("s", "frank-secret"))
        self.assertEqual(self.hash_calls, 3)

    def test_unknown_user_costs_a_hash(self) -> None:
        """
        An unknown user is refused after the same slow hash a wrong password costs, so
        timing doesn't reveal which names exist; with only fast hashes there is none.
        """
        authenticator = self.make(f"b:{BCRYPT_2Y}\n")
        self.assertIsNone(self.auth(authenticator, basic("nobody", "alice-secret")))
        self.assertEqual(self.hash_calls, 1)
        fast = self.make(f"h:{SHA1}\n")
        calls = self.hash_calls
        self.assertIsNone(self.auth(fast, basic("nobody", "x")))
        self.assertEqual(self.hash_calls, calls)


class CredentialsTests(_Case):
    """C{Proxy-Authorization} values are parsed strictly; bad ones yield None."""

    def setUp(self) -> None:
        super().setUp()
        self.authenticator = self.make(f"erin:{SHA1}\nj\u00fcrgen:{SHA1}\nmal:{SHA1}\n")

    def test_valid(self) -> None:
        """Well-formed credentials give the user name."""
        self.assertEqual(self.auth(self.authenticator, basic("erin", "erin-secret")), "erin")

    def test_scheme_case_insensitive(self) -> None:
        """The scheme name is case-insensitive (RFC 9110 section 11.1)."""
        for scheme in [b"basic", b"BASIC", b"bAsIc"]:
            credentials = basic("erin", "erin-secret", scheme=scheme)
            self.assertEqual(self.auth(self.authenticator, credentials), "erin")

    def test_extra_spaces(self) -> None:
        """Several spaces after the scheme and surrounding whitespace are tolerated."""
        token = basic("erin", "erin-secret").split(b" ")[1]
        for value in [b"Basic   " + token, b" Basic " + token + b" \t"]:
            self.assertEqual(self.auth(self.authenticator, value), "erin")

    def test_utf8_user_name(self) -> None:
        """User names are decoded as UTF-8, matching a UTF-8 file."""
        self.assertEqual(
            self.auth(self.authenticator, basic("j\u00fcrgen", "erin-secret")), "j\u00fcrgen"
        )

    def test_latin1_user_name_fallback(self) -> None:
        """A user-id that isn't UTF-8 is read as ISO-8859-1."""
        credentials = basic("j\u00fcrgen".encode("latin-1"), "erin-secret")
        self.assertEqual(self.auth(self.authenticator, credentials), "j\u00fcrgen")

    def test_password_may_contain_colons(self) -> None:
        """The user-id ends at the first colon; the password may hold more."""
        self.assertEqual(parse_basic_credentials(basic("erin", "a:b:c")), ("erin", b"a:b:c"))

    def test_malformed(self) -> None:
        """Absent or malformed credentials give None, never an error."""
        good = basic("erin", "erin-secret")
        token = good.split(b" ")[1]
        bad = [
            None,
            b"",
            b" ",
            b"Basic",
            b"Basic ",
            b"Basic    ",
            b"Basic" + token,
            b"Bearer " + token,
            b"Digest " + token,
            b"Basic\t" + token,
            b"Basic " + token[:-1],
            b"Basic " + token.rstrip(b"="),
            b"Basic " + token + b"=",
            b"Basic " + token + b"YQ==",
            b"Basic " + token[:4] + b" " + token[4:],
            b"Basic " + token.replace(b"Z", b"-"),
            b"Basic " + token + b"\x00",
            b"Basic \xff\xfe",
            b"Basic !!!!",
            b"Basic " + base64.b64encode(b"erin"),
            b"Basic " + base64.b64encode(b""),
            b"Basic " + base64.b64encode(b":erin-secret"),
            b"Basic " + base64.b64encode(b"erin:"),
            basic("erin", "wrong"),
            basic("nobody", "erin-secret"),
            basic("erin ", "erin-secret"),
        ]
        for value in bad:
            self.assertIsNone(self.auth(self.authenticator, value), value)

    def test_parse_basic_credentials(self) -> None:
        """The parser returns the user name and the raw password bytes."""
        self.assertEqual(
            parse_basic_credentials(basic("j\u00fcrgen", "p\u00e4ss")),
            ("j\u00fcrgen", "p\u00e4ss".encode()),
        )
        self.assertIsNone(parse_basic_credentials(b"Basic Zm9v"))
        self.assertIsNone(parse_basic_credentials(None))


class FileTests(_Case):
    """Loading the file: what is accepted and how problems are reported."""

    def assert_rejected(self, text: str, line: int, *fragments: str) -> None:
        """Loading C{text} fails with one line naming the file, C{line} and C{fragments}."""
        error = self.assertRaises(AuthFileError, self.make, text)
        message = str(error)
        self.assertIsInstance(error, ValueError)
        self.assertTrue(message.startswith(f"{self.path}:{line}: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_provides_interface(self) -> None:
        """L{HtpasswdAuthenticator} provides L{IAuthenticator}."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.assertTrue(verifyObject(IAuthenticator, authenticator))
        self.assertEqual(authenticator.realm, "aproxy")
        self.assertEqual(authenticator.path, self.path)

    def test_comments_blank_lines_whitespace(self) -> None:
        """Comments, blank lines, CRLF endings and surrounding spaces are ignored."""
        authenticator = self.make(
            f"# users\r\n\r\n   \n  erin:{SHA1}  \r\n\t# carol:{APR1}\n{'#' * 3}\n"
        )
        self.assertEqual(self.auth(authenticator, basic("erin", "erin-secret")), "erin")
        self.assertIsNone(self.auth(authenticator, basic("carol", "carol pässword")))

    def test_empty_file(self) -> None:
        """A file without users loads and refuses everyone."""
        authenticator = self.make("# nobody yet\n")
        self.assertIsNone(self.auth(authenticator, basic("erin", "erin-secret")))

    def test_first_entry_wins(self) -> None:
        """A user listed twice keeps the first entry, as Apache does."""
        authenticator = self.make(f"erin:{SHA1}\nerin:{APR1}\n")
        self.assertEqual(self.auth(authenticator, basic("erin", "erin-secret")), "erin")
        self.assertIsNone(self.auth(authenticator, basic("erin", "carol pässword")))

    def test_plain_text_rejected(self) -> None:
        """A plain-text password (C{htpasswd -p}) is refused, naming file, line and user."""
        self.assert_rejected(
            f"erin:{SHA1}\npeggy:peggy\n", 2, "unsupported password hash", "'peggy'"
        )

    def test_des_crypt_rejected(self) -> None:
        """DES crypt (C{htpasswd -d}) is refused."""
        self.assert_rejected("# c\noscar:lvxHmNtHoz/b2\n", 2, "'oscar'")

    def test_other_formats_rejected(self) -> None:
        """Unknown and damaged hashes of every family are refused."""
        for stored in [
            "$y$j9T$JnuoexGZftEWNP1sJtyYl.$CaqImWkpk/WdsFZ4rHj1fNRfmxQ8sycy2x6Ty1cLFe0",
            BCRYPT_2Y[:-1],
            BCRYPT_2Y.replace("$05$", "$03$"),
            BCRYPT_2Y.replace("$2y$", "$2x$"),
            APR1[:-1],
            APR1.replace("8oyZKRYX", "8oyZKRYXa"),
            MD5_CRYPT + "x",
            SHA1[:-1],
            SHA1.replace("=", "A"),
            "{SHA}" + base64.b64encode(b"x" * 19).decode(),
            "{SSHA}ItvNMFPtjBMaa6UFiWT3tF4qy1Y=",
            SHA256[:-1],
            SHA512 + "x",
            SHA256.replace("$5$", "$6$"),
            SHA256_ROUNDS.replace("rounds=1000", "rounds=999"),
            SHA256_ROUNDS.replace("rounds=1000", "rounds=0"),
            SHA256_ROUNDS.replace("rounds=1000", "rounds=1000000000"),
            SHA256_ROUNDS.replace("rounds=1000", "rounds=x"),
            SHA256.replace("/v3pT.gY7MhhiRhG", "/v3pT.gY7MhhiRhGx"),
            "",
        ]:
            self.assert_rejected(f"user:{stored}\n", 1, "'user'")

    def test_no_colon(self) -> None:
        """A line without a colon is refused with the file and line number."""
        self.assert_rejected(f"erin:{SHA1}\n\n# x\njustaname\n", 4, "colon")

    def test_empty_user(self) -> None:
        """A line with an empty user name is refused."""
        self.assert_rejected(f":{SHA1}\n", 1, "empty user name")

    def test_missing_file(self) -> None:
        """An unreadable file is refused in one line naming it."""
        path = os.path.join(self.dir, "missing")
        error = self.assertRaises(AuthFileError, HtpasswdAuthenticator, path, clock=self.clock)
        self.assertTrue(str(error).startswith(f"{path}: "), str(error))
        self.assertNotIn("\n", str(error))

    def test_non_utf8_user_in_file(self) -> None:
        """User names in the file that aren't UTF-8 are read as ISO-8859-1."""
        authenticator = self.make(b"j\xfcrgen:" + SHA1.encode() + b"\n")
        credentials = basic("j\u00fcrgen".encode("latin-1"), "erin-secret")
        self.assertEqual(self.auth(authenticator, credentials), "j\u00fcrgen")


class ChallengeTests(_Case):
    """The C{Proxy-Authenticate} value."""

    def test_default(self) -> None:
        """The challenge names the realm and asks for UTF-8 (RFC 7617 section 2.1)."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.assertEqual(authenticator.challenge(), b'Basic realm="aproxy", charset="UTF-8"')

    def test_quoting(self) -> None:
        """Quotes and backslashes in the realm are escaped; other text is UTF-8."""
        authenticator = self.make(f"erin:{SHA1}\n", realm='my "b\\g" pr\u00f6xy')
        self.assertEqual(
            authenticator.challenge(),
            b'Basic realm="my \\"b\\\\g\\" pr\xc3\xb6xy", charset="UTF-8"',
        )
        self.assertEqual(basic_challenge("x"), b'Basic realm="x", charset="UTF-8"')

    def test_control_characters_refused(self) -> None:
        """A realm that could split the header is refused up front."""
        self.write(f"erin:{SHA1}\n")
        for realm in ["a\r\nX-Evil: 1", "a\nb", "a\x00", "a\x7f"]:
            self.assertRaises(ValueError, basic_challenge, realm)
            self.assertRaises(
                ValueError, HtpasswdAuthenticator, self.path, realm=realm, clock=self.clock
            )


class CacheTests(_Case):
    """Verified credentials are remembered so slow hashes don't run per request."""

    def test_second_request_cached(self) -> None:
        """Valid credentials seen before are answered without hashing again."""
        authenticator = self.make(f"alice:{BCRYPT_2Y}\n")
        credentials = basic("alice", "alice-secret")
        self.assertEqual(self.auth(authenticator, credentials), "alice")
        self.assertEqual(self.auth(authenticator, credentials), "alice")
        self.assertEqual(self.hash_calls, 1)

    def test_cached_hit_already_fired(self) -> None:
        """A cached answer comes as an already-fired Deferred, never via the thread."""
        pending: list[Deferred[Any]] = []

        def slow(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            d.addCallback(lambda _: f(*args))
            return d

        self.write(f"alice:{BCRYPT_2Y}\n")
        authenticator = HtpasswdAuthenticator(self.path, clock=self.clock, hash_in_thread=slow)
        credentials = basic("alice", "alice-secret")
        first = authenticator.authenticate(credentials)
        self.assertNoResult(first)
        pending[0].callback(None)
        self.assertEqual(self.successResultOf(first), "alice")
        self.assertEqual(self.successResultOf(authenticator.authenticate(credentials)), "alice")
        self.assertEqual(len(pending), 1)

    def test_wrong_password_not_cached(self) -> None:
        """Failures aren't remembered, and a wrong password never hits the cache."""
        authenticator = self.make(f"alice:{BCRYPT_2Y}\n")
        self.assertEqual(self.auth(authenticator, basic("alice", "alice-secret")), "alice")
        self.assertIsNone(self.auth(authenticator, basic("alice", "nope")))
        self.assertIsNone(self.auth(authenticator, basic("alice", "nope")))
        self.assertEqual(self.hash_calls, 3)

    def test_cache_key_is_decoded(self) -> None:
        """
        The cache is keyed on the decoded user and password: the same credential written
        as C{basic}, C{BASIC} or with extra spaces is a hit, not another bcrypt run (raw
        header bytes as the key let a client re-run the hash at will: issue #12, item 5).
        """
        authenticator = self.make(f"alice:{BCRYPT_2Y}\n")
        self.auth(authenticator, basic("alice", "alice-secret"))
        self.assertEqual(self.hash_calls, 1)
        for spelling in (
            basic("alice", "alice-secret", scheme=b"basic"),
            basic("alice", "alice-secret", scheme=b"BASIC"),
            b"  " + basic("alice", "alice-secret", scheme=b"Basic  ") + b" \t",
        ):
            self.assertEqual(self.auth(authenticator, spelling), "alice")
        self.assertEqual(self.hash_calls, 1)

    def test_cache_bounded(self) -> None:
        """The cache holds at most C{cache_size} entries, forgetting the oldest first."""

        class Small(HtpasswdAuthenticator):
            cache_size = 2

        self.write(f"alice:{BCRYPT_2Y}\nniaj:{BCRYPT_2B}\nmallory:{BCRYPT_2A}\n")
        authenticator = Small(self.path, clock=self.clock, hash_in_thread=self.hash_in_thread)
        alice = basic("alice", "alice-secret")
        self.auth(authenticator, alice)
        self.auth(authenticator, basic("niaj", "niaj-secret"))
        self.auth(authenticator, basic("mallory", "mallory-secret"))
        self.assertEqual(self.hash_calls, 3)
        self.auth(authenticator, basic("mallory", "mallory-secret"))
        self.assertEqual(self.hash_calls, 3)
        self.assertEqual(self.auth(authenticator, alice), "alice")
        self.assertEqual(self.hash_calls, 4)

    def test_reload_clears_cache(self) -> None:
        """After the file changes, credentials are verified against the new version."""
        authenticator = self.make(f"alice:{BCRYPT_2Y}\n")
        credentials = basic("alice", "alice-secret")
        self.auth(authenticator, credentials)
        self.write(f"alice:{BCRYPT_2B}\n")
        self.clock.advance(1)
        self.assertIsNone(self.auth(authenticator, credentials))
        self.assertEqual(self.hash_calls, 2)

    def test_check_across_reload_not_cached(self) -> None:
        """A check that started before a reload answers but doesn't fill the new cache."""
        pending: list[Deferred[Any]] = []

        def slow(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            d.addCallback(lambda _: f(*args))
            return d

        self.write(f"alice:{BCRYPT_2Y}\n")
        authenticator = HtpasswdAuthenticator(self.path, clock=self.clock, hash_in_thread=slow)
        credentials = basic("alice", "alice-secret")
        first = authenticator.authenticate(credentials)
        self.write(f"alice:{SHA256}\n")
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(authenticator.authenticate(b"Basic x")))
        pending[0].callback(None)
        self.assertEqual(self.successResultOf(first), "alice")
        self.assertNoResult(authenticator.authenticate(credentials))
        self.assertEqual(len(pending), 2)

    def test_hashing_failure_logged(self) -> None:
        """If the thread fails, the request is refused and the failure logged."""

        def broken(f: Any, *args: Any) -> Deferred[Any]:
            return defer.fail(RuntimeError("thread pool gone"))

        self.write(f"alice:{BCRYPT_2Y}\n")
        authenticator = HtpasswdAuthenticator(self.path, clock=self.clock, hash_in_thread=broken)
        self.assertIsNone(self.auth(authenticator, basic("alice", "alice-secret")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReloadTests(_Case):
    """The file is re-read when it changes, at most once a second."""

    def test_change_after_one_second(self) -> None:
        """A changed file is used once a second has passed since the last look."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.write(f"carol:{APR1}\n")
        self.clock.advance(0.5)
        self.assertEqual(self.auth(authenticator, basic("erin", "erin-secret")), "erin")
        self.assertIsNone(self.auth(authenticator, basic("carol", "carol pässword")))
        self.clock.advance(0.5)
        self.assertIsNone(self.auth(authenticator, basic("erin", "erin-secret")))
        self.assertEqual(self.auth(authenticator, basic("carol", "carol pässword")), "carol")

    def test_look_at_most_once_a_second(self) -> None:
        """A change right after a look waits for the next second."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.clock.advance(1)
        self.auth(authenticator, None)
        self.write(f"carol:{APR1}\n")
        self.clock.advance(0.9)
        self.assertIsNone(self.auth(authenticator, basic("carol", "carol pässword")))
        self.clock.advance(0.1)
        self.assertEqual(self.auth(authenticator, basic("carol", "carol pässword")), "carol")

    def test_same_size_change(self) -> None:
        """A change that keeps the size is seen through the modification time."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.write(f"nire:{SHA1}\n")
        self.clock.advance(1)
        self.assertIsNone(self.auth(authenticator, basic("erin", "erin-secret")))
        self.assertEqual(self.auth(authenticator, basic("nire", "erin-secret")), "nire")

    def test_bad_rewrite_keeps_old_users(self) -> None:
        """A broken file is logged once and ignored; fixing it takes effect."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.write(f"erin:{SHA1}\npeggy:peggy\n")
        for _ in range(3):
            self.clock.advance(1)
            self.assertEqual(self.auth(authenticator, basic("erin", "erin-secret")), "erin")
        [warning] = self.warnings()
        self.assertIn(f"{self.path}:2: unsupported password hash for user 'peggy'", warning)
        self.assertIn("keeping the previous users", warning)

        self.write(f"erin:{SHA1}\npeggy:peg\n")
        self.clock.advance(1)
        self.auth(authenticator, None)
        self.assertEqual(len(self.warnings()), 2)

        self.write(f"carol:{APR1}\n")
        self.clock.advance(1)
        self.assertIsNone(self.auth(authenticator, basic("erin", "erin-secret")))
        self.assertEqual(self.auth(authenticator, basic("carol", "carol pässword")), "carol")
        self.assertEqual(len(self.warnings()), 2)

    def test_deleted_file_keeps_old_users(self) -> None:
        """A deleted file is logged once and the old users stay; a new file is used."""
        authenticator = self.make(f"erin:{SHA1}\n")
        os.remove(self.path)
        for _ in range(3):
            self.clock.advance(1)
            self.assertEqual(self.auth(authenticator, basic("erin", "erin-secret")), "erin")
        [warning] = self.warnings()
        self.assertIn(self.path, warning)

        self.write(f"carol:{APR1}\n")
        self.clock.advance(1)
        self.assertEqual(self.auth(authenticator, basic("carol", "carol pässword")), "carol")
        self.assertIsNone(self.auth(authenticator, basic("erin", "erin-secret")))

    def test_reload_logged(self) -> None:
        """A successful reload is logged at info level with the user count."""
        authenticator = self.make(f"erin:{SHA1}\n")
        self.clock.advance(1)
        self.auth(authenticator, None)
        self.assertEqual(len(self.log_events), 0)
        self.write(f"erin:{SHA1}\ncarol:{APR1}\n")
        self.clock.advance(1)
        self.auth(authenticator, None)
        [event] = self.log_events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(formatEvent(event), f"reloaded {self.path}: 2 users")
