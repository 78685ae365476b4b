"""DKIM: keygen writes the key and prints the TXT record; signatures verify against it."""

from __future__ import annotations

import os
from pathlib import Path

import dkim
import pytest

from mailgw.model import Envelope
from mailgw.relay.dkim import DKIMSigner, is_submitted, keygen

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@far.example\r\nSubject: hello\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    b"Hello Bob.\r\n.dot line\r\n"
)


def txt_value(zone_line: str) -> bytes:
    parts = zone_line.split("( ", 1)[1].rsplit(" )", 1)[0]
    return "".join(p.strip('"') for p in parts.split('" "')).encode()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("dkim")
    line = keygen(str(root), "Example.TEST", "s2026", bits=1024)
    return root, line


def test_keygen_writes_private_key_and_selector(keyed: tuple[Path, str]) -> None:
    root, line = keyed
    assert line.startswith("s2026._domainkey.example.test. IN TXT")
    assert txt_value(line).startswith(b"v=DKIM1; k=rsa; p=")
    assert (root / "example.test" / "selector").read_text() == "s2026\n"
    assert os.stat(root / "example.test" / "s2026.pem").st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        keygen(str(root), "example.test", "s2026", bits=1024)
    with pytest.raises(ValueError):
        keygen(str(root), "bad domain", "s1")
    with pytest.raises(ValueError):
        keygen(str(root), "example.test", "bad/selector")


def test_signature_verifies_against_the_txt_record(keyed: tuple[Path, str]) -> None:
    root, line = keyed
    signer = DKIMSigner(str(root))
    header = signer.sign(MESSAGE, "example.test")
    assert header.startswith(b"DKIM-Signature: ") and b"d=example.test" in header

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.example.test."
        return txt_value(line)

    assert dkim.verify(header + MESSAGE, dnsfunc=dnsfunc)
    tampered = header + MESSAGE.replace(b"Hello Bob", b"Hello Eve")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_signer_signs_only_submitted_mail_of_keyed_domains(
    keyed: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = keyed
    content = tmp_path / "msg"
    content.write_bytes(MESSAGE)
    signer = DKIMSigner(str(root))
    submitted = Envelope("alice@example.test", ["bob@far.example"], protocol="ESMTPSA")
    assert signer(submitted, str(content)).startswith(b"DKIM-Signature:")
    relayed = Envelope("alice@example.test", ["bob@far.example"], protocol="ESMTPS")
    assert signer(relayed, str(content)) == b""
    other = Envelope("x@nokey.example", ["bob@far.example"], protocol="ESMTPSA")
    assert signer(other, str(content)) == b""
    assert signer(Envelope("", ["x@y.example"], protocol="ESMTPSA"), str(content)) == b""
    assert signer.key_for("..bad") is None
    assert is_submitted(Envelope("a@b.c", [], protocol="webmail"))
