"""End to end: a real twistd scanning with a real clamd (MX with smtplib and swaks,
submission with STARTTLS + AUTH); the mail read back over IMAP."""

from __future__ import annotations

import base64
import imaplib
import io
import smtplib
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.clamd import EICAR, FOUND, Clamd
from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until
from tests.integration.test_smtp_rfc import context, start_node

CLEAN = b"From: bob@elsewhere.test\r\nTo: alice@example.test\r\nSubject: clean\r\n\r\nhello\r\n"


def with_zip(subject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.com", EICAR)
    body = base64.encodebytes(buf.getvalue()).replace(b"\n", b"\r\n")
    return (
        f"From: bob@elsewhere.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n".encode()
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        + b"--b\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="readme.zip"\r\n\r\n'
        + body
        + b"--b--\r\n"
    )


def imap_messages(node: MailgwServer, folder: str = "INBOX") -> list[bytes]:
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    try:
        imap.login("alice@example.test", PASSWORD)
        imap.select(folder, readonly=True)
        _, data = imap.search(None, "ALL")
        out = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[])")
            out.append(bytes(parts[0][1]))  # type: ignore[index]
        return out
    finally:
        imap.logout()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path], clamd: Clamd
) -> Iterator[MailgwServer]:
    av = {"enabled": "yes", "servers": f"127.0.0.1:{free_port()} {clamd.address}"}
    server = start_node(tmp_path_factory.mktemp("av"), selfsigned, {"antivirus": av})
    yield server
    server.stop()


def send_mx(node: MailgwServer, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=30) as smtp:
        smtp.sendmail("bob@elsewhere.test", ["alice@example.test"], message)


def test_mx_refuses_a_virus_with_its_name(node: MailgwServer) -> None:
    """The first server in the list is down: each scan fails over to the live one."""
    for message in (CLEAN.replace(b"hello", EICAR), with_zip("zipped")):
        with pytest.raises(smtplib.SMTPDataError) as info:
            send_mx(node, message)
        assert info.value.smtp_code == 554
        assert info.value.smtp_error == f"5.7.0 Message rejected: virus found: {FOUND}".encode()


def test_clean_mail_arrives_with_the_scanned_header(node: MailgwServer) -> None:
    send_mx(node, CLEAN.replace(b"clean", b"clean-mx"))
    found = wait_until(
        lambda: [m for m in imap_messages(node) if b"clean-mx" in m], what="delivery"
    )
    head = found[0].partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Virus-Scanned: clamav\r\n" in b"\r\n" + head + b"\r\n"


def test_swaks_eicar_attachment(node: MailgwServer, tmp_path: Path) -> None:
    attachment = tmp_path / "eicar.com"
    attachment.write_bytes(EICAR)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{node.ports['mx']}", "--helo", "client.test",
         "--from", "bob@elsewhere.test", "--to", "alice@example.test",
         "--attach", f"@{attachment}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"554 5.7.0 Message rejected: virus found: {FOUND}" in result.stdout, result.stdout


def test_submission_refuses_a_virus(node: MailgwServer) -> None:
    message = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: v\r\n\r\n" + EICAR
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=context())
        smtp.login("alice@example.test", PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as info:
            smtp.sendmail("alice@example.test", ["bob@example.test"], message)
    assert info.value.smtp_code == 554 and FOUND.encode() in info.value.smtp_error


@pytest.mark.parametrize(
    ("on_failure", "expect"), [("tempfail", 451), ("accept", 250)], ids=["tempfail", "accept"]
)
def test_clamd_down(
    tmp_path: Path, selfsigned: tuple[Path, Path], on_failure: str, expect: int
) -> None:
    av = {"enabled": "yes", "servers": f"127.0.0.1:{free_port()}", "on_failure": on_failure}
    if on_failure == "tempfail":
        av.pop("on_failure")  # the default
    server = start_node(tmp_path, selfsigned, {"antivirus": av})
    try:
        if expect == 451:
            with pytest.raises(smtplib.SMTPDataError) as info:
                send_mx(server, CLEAN)
            assert info.value.smtp_code == 451
            assert info.value.smtp_error.startswith(b"4.7.0 ")
            assert not mailbox_files(server)
        else:
            send_mx(server, CLEAN)
            (message,) = wait_until(lambda: imap_messages(server), what="delivery")
            assert b"X-Virus-Scanned: skipped\r\n" in message
    finally:
        server.stop()
