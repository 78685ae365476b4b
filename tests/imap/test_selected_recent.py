"""\\Recent across processes: the claim mark lives in the user's index, so of the sessions of
two servers (two MessageStore instances on one directory) exactly one sees a message as
\\Recent; EXAMINE and STATUS count without claiming; an empty claim writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailgw.store import MailboxNotFound, MessageStore
from mailgw.store.index import UserIndex
from tests.imap.imap_env import Env

ALICE = "alice@example.test"


def recent(out: bytes) -> int:
    m = re.search(rb"\* (\d+) RECENT\r\n", out)
    assert m, out
    return int(m.group(1))


def test_a_message_is_recent_in_exactly_one_process(tmp_path: Path) -> None:
    one, two = Env(tmp_path), Env(tmp_path)  # two processes on one data directory
    one.deliver(b"Subject: a\r\n\r\nx\r\n")
    a = one.connect(login=ALICE)
    b = two.connect(login=ALICE)
    assert recent(a.cmd("SELECT INBOX")) == 1
    assert recent(b.cmd("SELECT INBOX")) == 0
    two.deliver(b"Subject: b\r\n\r\nx\r\n")
    out_b = b.cmd("NOOP")  # b's process sees it first and claims it
    out_a = a.cmd("NOOP")
    # a's count did not change: no RECENT for it (as Dovecot)
    assert recent(out_b) == 1 and b"RECENT" not in out_a
    assert b"\\Recent" in b.cmd("FETCH 2 FLAGS") and b"\\Recent" not in a.cmd("FETCH 2 FLAGS")
    assert b"* SEARCH 1\r\n" in a.cmd("SEARCH RECENT")
    assert b"* SEARCH 2\r\n" in b.cmd("SEARCH RECENT")
    # A third session, in either process, gets none.
    c = one.connect(login=ALICE)
    assert recent(c.cmd("SELECT INBOX")) == 0


def test_examine_and_status_count_without_claiming(tmp_path: Path) -> None:
    one, two = Env(tmp_path), Env(tmp_path)
    for _ in range(3):
        one.deliver(b"Subject: a\r\n\r\nx\r\n")
    e = two.connect(login=ALICE)
    out = e.cmd("EXAMINE INBOX")
    assert recent(out) == 3
    assert b"\\Recent" in e.cmd("FETCH 1 FLAGS")
    s = one.connect(login=ALICE)
    assert b"* STATUS INBOX (RECENT 3 MESSAGES 3)" in s.cmd("STATUS INBOX (RECENT MESSAGES)")
    assert recent(s.cmd("SELECT INBOX")) == 3  # EXAMINE claimed nothing
    assert b"* STATUS INBOX (RECENT 0)" in e.cmd("STATUS INBOX (RECENT)")
    one.deliver(b"Subject: b\r\n\r\nx\r\n")
    assert recent(e.cmd("NOOP")) == 4  # still unclaimed: recent for the read-only session
    assert recent(s.cmd("NOOP")) == 4  # now claimed by the read-write one
    assert recent(two.connect(login=ALICE).cmd("EXAMINE INBOX")) == 0


def test_claims_write_only_when_something_is_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MessageStore(str(tmp_path / "mail"), lambda u: None)
    box = store.open_mailbox(ALICE)
    uids = [box.append(b"Subject: x\r\n\r\nx\r\n") for _ in range(3)]
    writes: list[int] = []
    original = UserIndex.write

    def counting(self: UserIndex) -> object:
        writes.append(1)
        return original(self)

    monkeypatch.setattr(UserIndex, "write", counting)
    assert box.unclaimed_recent(uids) == {1, 2, 3} and writes == []
    assert box.claim_recent(uids) == {1, 2, 3} and len(writes) == 1
    assert box.claim_recent(uids) == set() and len(writes) == 1
    assert box.claim_recent([]) == set() and box.recent_count() == 0
    other = MessageStore(str(tmp_path / "mail"), lambda u: None)
    try:
        stale = other.open_mailbox(ALICE)
        assert stale.claim_recent([2, 3]) == set()  # claimed in the other process
        assert store.mailbox_status(ALICE, "INBOX").recent == 0
    finally:
        other.close()
        store.close()


def test_the_mark_survives_a_restart_and_is_per_folder(tmp_path: Path) -> None:
    root = str(tmp_path / "mail")
    store = MessageStore(root, lambda u: None)
    store.create_mailbox(ALICE, "Work")
    inbox = store.open_mailbox(ALICE)
    work = store.open_mailbox(ALICE, "Work")
    inbox.append(b"a\r\n")
    work.append(b"b\r\n")
    assert inbox.claim_recent([1]) == {1}
    store.close()
    again = MessageStore(root, lambda u: None)
    try:
        assert again.open_mailbox(ALICE).claim_recent([1]) == set()
        assert again.open_mailbox(ALICE, "Work").claim_recent([1]) == {1}
        again.delete_mailbox(ALICE, "Work")
        with pytest.raises(MailboxNotFound):
            work.recent_count()
    finally:
        again.close()
