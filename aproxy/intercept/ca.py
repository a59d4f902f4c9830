"""
The certificate authority that signs intercepted hosts' certificates: C{ca.pem} (the
certificate users install) and C{ca-key.pem} (its private key, mode 0600) in one
directory, made at the first start that needs them and checked at every start.

It is made with the C{cryptography} package (already installed with pyOpenSSL): ECDSA
P-256, valid ten years, a CA for server certificates only (C{pathlen:0}, key usage
certificate signing). No other copy of the key is written and no endpoint serves it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CAError",
    "CertificateAuthority",
    "default_ca_dir",
    "load_or_create",
]

CA_CERT = "ca.pem"
"""The CA certificate's file name in the CA directory (this one is for users)."""

CA_KEY = "ca-key.pem"
"""The CA private key's file name in the CA directory (mode 0600, never served)."""

_VALIDITY = datetime.timedelta(days=3650)


class CAError(Exception):
    """The CA directory can't be used: the message says why in one line, for the user."""


class CertificateAuthority:
    """
    A loaded CA: what signs leaf certificates, and what users are told about it.

    @ivar certificate: The CA certificate.
    @ivar key: Its private key.
    @ivar pem: The certificate in PEM form (what C{/ca.pem} serves).
    @ivar fingerprint: Its SHA-256 fingerprint, as colon-separated hex (as browsers show).
    @ivar path: The certificate file's path.
    @ivar created: Whether it was made by this start.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | object,
        path: str,
        created: bool,
    ) -> None:
        self.certificate = certificate
        self.key = key
        self.path = path
        self.created = created
        self.pem = certificate.public_bytes(serialization.Encoding.PEM)
        digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
        self.fingerprint = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()


def default_ca_dir() -> str:
    """C{~/.local/share/aproxy} (C{$XDG_DATA_HOME/aproxy} when that is set)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "aproxy")


def load_or_create(directory: str, now: datetime.datetime | None = None) -> CertificateAuthority:
    """
    Load the CA in C{directory}, or make one there if it holds neither file.

    @param now: The time to date a new CA from (tests pass one).
    @raise CAError: If only one of the two files exists, the key file is readable by group
        or others, a file can't be read or parsed, the certificate is not a CA's, or it
        does not match the key.
    """
    cert_path = os.path.join(directory, CA_CERT)
    key_path = os.path.join(directory, CA_KEY)
    have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
    if not have_cert and not have_key:
        return _create(directory, cert_path, key_path, now)
    if not have_key:
        raise CAError(f"{cert_path} has no private key beside it ({key_path})")
    if not have_cert:
        raise CAError(f"{key_path} has no certificate beside it ({cert_path})")
    try:
        mode = os.stat(key_path).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise CAError(
                f"{key_path} is readable by group or others (mode {stat.S_IMODE(mode):o}): "
                f"chmod 600 {key_path}"
            )
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
    except OSError as e:
        raise CAError(f"cannot read the CA in {directory}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:
        raise CAError(f"cannot load the CA in {directory}: {e}") from None
    _check(certificate, key, cert_path)
    return CertificateAuthority(certificate, key, cert_path, False)


def _check(certificate: x509.Certificate, key: object, cert_path: str) -> None:
    """Refuse a certificate that is not a CA's or that another key belongs to."""
    public = getattr(key, "public_key", None)
    if public is None:
        raise CAError(f"the key beside {cert_path} is not a private key")
    wanted = public().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    have = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if wanted != have:
        raise CAError(f"{cert_path} does not match its private key ({CA_KEY})")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise CAError(f"{cert_path} is not a CA certificate (no basic constraints)") from None
    if not constraints.value.ca:
        raise CAError(f"{cert_path} is not a CA certificate")


def _create(
    directory: str, cert_path: str, key_path: str, now: datetime.datetime | None
) -> CertificateAuthority:
    """Make a new CA in C{directory}: the key first (mode 0600, never overwritten)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aproxy"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"aproxy interception CA ({socket.gethostname()[:30]}, {now:%Y-%m-%d})",
            ),
        ]
    )
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise CAError(f"cannot create the CA in {directory}: {e.strerror or e}") from None
    return CertificateAuthority(certificate, key, cert_path, True)
