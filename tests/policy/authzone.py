"""DNS data for the inbound-authentication tests: SPF, DKIM keys, DMARC policies, a DNSBL.

Domains (all under ``.test``, served by the tests' own DNS server):

- ``good.example.com``: SPF allows 127.0.0.1 (``-all``), DKIM key ``sel``, DMARC ``p=reject``;
- ``soft.example.com``: SPF ``~all`` without 127.0.0.1; ``hard.example.com``: SPF ``-all`` without it;
- ``quar.example.com``: DMARC ``p=quarantine``; ``none.example.com``: DMARC ``p=none``; both with a DKIM
  key ``sel`` and SPF for 127.0.0.1;
- ``other.example.net``: SPF allows 127.0.0.1, DKIM key ``sel``, no DMARC: an unaligned identity;
- ``nospf.example.com``: no records at all but an A;
- ``bl.test``: a DNSBL listing 127.0.0.1 (``1.0.0.127.bl.test``); ``clean-bl.test``: lists
  nobody.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.relay.dnsserver import Zone


@dataclass
class Keys:
    private_pem: bytes
    txt: str


def make_key() -> Keys:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Keys(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


def auth_zone(keys: Keys) -> Zone:
    z = Zone()
    dkim_txt = f'"{keys.txt}"'
    for d in ("good.example.com", "quar.example.com", "none.example.com", "other.example.net"):
        z.add(d, "TXT", '"v=spf1 ip4:127.0.0.1 -all"')
        z.add(f"sel._domainkey.{d}", "TXT", dkim_txt)
        z.add(d, "A", "192.0.2.1")
    z.add("soft.example.com", "TXT", '"v=spf1 ip4:192.0.2.9 ~all"')
    z.add("hard.example.com", "TXT", '"v=spf1 ip4:192.0.2.9 -all"')
    z.add("_dmarc.good.example.com", "TXT", '"v=DMARC1; p=reject"')
    z.add("_dmarc.hard.example.com", "TXT", '"v=DMARC1; p=reject"')
    z.add("_dmarc.quar.example.com", "TXT", '"v=DMARC1; p=quarantine"')
    z.add("_dmarc.none.example.com", "TXT", '"v=DMARC1; p=none"')
    z.add("nospf.example.com", "A", "192.0.2.2")
    z.add("1.0.0.127.bl.test", "A", "127.0.0.2")
    z.add("1.0.0.127.bl.test", "TXT", '"listed for testing"')
    z.add("clean-bl.test", "A", "192.0.2.3")
    z.add("1.0.0.127.refusing-bl.test", "A", "127.255.255.254")  # Spamhaus: "public resolver"
    return z


def message(from_domain: str, body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return (
        f"From: Someone <someone@{from_domain}>\r\n".encode()
        + b"To: alice@example.test\r\nSubject: hello\r\n"
        + b"Message-ID: <1@test>\r\nDate: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
        + extra
        + b"\r\n"
        + body
    )


def signed(msg: bytes, domain: str, keys: Keys) -> bytes:
    sig = dkim.sign(
        msg,
        b"sel",
        domain.encode(),
        keys.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(sig) + msg
