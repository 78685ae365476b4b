"""End to end IMAP: the real twistd with Python imaplib, curl imap:// and mbsync (isync)."""

from __future__ import annotations

import datetime
import email.utils
import imaplib
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until

ALICE = "alice@example.test"


def message(i: int, attachment: bool = False) -> bytes:
    head = (
        f"From: Jörg Müller <jorg{i}@elsewhere.test>\r\n"
        f"To: Alice <alice@example.test>\r\n"
        f"Subject: Grüße Nummer {i}\r\n"
        f"Message-ID: <m{i}@elsewhere.test>\r\n"
        f"Date: {email.utils.formatdate(1700000000 + i)}\r\n"
    ).encode()
    if not attachment:
        return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\nHallo \xc3\xa9 %d\r\n" % i
    return head + (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=b%d"\r\n\r\n'
        b"--=b%d\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b'--=b%d\r\nContent-Type: application/octet-stream; name="data.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n%s\r\n--=b%d--\r\n"
    ) % (i, i, i, b"QUJD" * 200, i)


def connect(server: MailgwServer) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    client.login(ALICE, PASSWORD)
    return client


def test_imaplib_full_flow(server: MailgwServer) -> None:
    client = connect(server)
    try:
        assert b"UIDPLUS" in client.capability()[1][0]
        typ, data = client.append("INBOX", None, None, message(1))
        assert typ == "OK" and b"APPENDUID" in data[0]
        client.append(
            "INBOX", "(\\Flagged)", imaplib.Time2Internaldate(time.time()), message(2, True)
        )
        typ, data = client.select("INBOX")
        assert typ == "OK" and data == [b"2"]
        typ, data = client.fetch("1:2", "(RFC822.SIZE BODY.PEEK[])")
        sizes = [int(part[0].split(b"RFC822.SIZE ")[1].split()[0]) for part in data[::2]]
        bodies = [part[1] for part in data[::2]]
        assert bodies == [message(1), message(2, True)]
        assert sizes == [len(b) for b in bodies]
        client.literal = "Grüße".encode()  # 8-bit search text goes as a literal
        typ, data = client.search("UTF-8", "SUBJECT")
        assert data == [b"1 2"]
        typ, data = client.uid("SEARCH", "FLAGGED")
        assert data == [b"2"]
        client.store("1", "+FLAGS", "(\\Seen $Label)")
        typ, data = client.fetch("1", "(FLAGS)")
        assert b"\\Seen" in data[0] and b"$Label" in data[0]
        typ, data = client.copy("1", "Archive")
        assert typ == "OK" and b"COPYUID" in data[0]
        typ, data = client.uid("MOVE", "2", "Trash")
        assert typ == "OK"
        assert client.status("Trash", "(MESSAGES)")[1] == [b"Trash (MESSAGES 1)"]
        client.store("1", "+FLAGS", "(\\Deleted)")
        typ, data = client.expunge()
        assert data[-1] == b"1"  # after the MOVE's EXPUNGE of message 2
        assert client.select("INBOX")[1] == [b"0"]
        typ, data = client.list()
        assert any(b"\\Sent" in line and b"Sent" in line for line in data)
        assert client.create("Projects/2024")[0] == "OK"
        assert client.rename("Projects/2024", "Projects/2025")[0] == "OK"
        assert client.delete("Projects/2025")[0] == "OK"
    finally:
        client.logout()


def test_imaplib_append_keeps_the_internaldate_zone(server: MailgwServer) -> None:
    est = datetime.timezone(datetime.timedelta(hours=-5))
    when = datetime.datetime(2020, 1, 1, 23, 30, tzinfo=est)  # 2 January in UTC
    client = connect(server)
    try:
        date = imaplib.Time2Internaldate(when)
        assert date == '"01-Jan-2020 23:30:00 -0500"'
        assert client.append("INBOX", None, date, message(1))[0] == "OK"
        client.select("INBOX")
        typ, data = client.fetch("1", "(INTERNALDATE)")
        assert data == [b'1 (INTERNALDATE "01-Jan-2020 23:30:00 -0500")'], data
        assert imaplib.Internaldate2tuple(data[0]) == time.localtime(when.timestamp())
        assert client.search(None, "ON", "1-Jan-2020") == ("OK", [b"1"])
        assert client.search(None, "SINCE", "2-Jan-2020") == ("OK", [b""])
    finally:
        client.logout()


