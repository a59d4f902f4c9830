"""
Leaf certificates for intercepted hosts, signed by the CA, and the TLS server contexts
that present them.

One ECDSA P-256 key serves every leaf of the process (made at start, never written):
signing a leaf is then one ECDSA signature, a fraction of a millisecond. Each leaf has a
random serial (so no two certificates share issuer and serial, which Firefox refuses), is
backdated a day for clocks that lag, and lives 30 days, well under the 398 days browsers
accept; a context older than 20 days is made anew. Contexts are kept in a bounded LRU per
process. Minting runs in the reactor thread, between two events, so concurrent first
connections to one host find the context the first one made: one certificate per host.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from aproxy.intercept.ca import CertificateAuthority

__all__ = ["LEAF_LIFETIME", "LeafContexts", "leaf_certificate"]

LEAF_LIFETIME = datetime.timedelta(days=30)
"""How long a leaf certificate is valid (after a day of backdating)."""

_RENEW_AFTER = datetime.timedelta(days=20)
_BACKDATE = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def leaf_certificate(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """
    A server certificate for C{name} (a host name, or an IP address as an IP SAN),
    for C{key}, signed by C{ca}.
    """
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    ca_public = ca.certificate.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + LEAF_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )


def _choose_http11(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """ALPN: C{http/1.1} when offered (the only protocol spoken inside)."""
    if b"http/1.1" in offered:
        return b"http/1.1"
    return SSL.NO_OVERLAPPING_PROTOCOLS


class LeafContexts:
    """
    TLS server contexts presenting a leaf certificate per host name, made on first use.

    @param ca: The CA that signs the leaves.
    @param size: How many contexts to keep (least recently used go first).
    @param now: The clock for validity dates (tests pass one).
    @ivar minted: How many leaves this process made.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        size: int = 1024,
        now: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.ca = ca
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.size = size
        self.minted = 0
        self._now = now
        self._contexts: OrderedDict[str, tuple[SSL.Context, datetime.datetime]] = OrderedDict()

    def context_for(self, name: str) -> SSL.Context:
        """The server context for C{name} (lowercase host name or IP address)."""
        now = self._now()
        found = self._contexts.get(name)
        if found is not None and now - found[1] < _RENEW_AFTER:
            self._contexts.move_to_end(name)
            return found[0]
        certificate = leaf_certificate(self.ca, self.key, name, now)
        self.minted += 1
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(certificate)
        context.use_privatekey(self.key)
        context.add_extra_chain_cert(self.ca.certificate)
        context.set_alpn_select_callback(_choose_http11)
        self._contexts[name] = (context, now)
        self._contexts.move_to_end(name)
        while len(self._contexts) > self.size:
            self._contexts.popitem(last=False)
        return context
