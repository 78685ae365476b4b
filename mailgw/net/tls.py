"""TLS server contexts from PEM files (certificate chain + key), with a minimum TLS version and
ALPN that never refuses a client (RFC 7301 3.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer

ALPN_IDS: dict[str, tuple[bytes, ...]] = {
    "imap": (b"imap",),
    "pop3": (b"pop3",),
    "smtp": (),
    "http": (b"http/1.1",),
}
"""ALPN protocol IDs by service, from IANA's "TLS Application-Layer Protocol Negotiation (ALPN)
Protocol IDs" registry: ``imap`` and ``pop3`` (RFC 2595); SMTP has no registered ID; the HTTP
role speaks HTTP/1.1 only (a client offering ``h2, http/1.1`` gets ``http/1.1``)."""


class TLSError(Exception):
    """A certificate or key problem; ``which`` is ``"certificate"`` or ``"key"``."""

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message)
        self.which = which


def load_certificate_options(
    certificate: str, private_key: str | None = None, min_version: str = "TLSv1.2"
) -> CertificateOptions:
    """Build server CertificateOptions; raise TLSError naming what is unreadable or wrong."""
    try:
        with open(certificate, "rb") as f:
            cert_pem = f.read()
    except OSError as e:
        raise TLSError("certificate", f"cannot read {certificate}: {e.strerror}") from None
    key_path = private_key or certificate
    try:
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSError("key", f"cannot read {key_path}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError("certificate", f"no PEM certificate in {certificate}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSError("key", f"no unencrypted PEM private key in {key_path}") from None
    version = TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else TLSVersion.TLSv1_2
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=version,
        )
        options.getContext()  # checks that key and certificate belong together
    except Exception as e:  # OpenSSL.SSL.Error and friends: report, do not trace back
        raise TLSError("key", f"key does not match certificate {certificate}: {e}") from None
    return options


def select_alpn(offered: Sequence[bytes], ours: Sequence[bytes]) -> bytes | None:
    """The ALPN protocol to select: the first of the client's ``offered`` IDs (its order of
    preference) that is one of ``ours``, or None when there is none in common. RFC 7301 3.2
    lets a server that supports none of the offered protocols select nothing and carry on."""
    for protocol in offered:
        if protocol in ours:
            return protocol
    return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side TLS for one service: the certificate's context, whose ALPN answer selects
    one of ``alpn`` (e.g. ``(b"imap",)``) when the client offers it and selects nothing
    otherwise.

    Twisted's own ALPN callback answers an offer it cannot match with an empty selection,
    which OpenSSL turns into a fatal ``internal_error`` alert: every client offering ALPN
    (browsers, Go, Android, Apple) would fail. Used for implicit-TLS listeners and for
    STARTTLS/STLS (``transport.startTLS``)."""

    def __init__(self, options: CertificateOptions, alpn: Sequence[bytes] = ()) -> None:
        self.alpn = tuple(alpn)
        self.context: SSL.Context = self._context_of(options)

    def _context_of(self, options: CertificateOptions) -> SSL.Context:
        # Our own context (not shared with another ServerTLS): the ALPN answer is per service.
        context = options.getContext()
        context.set_alpn_select_callback(self._select)
        return context

    def replace(self, options: CertificateOptions) -> None:
        """Serve new connections with ``options`` (a renewed certificate, another minimum
        version); connections already made keep the context they started with. Every
        listener and STARTTLS holding this object sees the change: no restart."""
        self.context = self._context_of(options)

    def _select(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        chosen = select_alpn(offered, self.alpn)
        return SSL.NO_OVERLAPPING_PROTOCOLS if chosen is None else chosen

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802 (Twisted)
        """A new server connection of this context (``IOpenSSLServerConnectionCreator``)."""
        return SSL.Connection(self.context, None)


def server_tls(
    certificate: str,
    private_key: str | None = None,
    min_version: str = "TLSv1.2",
    service: str = "smtp",
) -> ServerTLS:
    """``ServerTLS`` for ``service`` (a key of ``ALPN_IDS``) from PEM files; TLSError as
    ``load_certificate_options``."""
    options = load_certificate_options(certificate, private_key, min_version)
    return ServerTLS(options, ALPN_IDS[service])
