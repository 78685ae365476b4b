"""DKIM keys per sending domain (``data_dir/dkim/DOMAIN/``) and signing of submitted mail.

Layout: ``data_dir/dkim/<domain>/<selector>.pem`` (RSA private key, PKCS#1 PEM, mode 0600) and
``data_dir/dkim/<domain>/selector`` naming the selector in use. ``keygen`` creates both and
returns the DNS TXT record to publish at ``<selector>._domainkey.<domain>``.

``DKIMSigner`` is the relay's signer: for mail that arrived authenticated (submission or the
webmail API: envelope protocol ``...A``, ``webmail``) from a domain with a key, it returns the
``DKIM-Signature`` header line (relaxed/relaxed, rsa-sha256) the relay sends before the
message; otherwise ``b""``. Keys are read once and cached (cheap reload on mtime change).
"""

from __future__ import annotations

import base64
import os
import re
import threading

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailgw.model import Envelope, QueuedMessage

SIGNED_HEADERS = (
    b"from",
    b"sender",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"to",
    b"cc",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"in-reply-to",
    b"references",
)

_SELECTOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def _check(domain: str, selector: str) -> tuple[str, str]:
    domain = domain.strip().lower().rstrip(".")
    if not _DOMAIN_RE.fullmatch(domain) or ".." in domain:
        raise ValueError(f"invalid domain {domain!r}")
    if not _SELECTOR_RE.fullmatch(selector):
        raise ValueError(f"invalid selector {selector!r}")
    return domain, selector


def txt_record(public_pem: bytes) -> str:
    """``v=DKIM1; k=rsa; p=...`` for an RSA public key (SubjectPublicKeyInfo PEM)."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def keygen(dkim_dir: str, domain: str, selector: str = "mailgw", bits: int = 2048) -> str:
    """Create the key of ``domain`` under ``selector`` and make it the one in use; return the
    zone line ``<selector>._domainkey.<domain>. IN TXT "..."``. FileExistsError if that
    selector's key exists already (choose a new selector to rotate)."""
    domain, selector = _check(domain, selector)
    folder = os.path.join(dkim_dir, domain)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{selector}.pem")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    tmp = os.path.join(folder, "selector.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(selector + "\n")
    os.replace(tmp, os.path.join(folder, "selector"))
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = txt_record(public)
    chunks = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {chunks} )"


def is_submitted(envelope: Envelope) -> bool:
    """Mail that arrived authenticated (ESMTPSA, UTF8SMTPSA, the webmail API)."""
    return envelope.protocol.endswith("A") or envelope.protocol == "webmail"


class DKIMSigner:
    """``signer(envelope, message) -> bytes`` for the relay (runs in a worker thread);
    ``message`` is the spool's ``QueuedMessage`` (or a path to the whole message)."""

    def __init__(self, dkim_dir: str) -> None:
        self.dkim_dir = dkim_dir
        self._keys: dict[str, tuple[float, str, bytes] | None] = {}
        self._lock = threading.Lock()

    def key_for(self, domain: str) -> tuple[str, bytes] | None:
        """(selector, private key PEM) of ``domain``, or None when it has no key."""
        try:
            domain, _ = _check(domain, "x")
        except ValueError:
            return None
        folder = os.path.join(self.dkim_dir, domain)
        marker = os.path.join(folder, "selector")
        try:
            mtime = os.stat(marker).st_mtime
        except OSError:
            return None
        with self._lock:
            cached = self._keys.get(domain)
            if cached is not None and cached[0] == mtime:
                return cached[1], cached[2]
        try:
            with open(marker, encoding="ascii") as f:
                selector = f.read().strip()
            _check(domain, selector)
            with open(os.path.join(folder, f"{selector}.pem"), "rb") as f:
                pem = f.read()
        except (OSError, ValueError):
            return None
        with self._lock:
            self._keys[domain] = (mtime, selector, pem)
        return selector, pem

    def sign(self, message: bytes, domain: str) -> bytes:
        """The DKIM-Signature header line for ``message`` signed as ``domain`` (b"": no key)."""
        found = self.key_for(domain)
        if found is None:
            return b""
        selector, pem = found
        signature: bytes = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
        )
        return signature

    def __call__(self, envelope: Envelope, message: QueuedMessage | str) -> bytes:
        if not is_submitted(envelope) or "@" not in envelope.sender:
            return b""
        domain = envelope.sender.rpartition("@")[2].lower()
        if self.key_for(domain) is None:
            return b""
        with open(message, "rb") if isinstance(message, str) else message.open_content() as f:
            data = f.read()
        return self.sign(data, domain)
