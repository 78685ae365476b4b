"""mbsync (isync) against the real twistd: 1,000 messages, two-way flags and deletions."""

from __future__ import annotations

import email.utils
import imaplib
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, wait_for_port
from tests.integration.helpers import PASSWORD

ALICE = "alice@example.test"
MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
_MSGID = re.compile(rb"^Message-ID: *<([^>]+)>", re.IGNORECASE | re.MULTILINE)


def sample(i: int) -> bytes:
    """Message ``i``: UTF-8 headers; every 7th a raw Latin-1 (8-bit, not UTF-8) header; every
    5th a multipart with a base64 attachment; every 11th an 8-bit body."""
    head = (
        f"From: Jörg Müller <jorg{i}@elsewhere.test>\r\n"
        f"To: Alice <{ALICE}>\r\n"
        f"Subject: Grüße Nummer {i} — 東京\r\n"
        f"Message-ID: <s{i}@elsewhere.test>\r\n"
        f"Date: {email.utils.formatdate(1700000000 + i * 60)}\r\n"
    ).encode()
    if i % 7 == 0:
        head += b"X-Latin1: caf\xe9 cr\xe8me\r\n"
    if i % 5 == 0:
        return head + (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=b%d"\r\n\r\n'
            b"--=b%d\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsiehe Anhang \xc3\xbc\r\n"
            b'--=b%d\r\nContent-Type: application/octet-stream; name="d\xc3\xa4ta.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n%s\r\n--=b%d--\r\n"
        ) % (i, i, i, (b"QUJD" * 19 + b"\r\n") * (20 + i % 13), i)
    body = b"Hallo \xc3\xa9 %d\r\n" % i if i % 11 else b"8bit \xff\xfe body %d\r\n" % i
    return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body


def message_id(data: bytes) -> str:
    m = _MSGID.search(data)
    assert m is not None, data[:200]
    return m.group(1).decode()


def connect(server: MailgwServer) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    client.login(ALICE, PASSWORD)
    return client


