"""
TLS towards origins and parent proxies: which certificates are trusted, how each connection
is verified (chain and host name), and what a failure tells the client.

Verification is Twisted's L{CertificateOptions} context (the system trust store, plus the
certificates of C{--ca-file}) with a per-connection verify callback that checks the host
name with service-identity, as L{twisted.internet.ssl.optionsForClientTLS} does. It is
written out here, rather than taken from C{optionsForClientTLS}, for one reason: to tell
the client I{why} a certificate was refused (expired, unknown issuer, another host's
name) instead of OpenSSL's bare "certificate verify failed".
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion, platformTrust
from twisted.python.failure import Failure
from zope.interface import implementer

from aproxy.errors import BadGateway, ProxyError

__all__ = ["ClientTLS", "VerifyNote", "tls_failure"]

# OpenSSL's X509_V_ERR_* codes that a client can act on, in words (the numbers are
# OpenSSL's stable public constants, see x509_vfy.h).
_VERIFY_ERRORS = {
    2: "unknown issuer (the issuer's certificate is not available)",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "self-signed certificate",
    19: "unknown issuer (self-signed certificate in the chain)",
    20: "unknown issuer (not a trusted certificate authority)",
    21: "unknown issuer (cannot verify the first certificate)",
    23: "the certificate has been revoked",
    26: "the certificate is not meant for TLS servers",
}


class VerifyNote:
    """What went wrong while verifying one connection's certificate, if anything."""

    __slots__ = ("why",)

    def __init__(self) -> None:
        self.why: str | None = None


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    """Makes the OpenSSL connection for one TLS client connection."""

    def __init__(self, context: SSL.Context, host: str, note: VerifyNote, verify: bool) -> None:
        self._context = context
        self._host = host
        self._note = note
        self._verify = verify

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection with SNI (for names) and, unless insecure, our verify callback."""
        conn = SSL.Connection(self._context, None)
        conn.set_app_data(tlsProtocol)
        host = self._host
        service: ServiceID
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = host.encode("idna")
            conn.set_tlsext_host_name(name)
            service = DNS_ID(name.decode("ascii"))
        else:
            service = IPAddress_ID(str(address))
        if self._verify:
            conn.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                _verifier(self._note, service, host),
            )
        return conn


def _verifier(note: VerifyNote, service: ServiceID, host: str) -> Any:
    def verify(conn: SSL.Connection, cert: X509, err: int, depth: int, ok: int) -> bool:
        if not ok:
            if note.why is None:
                note.why = _VERIFY_ERRORS.get(err, f"certificate verification error {err}")
            return False
        if depth == 0:
            try:
                verify_service_identity(extract_patterns(cert), [service], [])
            except VerificationError:
                note.why = f"the certificate is not valid for {host}"
                return False
        return True

    return verify


class ClientTLS:
    """
    The proxy's TLS client settings: one verifying context (system trust store plus
    C{ca_file}) shared by every connection, and the hosts verification is skipped for.

    @raise ValueError: At construction, if C{ca_file} can't be read or holds no
        certificate (one line, for the command line).
    """

    def __init__(self, ca_file: str | None = None, insecure_hosts: tuple[str, ...] = ()) -> None:
        if ca_file is not None:
            try:
                # The standard library's loader gives a clear error for a missing file,
                # a bad PEM or one without any certificate.
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"--ca-file {ca_file}: {e}") from None
        self.ca_file = ca_file
        self.insecure_hosts = frozenset(h.lower().rstrip(".").strip("[]") for h in insecure_hosts)
        # Built on first use: most proxies never make a TLS connection themselves.
        self._verifying: SSL.Context | None = None
        self._insecure: SSL.Context | None = None

    def creator(self, host: str, note: VerifyNote) -> IOpenSSLClientConnectionCreator:
        """The connection creator for a TLS connection to C{host}, noting failures."""
        if host.lower() in self.insecure_hosts:
            if self._insecure is None:
                self._insecure = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2).getContext()
            return _Creator(self._insecure, host, note, False)
        if self._verifying is None:
            verifying = CertificateOptions(
                trustRoot=platformTrust(), raiseMinimumTo=TLSVersion.TLSv1_2
            ).getContext()
            if self.ca_file is not None:
                verifying.load_verify_locations(self.ca_file)
            self._verifying = verifying
        return _Creator(self._verifying, host, note, True)


def tls_failure(reason: Failure, note: VerifyNote, what: str) -> ProxyError:
    """
    The 502 for a TLS connection that ended before its handshake completed.

    @param what: Who the connection was to, for the message (e.g. C{"example.com:443"}
        or C{"parent proxy 10.0.0.1:3128"}).
    """
    if isinstance(reason.value, ProxyError):
        return reason.value
    if note.why is not None:
        return BadGateway(
            f"TLS certificate of {what} refused: {note.why}",
            "tls_certificate_error",
            details=note.why,
        )
    if reason.check(VerificationError):
        return BadGateway(
            f"TLS certificate of {what} refused: it does not match the host name",
            "tls_certificate_error",
        )
    if reason.check(SSL.Error):
        why = _openssl_reason(reason.value)
        return BadGateway(f"TLS handshake with {what} failed: {why}", "tls_protocol_error", why)
    if reason.check(ConnectionClosed):
        return BadGateway(
            f"{what} closed the connection during the TLS handshake", "tls_protocol_error"
        )
    return BadGateway(
        f"TLS handshake with {what} failed: {reason.getErrorMessage()}", "tls_protocol_error"
    )


def _openssl_reason(error: BaseException | None) -> str:
    """The last reason string of an OpenSSL error, e.g. C{"wrong version number"}."""
    args = getattr(error, "args", ())
    entries = args[0] if args and isinstance(args[0], list) else []
    for entry in reversed(entries):
        if isinstance(entry, tuple) and entry and entry[-1]:
            return str(entry[-1])
    return str(error) or "protocol error"
