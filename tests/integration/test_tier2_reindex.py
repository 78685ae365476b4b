"""End to end: tier-2 mail outlives its index (migrate, delete the index, reindex, restart)."""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
from collections.abc import Callable

from mailgw.store.index import INDEX_NAME
from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until

TIER2 = {"store": {"tier2_dir": "tier2", "migrate_folders": "INBOX Projects"}}
USER = "alice@example.test"


def imap_view(server: MailgwServer) -> dict[str, tuple[bytes, list[bytes]]]:
    """Per folder: its UIDVALIDITY and the raw FETCH of every message (UID, FLAGS,
    INTERNALDATE, BODY[])."""
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=15)
    try:
        client.login(USER, PASSWORD)
        out = {}
        for folder in ("INBOX", "Projects"):
            typ, _ = client.select(folder, readonly=True)
            assert typ == "OK"
            validity = client.response("UIDVALIDITY")[1][0]
            typ, data = client.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
            assert typ == "OK"
            # \\Recent is not kept (IMAP4rev2 dropped it; Dovecot loses it with its index too)
            out[folder] = (
                validity,
                [
                    re.sub(rb" \\Recent|\\Recent ?", b"", b"".join(p))
                    for p in data
                    if isinstance(p, tuple)
                ],
            )
        return out
    finally:
        client.logout()


def pop3_view(server: MailgwServer) -> list[tuple[bytes, bytes]]:
    """(UIDL, RETR bytes) of every INBOX message."""
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=15)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        uidls = [line.split()[1] for line in client.uidl()[1]]
        return [
            (uidl, b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n") for i, uidl in enumerate(uidls)
        ]
    finally:
        client.quit()


def test_migrated_mail_survives_a_deleted_index(
    server_factory: Callable[..., MailgwServer],
) -> None:
    server = server_factory(TIER2)
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        for i in range(4):
            smtp.sendmail(
                "carol@elsewhere.test",
                [USER],
                f"Subject: delivered {i}\r\n\r\n".encode() + b"line\r\n" * (50 + i),
            )
    wait_until(lambda: len(mailbox_files(server)) == 4, what="delivery")
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=15)
    client.login(USER, PASSWORD)
    assert client.create("Projects")[0] == "OK"
    for i, (flags, date) in enumerate(
        [
            ("(\\Seen $Important)", '"14-Jul-2023 09:15:00 +0530"'),
            ("(\\Flagged todo)", '"01-Jan-2024 23:59:59 -0800"'),
            ("()", '"29-Feb-2024 12:00:00 +0000"'),
        ]
    ):
        message = f"Subject: appended {i}\r\n\r\nkept in Projects\r\n".encode()
        assert client.append("Projects", flags, date, message)[0] == "OK"
    client.select("INBOX")
    assert client.uid("STORE", "2", "+FLAGS", "(\\Answered $Label1)")[0] == "OK"
    client.logout()
    out = server.cli("store", "migrate").stdout
    assert out.startswith("migrated 7 message(s)"), out
    assert mailbox_files(server) == []
    # changes after the migration: flags, expunge, move
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=15)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    assert client.uid("STORE", "1", "+FLAGS", "(\\Seen after-migration)")[0] == "OK"
    assert client.uid("STORE", "3", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"
    assert client.uid("MOVE", "4", "Projects")[0] == "OK"
    client.logout()
    pop3_before = pop3_view(server)
    imap_before = imap_view(server)
    assert len(pop3_before) == 2 and len(imap_before["Projects"][1]) == 4
    projects = b"".join(imap_before["Projects"][1])
    assert re.search(rb'INTERNALDATE "14-Jul-2023 09:15:00 \+0530"', projects)
    assert re.search(rb"FLAGS \([^)]*after-migration", b"".join(imap_before["INBOX"][1]))

    server.stop()
    index = server.data_dir / "mail" / "example.test" / "alice" / INDEX_NAME
    for suffix in ("", "-wal", "-shm"):
        index.with_name(INDEX_NAME + suffix).unlink(missing_ok=True)
    out = server.cli("store", "reindex", USER).stdout
    assert out.strip() == f"reindexed 6 message(s) of {USER}", out
    server.start()

    assert pop3_view(server) == pop3_before  # POP3 first: RETR sets \\Seen
    assert imap_view(server) == imap_before  # UIDVALIDITY, UIDs, flags, dates, bytes
    assert "0 corrupt, 0 missing" in server.cli("store", "verify").stdout
