"""TLS server contexts from PEM files (certificate chain + key), with a minimum TLS version."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion


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
