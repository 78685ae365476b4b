"""End to end tier 2: a real twistd node, `mailgw store migrate`, POP3 reads, kill -9 mid-run."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgw.store import MessageStore
from mailgw.store.blobs import FileBlobStore
from mailgw.testing.server import REPO, MailgwServer
from tests.integration.helpers import PASSWORD, mailbox_files, provision, wait_until

TIER2 = {"store": {"tier2_dir": "tier2", "migrate_folders": "INBOX"}}


def retrieve_all(server: MailgwServer) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    try:
        client.user("alice@example.test")
        client.pass_(PASSWORD)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    finally:
        client.quit()


def test_pop3_reads_migrated_messages_byte_for_byte(
    server_factory: Callable[..., MailgwServer],
) -> None:
    server = server_factory(TIER2)
    body = b"Subject: announcement\r\n\r\nSame text for everyone\r\n" + (b"x" * 70 + b"\r\n") * 40
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        for rcpts in (["alice@example.test", "bob@example.test"], ["alice@example.test"]):
            smtp.sendmail("carol@elsewhere.test", rcpts, body)
        smtp.sendmail("carol@elsewhere.test", ["alice@example.test"], b"Subject: own\r\n\r\nhi\r\n")
    wait_until(lambda: len(mailbox_files(server)) == 3, what="delivery")
    before = retrieve_all(server)
    out = server.cli("store", "migrate", "--dry-run").stdout
    assert "would migrate 4 message(s)" in out
    out = server.cli("store", "migrate").stdout
    assert out.startswith("migrated 4 message(s)"), out
    assert mailbox_files(server) == []
    assert retrieve_all(server) == before
    stats = server.cli("store", "stats").stdout.splitlines()
    tier2 = next(line.split("\t") for line in stats if line.startswith("tier2"))
    assert tier2[1] == "4"
    # SMTP deliveries differ in their trace headers (Received, Delivered-To): each copy has
    # its own header blob, the three copies of the announcement share one body blob.
    assert int(tier2[4]) == 6
    kinds = {line.split("\t")[0]: line.split("\t") for line in stats[1:]}
    assert kinds["tier2-headers"][1:5:3] == ["4", "4"]  # messages, blobs
    assert kinds["tier2-bodies"][1:5:3] == ["4", "2"]
    assert "0 corrupt" in server.cli("store", "verify").stdout
    # damage one blob: verify fails, POP3 answers -ERR (never wrong bytes)
    blobs = FileBlobStore(str(server.data_dir / "tier2"))
    for digest in blobs.iter_refs():
        path, offset, length = blobs.where(digest)
        with open(path, "r+b") as fh:
            fh.seek(offset + length - 5)
            fh.write(b"XXXXX")
    result = server.cli("store", "verify", check=False)
    assert result.returncode == 1 and "corrupt\t" in result.stdout
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    try:
        client.user("alice@example.test")
        client.pass_(PASSWORD)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.retr(1)
    finally:
        client.quit()


def pop3_messages(server: MailgwServer, user: str, password: str) -> list[tuple[int, bytes]]:
    """(LIST size, RETR bytes) of every message of ``user``."""
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    try:
        client.user(user)
        client.pass_(password)
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        return [
            (size, b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n") for i, size in enumerate(sizes)
        ]
    finally:
        client.quit()


def test_announcement_to_50_users_stores_one_body(
    server_factory: Callable[..., MailgwServer],
) -> None:
    from mailgw.directory import Directory

    server = server_factory(TIER2)
    directory = Directory(
        str(server.data_dir / "directory.sqlite"), argon2_time_cost=1, argon2_memory_kib=8192
    )
    others = [f"user{i:02d}@example.test" for i in range(48)]
    for user in others:
        directory.add_user(user, f"pw {user}")
    directory.close()
    users = ["alice@example.test", "bob@example.test", *others]
    passwords = {"alice@example.test": PASSWORD, "bob@example.test": "bob password"}
    passwords.update({u: f"pw {u}" for u in others})
    line = b"All staff: the office is closed on Friday for maintenance of the building.\r\n"
    body = line * (4096 // len(line))
    message = b"From: hr@example.test\r\nSubject: Office closed Friday\r\n\r\n" + body
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        refused = smtp.sendmail("hr@elsewhere.test", users, message)
    assert refused == {}
    for user in users:
        local = user.split("@")[0]
        wait_until(lambda local=local: len(mailbox_files(server, local)) == 1, what=user)
    readers = ["alice@example.test", "bob@example.test", others[0], others[-1]]
    before = {u: pop3_messages(server, u, passwords[u]) for u in readers}
    for user, [(size, data)] in before.items():
        assert data.endswith(body) and size == len(data)
        assert f"Delivered-To: {user}".encode() in data
    out = server.cli("store", "migrate").stdout
    assert out.startswith("migrated 50 message(s)"), out
    assert all(mailbox_files(server, u.split("@")[0]) == [] for u in users)
    rows = {
        line.split("\t")[0]: line.split("\t")
        for line in server.cli("store", "stats").stdout.splitlines()
    }
    assert rows["tier"][1:] == ["messages", "logical", "stored", "blobs", "dedup", "logical/stored"]
    bodies, headers, tier2 = rows["tier2-bodies"], rows["tier2-headers"], rows["tier2"]
    assert bodies[1] == "50" and int(bodies[2]) == 50 * len(body)
    assert bodies[4] == "1" and float(bodies[5]) == pytest.approx(50.0)  # one body blob
    assert int(bodies[3]) < len(body)  # compressed too
    assert headers[1] == "50" and headers[4] == "50"  # the trace headers differ per copy
    assert tier2[1] == "50" and tier2[4] == "51"
    assert float(tier2[5]) > 10 and float(tier2[6]) > 10
    assert rows["tier1"][1] == "0"
    assert {u: pop3_messages(server, u, passwords[u]) for u in readers} == before
    assert "0 corrupt, 0 missing reference(s), 0 orphan(s)" in server.cli("store", "verify").stdout


def test_kill_9_during_migration_loses_nothing(tmp_path: Path) -> None:
    server = MailgwServer(tmp_path / "node", TIER2)
    provision(server)
    root = server.data_dir / "mail"
    store = MessageStore(str(root), lambda user: None, hostname="mx.example.test")
    expected = {}
    box = store.open_mailbox("alice@example.test")
    for i in range(1500):
        data = f"Subject: n{i}\r\n\r\n".encode() + os.urandom(2000).hex().encode() + b"\r\n"
        expected[box.append(data)] = data
    store.close()
    blobs = FileBlobStore(str(server.data_dir / "tier2"))
    cmd = [sys.executable, "-m", "mailgw.cli", "--config", str(server.config_path)]
    proc = subprocess.Popen([*cmd, "store", "migrate"], cwd=REPO, env=server.env())
    try:
        wait_until(lambda: sum(1 for _ in blobs.iter_refs()) >= 200, what="migration progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    result = server.cli("store", "migrate")
    moved = int(result.stdout.split()[1])
    assert 0 < moved < 1500
    store = MessageStore(str(root), lambda user: None, hostname="mx.example.test", tier2=blobs)
    box = store.open_mailbox("alice@example.test")
    assert [m.uid for m in box.messages()] == sorted(expected)
    assert all(m.blob is not None for m in box.messages())
    for uid, data in expected.items():
        assert box.read_message(uid) == data
    assert mailbox_files(server) == []
    store.close()
    assert "0 corrupt, 0 missing" in server.cli("store", "verify").stdout
