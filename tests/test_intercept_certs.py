"""The interception CA, leaf certificates, and reading a ClientHello (sans-IO parts)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import stat
import tempfile

from cryptography import x509
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from aproxy.intercept.ca import CA_CERT, CA_KEY, CAError, load_or_create
from aproxy.intercept.hello import NOT_TLS, Hello, read_hello
from aproxy.intercept.leaves import LEAF_LIFETIME, LeafContexts

NOW = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)


class CATests(SynchronousTestCase):
    """load_or_create: made once, checked every time, refused in one line when unsafe."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.base)
        self.dir = os.path.join(self.base, "ca")

    def test_created_then_loaded(self) -> None:
        """A new directory gets a CA: key mode 0600, a CA certificate, ten years."""
        ca = load_or_create(self.dir, NOW)
        self.assertTrue(ca.created)
        key_mode = stat.S_IMODE(os.stat(os.path.join(self.dir, CA_KEY)).st_mode)
        self.assertEqual(key_mode, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.value.ca)
        self.assertEqual(ca.certificate.not_valid_after_utc.year, 2036)
        self.assertRegex(ca.fingerprint, r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")
        self.assertNotIn(b"PRIVATE", ca.pem)
        again = load_or_create(self.dir)
        self.assertFalse(again.created)
        self.assertEqual(again.fingerprint, ca.fingerprint)

    def test_key_readable_by_others_refused(self) -> None:
        """A key file readable by group or others is one error naming the fix."""
        load_or_create(self.dir, NOW)
        key = os.path.join(self.dir, CA_KEY)
        os.chmod(key, 0o640)
        with self.assertRaisesRegex(CAError, f"chmod 600 {key}"):
            load_or_create(self.dir)

    def test_half_a_ca_refused(self) -> None:
        """Only one of the two files: refused, and the other is not overwritten."""
        load_or_create(self.dir, NOW)
        os.remove(os.path.join(self.dir, CA_KEY))
        with self.assertRaisesRegex(CAError, "has no private key"):
            load_or_create(self.dir)
        self.assertTrue(os.path.exists(os.path.join(self.dir, CA_CERT)))

    def test_certificate_of_another_key_refused(self) -> None:
        """A certificate that does not match the key beside it is refused."""
        load_or_create(self.dir, NOW)
        other = os.path.join(self.base, "other")
        load_or_create(other, NOW)
        shutil.copy(os.path.join(other, CA_CERT), os.path.join(self.dir, CA_CERT))
        with self.assertRaisesRegex(CAError, "does not match its private key"):
            load_or_create(self.dir)

    def test_garbage_refused(self) -> None:
        """Files that are not PEM are one error line, not a traceback."""
        os.makedirs(self.dir)
        for name, mode in ((CA_CERT, 0o644), (CA_KEY, 0o600)):
            path = os.path.join(self.dir, name)
            with open(path, "wb") as f:
                f.write(b"garbage")
            os.chmod(path, mode)
        with self.assertRaisesRegex(CAError, "cannot load the CA"):
            load_or_create(self.dir)


class LeafTests(SynchronousTestCase):
    """LeafContexts: one certificate per name, signed by the CA, renewed, bounded."""

    def setUp(self) -> None:
        base = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, base)
        self.ca = load_or_create(os.path.join(base, "ca"), NOW)
        self.now = NOW
        self.leaves = LeafContexts(self.ca, size=3, now=lambda: self.now)

    def certificate(self, name: str) -> x509.Certificate:
        """The leaf certificate the context for C{name} presents."""
        conn = SSL.Connection(self.leaves.context_for(name), None)
        peer = conn.get_certificate()
        assert peer is not None
        return peer.to_cryptography()

    def test_signed_for_the_name(self) -> None:
        """A leaf names its host (or IP address) and is signed by the CA."""
        cert = self.certificate("www.example.com")
        cert.verify_directly_issued_by(self.ca.certificate)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["www.example.com"])
        self.assertEqual(cert.not_valid_before_utc, NOW - datetime.timedelta(days=1))
        self.assertEqual(cert.not_valid_after_utc, NOW + LEAF_LIFETIME)
        ip = self.certificate("192.0.2.7")
        ip_san = ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            ip_san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.7")]
        )

    def test_one_per_name_random_serials(self) -> None:
        """A name's context is made once; every leaf has its own serial."""
        first = self.leaves.context_for("a.example")
        self.assertIs(self.leaves.context_for("a.example"), first)
        self.assertEqual(self.leaves.minted, 1)
        serials = {self.certificate(n).serial_number for n in ("b.example", "c.example")}
        self.assertEqual(len(serials | {self.certificate("a.example").serial_number}), 3)

    def test_renewed_and_bounded(self) -> None:
        """A context 20 days old is made anew; past C{size} names the oldest goes."""
        first = self.leaves.context_for("a.example")
        self.now = NOW + datetime.timedelta(days=21)
        self.assertIsNot(self.leaves.context_for("a.example"), first)
        for name in ("b.example", "c.example", "d.example"):
            self.leaves.context_for(name)
        minted = self.leaves.minted
        self.leaves.context_for("a.example")
        self.assertEqual(self.leaves.minted, minted + 1)


def client_hello(name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first bytes Python's own TLS client sends."""
    context = ssl.create_default_context()
    if name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class HelloTests(SynchronousTestCase):
    """read_hello on real ClientHellos, partial ones, and other protocols."""

    def test_sni_and_alpn(self) -> None:
        """The server name (lowercased) and the ALPN list, in order."""
        data = client_hello("WWW.Example.COM", ["h2", "http/1.1"])
        self.assertEqual(read_hello(data), Hello("www.example.com", (b"h2", b"http/1.1")))

    def test_no_sni_no_alpn(self) -> None:
        """A client that names no server and offers no protocol."""
        self.assertEqual(read_hello(client_hello(None)), Hello(None, ()))

    def test_needs_more(self) -> None:
        """Every prefix of a ClientHello asks for more bytes."""
        data = client_hello("a.example")
        for cut in (1, 5, 9, len(data) // 2, len(data) - 1):
            self.assertIsNone(read_hello(data[:cut]), cut)

    def test_split_over_records(self) -> None:
        """A ClientHello in two TLS records (allowed) is read whole."""
        data = client_hello("a.example", ["http/1.1"])
        body = data[5:]
        half = len(body) // 2
        records = b""
        for piece in (body[:half], body[half:]):
            records += data[:3] + len(piece).to_bytes(2, "big") + piece
        self.assertEqual(read_hello(records), Hello("a.example", (b"http/1.1",)))

    def test_not_tls(self) -> None:
        """Plain HTTP, SSH banners and malformed records are not TLS."""
        for data in (
            b"GET / HTTP/1.1\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x16\x03\x01\x00\x00",
            b"\x16\x02\x00\x00\x05hello",
            b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        ):
            self.assertEqual(read_hello(data), NOT_TLS, data)
