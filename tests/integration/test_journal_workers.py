"""The change journal end to end: a real twistd with ``[imap] workers``; a change made by an
IMAP session in one worker process is journaled once, in order, with that worker's pid, and
reaches a session in another worker only through the main process's reading of the journal
(the worker's pipe message is just a hint to look)."""

from __future__ import annotations

import imaplib
import time

from mailgw.journal import ChangeLog
from tests.integration.helpers import PASSWORD
from tests.integration.test_imap_workers import ALICE, login, other_worker, start


def test_a_change_in_a_worker_reaches_the_journal_and_the_other_workers_once(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = start(server_factory)
    changes = ChangeLog(str(server.data_dir / "journal"))
    idler = login(server)
    other = other_worker(server, idler)
    try:
        idler.ok("SELECT INBOX")
        before = changes.last_seq()
        idler.sock.sendall(b"i1 IDLE\r\n")
        assert idler.readline(5).startswith(b"+")
        message = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
        other.sock.sendall(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(message), message))
        assert other.file.readline().startswith(b"a1 OK")
        assert idler.untagged() == b"* 1 EXISTS\r\n"
        other.ok("SELECT INBOX")
        other.ok("STORE 1 +FLAGS (\\Flagged)")
        line = idler.untagged()
        assert line.startswith(b"* 1 FETCH (") and b"\\Flagged" in line, line
        idler.sock.sendall(b"DONE\r\n")
        # Exactly once: nothing else was pushed before the IDLE ended.
        assert idler.untagged().startswith(b"i1 OK")

        entries = changes.read(before)
        assert [(e.kind, e.user, e.folder) for e in entries] == [
            ("message.added", ALICE, "INBOX"),
            ("message.flags", ALICE, "INBOX"),
        ]
        added, flagged = entries
        assert added.pid == flagged.pid == other.pid  # written by the other worker
        assert added.seq < flagged.seq
        assert added.payload["uid"] == 1 and added.payload["size"] == len(message)
        assert flagged.payload["changes"][0][0] == 1
        assert "\\Flagged" in flagged.payload["changes"][0][2]
    finally:
        for c in (idler, other):
            c.close()


def test_imaplib_changes_in_workers_are_journaled_in_order(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = start(server_factory)
    changes = ChangeLog(str(server.data_dir / "journal"))
    before = changes.last_seq()
    clients = []
    for _ in range(2):
        client = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
        client.login(ALICE, PASSWORD)
        clients.append(client)
    try:
        for n in range(6):
            client = clients[n % 2]
            assert client.append("INBOX", "", imaplib.Time2Internaldate(time.time()),
                                 b"Subject: %d\r\n\r\nbody\r\n" % n)[0] == "OK"  # fmt: skip
        clients[0].select("INBOX")
        assert clients[0].store("1:6", "+FLAGS", "(\\Seen)")[0] == "OK"
        clients[0].create("Later")
        assert clients[0].copy("2", "Later")[0] == "OK"
    finally:
        for client in clients:
            client.logout()
    # (The user's first use registered INBOX and the default folders: "found" entries.)
    entries = [e for e in changes.read(before) if not e.payload.get("found")]
    assert [e.kind for e in entries] == ["message.added"] * 6 + [
        "message.flags",
        "mailbox.created",
        "message.copied",
    ]
    assert [e.payload["uid"] for e in entries[:6]] == [1, 2, 3, 4, 5, 6]
    assert server.proc is not None and server.proc.pid not in {e.pid for e in entries}
    assert [e.seq for e in entries] == sorted({e.seq for e in entries})
    assert [c[0] for c in entries[6].payload["changes"]] == [1, 2, 3, 4, 5, 6]
    assert entries[8].payload["from_uid"] == 2 and entries[8].folder == "Later"