def insecure_context() -> ssl.SSLContext:
    """TLS without certificate checks (the test server's certificate is self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def bulk_append(
    server: MailgwServer, messages: list[bytes], mailbox: str = "INBOX", tls: bool = False
) -> None:
    """APPEND every message over one connection, pipelined with LITERAL+ (no round trips)."""
    port = server.ports["imaps" if tls else "imap"]
    # start() waits for the MX listener only; the IMAP listeners may come up a moment later
    wait_for_port("127.0.0.1", port, proc=server.proc)
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    if tls:
        sock = insecure_context().wrap_socket(sock)
    with sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        sock.sendall(b'L LOGIN "%s" "%s"\r\n' % (ALICE.encode(), PASSWORD.encode()))
        while not (line := reader.readline()).startswith(b"L "):
            assert line, "connection closed during LOGIN"
        assert line.startswith(b"L OK"), line
        out = bytearray()
        for n, data in enumerate(messages):
            out += b"A%d APPEND %s {%d+}\r\n%s\r\n" % (n, mailbox.encode(), len(data), data)
        sock.sendall(bytes(out))
        done = 0
        while done < len(messages):
            line = reader.readline()
            assert line, f"connection closed after {done} APPENDs"
            if line.startswith(b"A"):
                assert line.split()[1] == b"OK", line
                done += 1
        sock.sendall(b"Z LOGOUT\r\n")


def remote_state(server: MailgwServer, mailbox: str = "INBOX") -> dict[str, list[object]]:
    """Message-ID → [UID, flags, size, bytes] for every message; duplicates fail the test."""
    client = connect(server)
    try:
        typ, data = client.select(mailbox, readonly=True)
        assert typ == "OK", data
        count = int(data[0])
        state: dict[str, list[object]] = {}
        if count == 0:
            return state
        typ, data = client.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
        parts = [p for p in data if isinstance(p, tuple)]
        assert len(parts) == count
        for head, body in parts:
            uid = int(re.search(rb"UID (\d+)", head).group(1))  # type: ignore[union-attr]
            size = int(re.search(rb"RFC822.SIZE (\d+)", head).group(1))  # type: ignore[union-attr]
            flags_m = re.search(rb"FLAGS \(([^)]*)\)", head)
            assert flags_m is not None, head
            flags = set(flags_m.group(1).decode().split()) - {"\\Recent"}
            assert size == len(body), (head, len(body))
            mid = message_id(body)
            assert mid not in state, f"duplicate on the server: {mid}"
            state[mid] = [uid, flags, size, body]
        return state
    finally:
        client.logout()


def local_files(folder: Path) -> list[Path]:
    return sorted(p for sub in ("cur", "new") for p in (folder / sub).iterdir())


def local_flags(path: Path) -> set[str]:
    info = path.name.rsplit(":2,", 1)[1] if ":2," in path.name else ""
    return {MAILDIR_FLAGS[c] for c in info if c in MAILDIR_FLAGS}


def local_state(folder: Path) -> dict[str, tuple[Path, set[str], bytes]]:
    """Message-ID → (file, flags, bytes); duplicates fail the test."""
    state: dict[str, tuple[Path, set[str], bytes]] = {}
    for path in local_files(folder):
        data = path.read_bytes()
        mid = message_id(data)
        assert mid not in state, f"duplicate in the local Maildir: {mid}"
        state[mid] = (path, local_flags(path), data)
    return state


def strip_tuid(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(True) if not line.startswith(b"X-TUID: "))


def mbsync(config: Path) -> subprocess.CompletedProcess[bytes]:
    out = subprocess.run(
        ["mbsync", "-c", str(config), "-a"],
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out


def with_flags(path: Path, flags: str) -> Path:
    """Rename a Maildir file to carry exactly ``flags`` (moving it to cur/)."""
    base = path.name.split(":2,", 1)[0]
    target = path.parent.parent / "cur" / f"{base}:2,{''.join(sorted(flags))}"
    path.rename(target)
    return target


COUNT = 1000


@pytest.mark.timeout(900)
def test_mbsync_1000_messages_two_way(server: MailgwServer, tmp_path: Path) -> None:
    if shutil.which("mbsync") is None:
        pytest.fail("mbsync (isync) not installed (.ci/run installs it)")
    originals = {f"s{i}@elsewhere.test": sample(i) for i in range(COUNT)}
    bulk_append(server, list(originals.values()))
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount test\nHost 127.0.0.1\nPort {server.ports['imap']}\nUser {ALICE}\n"
        f'Pass "{PASSWORD}"\nSSLType None\nAuthMechs PLAIN\nPipelineDepth 50\n\n'
        "IMAPStore remote\nAccount test\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\n"
        "Expunge Both\nSyncState *\nSync All\n"
    )
    inbox = local / "INBOX"

    # 1. first sync: every message arrives once, byte for byte (mbsync stores LF line ends)
    mbsync(config)
    near = local_state(inbox)
    assert len(near) == COUNT
    for mid, (_, flags, data) in near.items():
        assert strip_tuid(data) == originals[mid].replace(b"\r\n", b"\n"), mid
        assert flags == set()
    far = remote_state(server)
    assert len(far) == COUNT
    assert all(far[mid][3] == originals[mid] for mid in far)

    # 2. re-run: nothing changes on either side
    names = [p.name for p in local_files(inbox)]
    mbsync(config)
    assert [p.name for p in local_files(inbox)] == names
    again = remote_state(server)
    assert {m: v[:2] for m, v in again.items()} == {m: v[:2] for m, v in far.items()}

    # 3. a flag change and a deletion on each side
    path_flag, _, _ = near["s10@elsewhere.test"]
    with_flags(path_flag, "F")
    near["s11@elsewhere.test"][0].unlink()
    client = connect(server)
    try:
        client.select("INBOX")
        client.uid("STORE", str(far["s20@elsewhere.test"][0]), "+FLAGS", "(\\Seen \\Answered)")
        client.uid("STORE", str(far["s21@elsewhere.test"][0]), "+FLAGS", "(\\Deleted)")
        assert client.expunge()[0] == "OK"
    finally:
        client.logout()
    mbsync(config)
    far2 = remote_state(server)
    near2 = local_state(inbox)
    assert set(far2) == set(near2) == set(originals) - {"s11@elsewhere.test", "s21@elsewhere.test"}
    assert far2["s10@elsewhere.test"][1] == {"\\Flagged"}
    assert near2["s10@elsewhere.test"][1] == {"\\Flagged"}
    assert near2["s20@elsewhere.test"][1] == {"\\Seen", "\\Answered"}
    assert far2["s20@elsewhere.test"][1] == {"\\Seen", "\\Answered"}
    changed_far = {m for m in far2 if far2[m][:2] != far[m][:2]}
    changed_near = {m for m in near2 if near2[m][1] != near[m][1]}
    assert changed_far == {"s10@elsewhere.test", "s20@elsewhere.test"}
    assert changed_near == {"s10@elsewhere.test", "s20@elsewhere.test"}

    # 4. once only: a further run changes nothing anywhere
    names = [p.name for p in local_files(inbox)]
    mbsync(config)
    assert [p.name for p in local_files(inbox)] == names
    far3 = remote_state(server)
    assert {m: v[:2] for m, v in far3.items()} == {m: v[:2] for m, v in far2.items()}
    assert len(local_files(inbox)) == COUNT - 2
    assert "Traceback" not in server.log() and "SERVERBUG" not in server.log()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ssl_type", ["STARTTLS", "IMAPS"])
def test_mbsync_over_tls_with_plaintext_auth_refused(
    server_factory: Callable[..., MailgwServer],
    selfsigned: tuple[Path, Path],
    tmp_path: Path,
    ssl_type: str,
) -> None:
    if shutil.which("mbsync") is None:
        pytest.fail("mbsync (isync) not installed (.ci/run installs it)")
    cert, key = selfsigned
    server = server_factory(
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "imap": {"allow_plaintext_auth": "no"},
        }
    )
    originals = {f"s{i}@elsewhere.test": sample(i) for i in range(40)}
    bulk_append(server, list(originals.values()), tls=True)
    local = tmp_path / "local"
    local.mkdir()
    port = server.ports["imaps" if ssl_type == "IMAPS" else "imap"]
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount test\nHost localhost\nPort {port}\nUser {ALICE}\n"
        f'Pass "{PASSWORD}"\nSSLType {ssl_type}\nCertificateFile {cert}\nAuthMechs PLAIN\n\n'
        "IMAPStore remote\nAccount test\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\n"
        "Expunge Both\nSyncState *\nSync All\n"
    )
    mbsync(config)
    near = local_state(local / "INBOX")
    assert set(near) == set(originals)
    assert all(strip_tuid(v[2]) == originals[m].replace(b"\r\n", b"\n") for m, v in near.items())
    with_flags(near["s1@elsewhere.test"][0], "S")
    mbsync(config)
    mbsync(config)
    assert len(local_files(local / "INBOX")) == len(originals)
    # plaintext LOGIN on the plain port is refused; the sync above really used TLS
    plain = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    assert b"LOGINDISABLED" in plain.capability()[1][0]
    with pytest.raises(imaplib.IMAP4.error):
        plain.login(ALICE, PASSWORD)
    plain.shutdown()
    tls = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=insecure_context())
    try:
        tls.login(ALICE, PASSWORD)
        tls.select("INBOX", readonly=True)
        typ, data = tls.search(None, "SEEN")
        assert data == [b"2"]  # s1 is the second message appended
    finally:
        tls.logout()
