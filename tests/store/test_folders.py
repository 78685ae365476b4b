"""Tests for folder operations: delete, rename, subscriptions, STATUS, changes, copy, move."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from mailgw.store import MailboxStatus, MessageStore
from mailgw.store.index import INDEX_NAME, UserIndex
from mailgw.testing.fakes import Quotas

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


@pytest.fixture
def quotas() -> Quotas:
    return Quotas()


@pytest.fixture
def store(tmp_path: Path, quotas: Quotas) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), quotas, hostname="mx.example")
    yield s
    s.close()


def udir(store: MessageStore) -> str:
    return os.path.join(store.root, "example.test", "alice")


def fill(store: MessageStore, folder: str, n: int, flags: tuple[str, ...] = ()) -> list[int]:
    box = store.open_mailbox(USER, folder)
    return [box.append(MSG + str(i).encode(), flags) for i in range(n)]


def test_delete_mailbox_removes_messages_dir_and_frees_quota(store: MessageStore) -> None:
    store.create_mailbox(USER, "A")
    store.create_mailbox(USER, "A/x")
    fill(store, "A", 3)
    fill(store, "A/x", 1)
    used_before, _ = store.quota_usage(USER)
    store.delete_mailbox(USER, "A")
    assert "A" not in store.list_mailboxes(USER)
    assert "A/x" in store.list_mailboxes(USER)
    assert not os.path.exists(os.path.join(udir(store), ".A"))
    assert os.path.isdir(os.path.join(udir(store), ".A.x", "cur"))
    assert not [e for e in os.listdir(udir(store)) if e.startswith("..")]
    used, _ = store.quota_usage(USER)
    assert used == used_before - 3 * len(MSG) - 3
    with pytest.raises(MailboxNotFound):
        store.open_mailbox(USER, "A")
    # recreated afresh: new UIDVALIDITY, empty
    store.create_mailbox(USER, "A")
    assert store.open_mailbox(USER, "A").messages() == []


def test_delete_mailbox_errors(store: MessageStore) -> None:
    with pytest.raises(ValueError):
        store.delete_mailbox(USER, "inbox")
    with pytest.raises(MailboxNotFound):
        store.delete_mailbox(USER, "Nope")
    with pytest.raises(ValueError):
        store.delete_mailbox(USER, "bad%name")


def test_delete_mailbox_whose_dir_vanished(store: MessageStore) -> None:
    store.create_mailbox(USER, "Gone")
    store.open_mailbox(USER, "Gone")
    os.rename(os.path.join(udir(store), ".Gone"), os.path.join(udir(store), "elsewhere"))
    store.delete_mailbox(USER, "Gone")
    assert "Gone" not in store.list_mailboxes(USER)


def test_rename_moves_children_and_keeps_uids(store: MessageStore) -> None:
    store.create_mailbox(USER, "A")
    store.create_mailbox(USER, "A/x")
    store.create_mailbox(USER, "AB")  # not a child of A
    store.set_subscribed(USER, "A", True)  # CREATE does not subscribe; RENAME moves it
    uids = fill(store, "A", 2, ("\\Seen",))
    xuid = fill(store, "A/x", 1)
    before = store.open_mailbox(USER, "A")
    store.rename_mailbox(USER, "A", "B/C")
    names = store.list_mailboxes(USER)
    assert "A" not in names and "A/x" not in names and "AB" in names
    assert "B/C" in names and "B/C/x" in names
    after = store.open_mailbox(USER, "B/C")
    assert after.uidvalidity == before.uidvalidity
    assert [m.uid for m in after.messages()] == uids
    assert after.read_message(uids[0]) == MSG + b"0"
    assert {m.flags for m in after.messages()} == {frozenset({"\\Seen"})}
    assert [m.uid for m in store.open_mailbox(USER, "B/C/x").messages()] == xuid
    assert "B/C" in store.list_subscribed(USER) and "A" not in store.list_subscribed(USER)
    # a stale Mailbox of the old name is gone
    with pytest.raises(MailboxNotFound):
        before.refresh()
    # the index survives a reindex with the same UIDs
    store.reindex(USER)
    assert [m.uid for m in store.open_mailbox(USER, "B/C").messages()] == uids


def test_rename_errors(store: MessageStore) -> None:
    store.create_mailbox(USER, "A")
    store.create_mailbox(USER, "A/x")
    store.create_mailbox(USER, "B/x")
    with pytest.raises(MailboxNotFound):
        store.rename_mailbox(USER, "Nope", "Z")
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "A", "Sent")  # exists
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "A", "B")  # A/x -> B/x exists
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "A", "INBOX")
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "A", "A/y")
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "A", "A")
    assert {"A", "A/x", "B/x"} <= set(store.list_mailboxes(USER))


def test_rename_failure_on_disk_rolls_back(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_mailbox(USER, "A")
    store.create_mailbox(USER, "A/x")
    real_rename = os.rename
    calls = []

    def failing(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        store.rename_mailbox(USER, "A", "Z")
    monkeypatch.setattr(os, "rename", real_rename)
    names = store.list_mailboxes(USER)
    assert "A" in names and "A/x" in names and "Z" not in names
    assert os.path.isdir(os.path.join(udir(store), ".A", "cur"))


def test_rename_inbox_moves_messages(store: MessageStore) -> None:
    uids = fill(store, "INBOX", 3, ("\\Flagged",))
    inbox = store.open_mailbox(USER)
    hms = inbox.highestmodseq
    store.rename_mailbox(USER, "INBOX", "Old")
    inbox.refresh()
    assert inbox.messages() == []
    assert inbox.uidnext == uids[-1] + 1  # UIDs are never reused
    _changed, vanished = inbox.changes_since(hms)
    assert vanished == uids
    old = store.open_mailbox(USER, "Old")
    assert [m.uid for m in old.messages()] == [1, 2, 3]
    assert [old.read_message(u) for u in (1, 2, 3)] == [MSG + b"0", MSG + b"1", MSG + b"2"]
    assert all(m.flags == {"\\Flagged"} for m in old.messages())
    assert store.mailbox_status(USER, "INBOX").messages == 0
    with pytest.raises(ValueError):
        store.rename_mailbox(USER, "INBOX", "Old")  # exists
    # after a reindex from the files, the same UIDs
    store.reindex(USER)
    assert [m.uid for m in store.open_mailbox(USER, "Old").messages()] == [1, 2, 3]


def test_subscriptions(store: MessageStore) -> None:
    assert store.list_subscribed(USER)[0] == "INBOX"
    assert "Sent" in store.list_subscribed(USER)
    store.set_subscribed(USER, "Nowhere/yet", True)
    store.set_subscribed(USER, "Nowhere/yet", True)  # idempotent
    store.set_subscribed(USER, "Sent", False)
    subs = store.list_subscribed(USER)
    assert "Nowhere/yet" in subs and "Sent" not in subs
    store.create_mailbox(USER, "Q")
    assert "Q" not in store.list_subscribed(USER)  # CREATE does not subscribe
    store.set_subscribed(USER, "Q", True)
    store.delete_mailbox(USER, "Q")
    assert "Q" in store.list_subscribed(USER)  # DELETE keeps the subscription
    with pytest.raises(ValueError):
        store.set_subscribed(USER, "a%b", True)
    store.set_subscribed(USER, "Nowhere/yet", False)
    assert "Nowhere/yet" not in store.list_subscribed(USER)


def test_old_index_gets_subscriptions_and_blob_column(tmp_path: Path) -> None:
    path = str(tmp_path / INDEX_NAME)
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE mailboxes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
        " uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL DEFAULT 1,"
        " highestmodseq INTEGER NOT NULL DEFAULT 1, subscribed INTEGER NOT NULL DEFAULT 1,"
        " total_size INTEGER NOT NULL DEFAULT 0, message_count INTEGER NOT NULL DEFAULT 0,"
        " new_mtime INTEGER NOT NULL DEFAULT -1, cur_mtime INTEGER NOT NULL DEFAULT -1);"
        "CREATE TABLE messages (mailbox INTEGER NOT NULL, uid INTEGER NOT NULL,"
        " base TEXT NOT NULL, filename TEXT NOT NULL, size INTEGER NOT NULL,"
        " flags TEXT NOT NULL DEFAULT '', internaldate REAL NOT NULL, modseq INTEGER NOT NULL,"
        " PRIMARY KEY (mailbox, uid)) WITHOUT ROWID;"
        "INSERT INTO mailboxes(name, uidvalidity, subscribed) VALUES ('INBOX', 1, 1), ('X', 2, 0);"
    )
    conn.commit()
    conn.close()
    index = UserIndex(path)
    try:
        cols = {r[1] for r in index.conn.execute("PRAGMA table_info(messages)")}
        assert "blob" in cols
        subs = [r[0] for r in index.conn.execute("SELECT name FROM subscriptions")]
        assert subs == ["INBOX"]
    finally:
        index.close()


def test_mailbox_status(store: MessageStore) -> None:
    fill(store, "INBOX", 2, ("\\Seen",))
    fill(store, "INBOX", 3)
    box = store.open_mailbox(USER)
    box.set_flags([3], ["$Seenish", "\\Answered"], "add")
    status = store.mailbox_status(USER, "inbox")
    assert isinstance(status, MailboxStatus)
    assert status.messages == 5
    assert status.unseen == 3
    assert status.recent == 5  # no session has claimed them
    assert box.claim_recent([1, 2, 3]) == {1, 2, 3}
    assert store.mailbox_status(USER, "INBOX").recent == 2
    assert status.uidnext == 6
    assert status.uidvalidity == box.uidvalidity
    assert status.highestmodseq == store.open_mailbox(USER).highestmodseq
    assert status.size == sum(m.size for m in box.messages())
    with pytest.raises(MailboxNotFound):
        store.mailbox_status(USER, "Nope")


def test_changes_since_and_tombstones(store: MessageStore) -> None:
    uids = fill(store, "INBOX", 4)
    box = store.open_mailbox(USER)
    mark = box.highestmodseq
    box.set_flags([uids[1]], ["\\Seen"], "add")
    box.expunge([uids[2], 99])
    changed, vanished = box.changes_since(mark)
    assert [m.uid for m in changed] == [uids[1]]
    assert vanished == [uids[2]]
    changed, vanished = box.changes_since(0)
    assert [m.uid for m in changed] == [uids[0], uids[1], uids[3]]
    assert vanished == [uids[2]]
    assert box.changes_since(box.highestmodseq) == ([], [])
    # a file removed behind our back becomes a tombstone at the next sync
    mark = box.highestmodseq
    info = next(m for m in box.messages() if m.uid == uids[3])
    os.unlink(os.path.join(udir(store), info.filename))
    box.refresh()
    _changed, vanished = box.changes_since(mark)
    assert vanished == [uids[3]]
    assert box.highestmodseq > mark


def test_copy_to(store: MessageStore, quotas: Quotas) -> None:
    uids = fill(store, "INBOX", 3, ("\\Seen", "$Label"))
    box = store.open_mailbox(USER)
    pairs = box.copy_to([uids[2], uids[0], 77], "Archive")
    assert pairs == [(uids[0], 1), (uids[2], 2)]
    arch = store.open_mailbox(USER, "Archive")
    assert arch.read_message(1) == box.read_message(uids[0])
    assert arch.read_message(2) == box.read_message(uids[2])
    src_info = {m.uid: m for m in box.messages()}
    for (s, d), m in zip(pairs, arch.messages(), strict=True):
        assert m.uid == d
        assert m.flags == src_info[s].flags
        assert m.internaldate == src_info[s].internaldate
    assert len(box.messages()) == 3
    used, _ = store.quota_usage(USER)
    quotas.limits[USER] = used + len(MSG)  # room for one, not two
    with pytest.raises(QuotaExceeded):
        box.copy_to(uids[:2], "Archive")
    assert len(store.open_mailbox(USER, "Archive").messages()) == 2
    with pytest.raises(MailboxNotFound):
        box.copy_to(uids, "Nope")


def test_move_to(store: MessageStore, quotas: Quotas) -> None:
    uids = fill(store, "INBOX", 3, ("\\Answered",))
    used, _ = store.quota_usage(USER)
    quotas.limits[USER] = used  # full: a move still works
    box = store.open_mailbox(USER)
    mark = box.highestmodseq
    pairs = box.move_to([uids[0], uids[2]], "Trash")
    assert pairs == [(uids[0], 1), (uids[2], 2)]
    assert [m.uid for m in box.messages()] == [uids[1]]
    assert box.highestmodseq > mark
    _c, vanished = box.changes_since(mark)
    assert vanished == [uids[0], uids[2]]
    trash = store.open_mailbox(USER, "Trash")
    assert [trash.read_message(u) for u in (1, 2)] == [MSG + b"0", MSG + b"2"]
    assert all(m.flags == {"\\Answered"} for m in trash.messages())
    assert store.quota_usage(USER)[0] == used
    assert store.mailbox_status(USER, "INBOX").messages == 1
    assert store.mailbox_status(USER, "Trash").messages == 2
    assert box.move_to([12345], "Trash") == []
    with pytest.raises(ValueError):
        box.move_to([uids[1]], "INBOX")
    with pytest.raises(MailboxNotFound):
        box.move_to([uids[1]], "Nope")
    # consistent with the files: a forced reindex keeps everything where it is
    store.reindex(USER)
    assert [m.uid for m in store.open_mailbox(USER, "Trash").messages()] == [1, 2]
    assert [m.uid for m in store.open_mailbox(USER).messages()] == [uids[1]]


def test_move_of_file_removed_behind_our_back(store: MessageStore) -> None:
    uids = fill(store, "INBOX", 2)
    box = store.open_mailbox(USER)
    info = box.messages()[0]
    os.unlink(os.path.join(udir(store), info.filename))
    pairs = box.move_to(uids, "Trash")
    assert pairs == [(uids[1], 1)]
    assert store.mailbox_status(USER, "INBOX").messages == 0


# -- folders changed by another process -----------------------------------------------------


def test_folder_names_follow_renames_and_deletes_in_another_process(
    store: MessageStore, tmp_path: Path
) -> None:
    other = MessageStore(store.root, lambda user: None, hostname="other")
    try:
        store.create_mailbox(USER, "Work")
        fill(store, "Work", 2)
        old = store.open_mailbox(USER, "Work")
        # Another process renames it and creates a new folder with the old name.
        other.rename_mailbox(USER, "Work", "Done")
        other.create_mailbox(USER, "Work")
        assert store.open_mailbox(USER, "Work").messages() == []
        assert [m.uid for m in store.open_mailbox(USER, "Done").messages()] == [1, 2]
        assert store.open_mailbox(USER, "Work").uidvalidity != old.uidvalidity
        with pytest.raises(MailboxNotFound):
            old.refresh()  # the object of the renamed folder does not follow it
        with pytest.raises(MailboxNotFound):
            old.append(MSG)  # nor writes into the new folder of its old name
        assert store.open_mailbox(USER, "Work").messages() == []
        assert store.mailbox_status(USER, "Done").messages == 2
        spool = tmp_path / "msg"
        spool.write_bytes(MSG)
        assert store.deliver(USER, str(spool), folder="Work") == 1
        assert len(other.open_mailbox(USER, "Work").messages()) == 1
        assert store.mailbox_status(USER, "Done").messages == 2
        # ... then deletes both.
        other.delete_mailbox(USER, "Work")
        other.delete_mailbox(USER, "Done")
        for name in ("Work", "Done"):
            with pytest.raises(MailboxNotFound):
                store.open_mailbox(USER, name)
            with pytest.raises(MailboxNotFound):
                store.mailbox_status(USER, name)
        with pytest.raises(MailboxNotFound):
            store.deliver(USER, str(spool), folder="Work")
    finally:
        other.close()


def test_a_mailbox_object_never_follows_its_id_to_another_folder(store: MessageStore) -> None:
    store.create_mailbox(USER, "Work")
    box = store.open_mailbox(USER, "Work")
    with sqlite3.connect(os.path.join(store.root, "example.test", "alice", INDEX_NAME)) as c:
        # Its row now has another name (what a rename by another process leaves).
        c.execute("UPDATE mailboxes SET name = 'Elsewhere' WHERE name = 'Work'")
    c.close()
    with pytest.raises(MailboxNotFound):
        box.refresh()
    with pytest.raises(MailboxNotFound):
        box.claim_recent([1])