def test_idle_sees_a_new_smtp_delivery_within_a_second(server: MailgwServer) -> None:
    client = connect(server)
    try:
        client.select("INBOX")
        tag = client._new_tag().decode()  # type: ignore[attr-defined]
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+")
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
            smtp.sendmail("bob@elsewhere.test", [ALICE], message(7))
        sent = time.monotonic()
        client.sock.settimeout(5)
        line = client.readline()
        assert line == b"* 1 EXISTS\r\n", line
        assert time.monotonic() - sent < 1.0
        client.send(b"DONE\r\n")
        while not (line := client.readline()).startswith(tag.encode()):
            pass
        assert b"OK" in line
    finally:
        client.logout()


def test_curl_imap(server: MailgwServer) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl not installed (.ci/run installs it)")
    client = connect(server)
    client.append("INBOX", None, None, message(3))
    client.logout()
    url = f"imap://127.0.0.1:{server.ports['imap']}/INBOX;UID=1"
    out = subprocess.run(
        ["curl", "-s", "--max-time", "20", "--user", f"{ALICE}:{PASSWORD}", url],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == message(3)
    listing = subprocess.run(
        [
            "curl",
            "-s",
            "--max-time",
            "20",
            "--user",
            f"{ALICE}:{PASSWORD}",
            f"imap://127.0.0.1:{server.ports['imap']}/",
        ],
        capture_output=True,
        timeout=30,
    )
    assert b"INBOX" in listing.stdout and b"Sent" in listing.stdout


def _local_form(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(True) if not line.startswith(b"X-TUID: "))


def mbsync(config: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mbsync", "-c", str(config), "-a"], capture_output=True, timeout=300)


@pytest.mark.timeout(600)
def test_mbsync_two_way_sync_is_idempotent(server: MailgwServer, tmp_path: Path) -> None:
    if shutil.which("mbsync") is None:
        pytest.fail("mbsync (isync) not installed (.ci/run installs it)")
    count = 200
    client = connect(server)
    for i in range(count):
        client.append("INBOX", None, None, message(i, attachment=i % 5 == 0))
    client.logout()
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount test\nHost 127.0.0.1\nPort {server.ports['imap']}\nUser {ALICE}\n"
        f'Pass "{PASSWORD}"\nSSLType None\nAuthMechs PLAIN\n\n'
        "IMAPStore remote\nAccount test\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX Archive\nCreate Both\n"
        "Expunge Both\nSyncState *\nSync All\n"
    )
    first = mbsync(config)
    assert first.returncode == 0, first.stderr.decode()
    files = list((local / "INBOX" / "cur").iterdir()) + list((local / "INBOX" / "new").iterdir())
    assert len(files) == count
    # mbsync stores LF line ends and adds its X-TUID header; everything else is our bytes
    assert sorted(_local_form(f.read_bytes()) for f in files) == sorted(
        message(i, attachment=i % 5 == 0).replace(b"\r\n", b"\n") for i in range(count)
    )
    # a local change goes up, a remote change comes down, nothing is duplicated
    (local / "INBOX" / "new" / "1.local:2,S").write_bytes(message(9999))
    client = connect(server)
    client.append("INBOX", None, None, message(5000))
    client.logout()
    second = mbsync(config)
    assert second.returncode == 0, second.stderr.decode()
    third = mbsync(config)
    assert third.returncode == 0, third.stderr.decode()
    files = list((local / "INBOX" / "cur").iterdir()) + list((local / "INBOX" / "new").iterdir())
    assert len(files) == count + 2
    remote = wait_until(lambda: mailbox_files(server), what="server files")
    assert len(remote) == count + 2
