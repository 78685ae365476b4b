"""End to end: `mailgw store verify --repair` on a running node reaches the IMAP sessions that
have the folder selected (the kept folder snapshots follow the repaired index)."""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Callable

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until

USER = "alice@example.test"


def deliver(server: MailgwServer, subjects: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as smtp:
        for subject in subjects:
            smtp.sendmail("s@remote.test", [USER], f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    wait_until(lambda: len(mailbox_files(server)) == len(subjects), what="delivered")


def subjects(client: imaplib.IMAP4) -> list[bytes]:
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [part[1].strip() for part in data if isinstance(part, tuple)]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_repair_of_a_vanished_file_reaches_a_selected_session(
    server_factory: Callable[..., MailgwServer], workers: str
) -> None:
    server = server_factory({"imap": {"workers": workers}})
    deliver(server, ["one", "two", "three"])
    watcher = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=15)
    try:
        watcher.login(USER, PASSWORD)
        assert watcher.select("INBOX")[1] == [b"3"]
        before = subjects(watcher)  # in delivery order, which a job may change
        assert sorted(before) == [b"Subject: one", b"Subject: three", b"Subject: two"]
        after = [s for s in before if s != b"Subject: two"]
        gone = [p for p in mailbox_files(server) if b"Subject: two" in p.read_bytes()]
        gone[0].unlink()  # lost behind the server's back (a restore, a disk problem)
        done = server.cli("store", "verify", "--repair", USER)
        assert "1 missing file(s)" in done.stdout and "repaired 1 folder(s)" in done.stdout

        def expunged() -> list[bytes] | None:
            watcher.noop()
            return watcher.untagged_responses.pop("EXPUNGE", None)

        sequence = str(before.index(b"Subject: two") + 1).encode()
        assert wait_until(expunged, what="the EXPUNGE in the selected session") == [sequence]
        assert subjects(watcher) == after
        fresh = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=15)
        try:
            fresh.login(USER, PASSWORD)
            assert fresh.select("INBOX", readonly=True)[1] == [b"2"]
            assert subjects(fresh) == after
        finally:
            fresh.logout()
    finally:
        watcher.logout()
