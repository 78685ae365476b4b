"""Tests for Mailbox.refresh's incremental path: only rows and tombstones above the last
seen modseq are read, a full reload only when the index disagrees with the snapshot."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.store import MailboxNotFound, MessageInfo, MessageStore, mailbox, rows
from mailgw.store.index import INDEX_NAME

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), lambda u: None, hostname="mx.example")
    yield s
    s.close()


@pytest.fixture
def rows_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """UIDs of the index rows turned into MessageInfo (every row a refresh reads)."""
    seen: list[int] = []
    original = mailbox.info_from_row

    def counting(row: object) -> MessageInfo:
        info = original(row)  # type: ignore[arg-type]
        seen.append(info.uid)
        return info

    monkeypatch.setattr(mailbox, "info_from_row", counting)
    return seen


def fill(store: MessageStore, n: int) -> list[int]:
    box = store.open_mailbox(USER)
    return [box.append(MSG + b"%d\r\n" % i) for i in range(n)]


def index(store: MessageStore) -> sqlite3.Connection:
    return sqlite3.connect(str(Path(store.root) / "example.test" / "alice" / INDEX_NAME))


def test_unchanged_refresh_reads_no_row(store: MessageStore, rows_read: list[int]) -> None:
    fill(store, 20)
    store._retained.clear()  # not kept loaded either
    rows_read.clear()
    box = store.open_mailbox(USER)  # nobody holds the folder's snapshot: it is loaded
    assert len(rows_read) == 20
    rows_read.clear()
    for _ in range(3):
        box.refresh()
    assert rows_read == []
    assert [i.uid for i in box.messages()] == list(range(1, 21))


def test_a_kept_snapshot_reads_only_the_changes(store: MessageStore, rows_read: list[int]) -> None:
    fill(store, 20)
    store.open_mailbox(USER)  # loaded, then kept when nobody holds it
    other_store(store).open_mailbox(USER).set_flags([4], ["\\Seen"], "add")
    rows_read.clear()
    box = store.open_mailbox(USER)
    assert rows_read == [4]
    assert [i.uid for i in box.messages()] == list(range(1, 21))


def other_store(store: MessageStore) -> MessageStore:
    """Another process's store on the same directory."""
    return MessageStore(store.root, lambda u: None, hostname="other")


def test_flag_change_elsewhere_reads_only_that_row(
    store: MessageStore, rows_read: list[int]
) -> None:
    fill(store, 20)
    elsewhere = other_store(store)
    a = store.open_mailbox(USER)
    b = elsewhere.open_mailbox(USER)
    b.set_flags([7], ["\\Seen", "$Work"], "add")
    rows_read.clear()
    a.refresh()
    assert rows_read == [7]
    infos = {i.uid: i for i in a.messages()}
    assert infos[7].flags == {"\\Seen", "$Work"}
    assert infos[7].modseq == a.highestmodseq == b.highestmodseq
    assert infos[7].filename == {i.uid: i for i in b.messages()}[7].filename
    assert all(infos[u].flags == frozenset() for u in infos if u != 7)
    elsewhere.close()


def test_objects_of_one_folder_share_one_snapshot(
    store: MessageStore, rows_read: list[int]
) -> None:
    fill(store, 20)
    a = store.open_mailbox(USER)
    rows_read.clear()
    b = store.open_mailbox(USER)
    assert rows_read == []  # b uses a's snapshot
    b.set_flags([7], ["\\Seen"], "add")
    b.expunge([3])
    assert rows_read == [7]  # set_flags' own read: the change is applied, not read back
    assert {i.uid: i.flags for i in a.messages()}[7] == {"\\Seen"}
    assert 3 not in {i.uid for i in a.messages()}
    a.refresh()
    assert rows_read == [7] and a.highestmodseq == b.highestmodseq
    # A change by another process in between: the snapshot is read from the index.
    elsewhere = other_store(store)
    elsewhere.open_mailbox(USER).set_flags([9], ["\\Flagged"], "add")
    rows_read.clear()
    b.set_flags([8], ["\\Seen"], "add")
    assert sorted(rows_read) == [8, 8, 9]  # set_flags' own read, then the snapshot's
    assert {i.uid: i.flags for i in a.messages()}[9] == {"\\Flagged"}
    elsewhere.close()


def test_expunge_and_move_by_another_object(store: MessageStore, rows_read: list[int]) -> None:
    fill(store, 10)
    store.create_mailbox(USER, "Other")
    a = store.open_mailbox(USER)
    b = store.open_mailbox(USER)
    b.expunge([2, 5])
    b.move_to([9], "Other")
    rows_read.clear()
    a.refresh()
    assert rows_read == []
    assert [i.uid for i in a.messages()] == [1, 3, 4, 6, 7, 8, 10]
    assert a.highestmodseq == b.highestmodseq


def test_appends_by_others_are_seen_in_uid_order(
    store: MessageStore, rows_read: list[int], tmp_path: Path
) -> None:
    fill(store, 3)
    elsewhere = other_store(store)
    a = store.open_mailbox(USER)
    b = elsewhere.open_mailbox(USER)
    assert b.append(MSG) == 4  # not yet seen by a
    spool = tmp_path / "spool"
    spool.write_bytes(MSG)
    assert store.deliver(USER, str(spool)) == 5
    rows_read.clear()
    assert a.append(MSG) == 6  # a's own append brings 4 and 5 along, in order
    assert sorted(rows_read) == [4, 5, 6]
    assert [i.uid for i in a.messages()] == [1, 2, 3, 4, 5, 6]
    assert a.uidnext == 7
    assert a.read_message(5) == MSG
    elsewhere.close()


def test_index_disagreeing_with_the_snapshot_forces_a_reload(
    store: MessageStore, rows_read: list[int]
) -> None:
    fill(store, 5)
    box = store.open_mailbox(USER)
    # A message dropped without a tombstone (not something the store does): the message
    # count no longer matches, so the snapshot is rebuilt.
    info = {i.uid: i for i in box.messages()}[3]
    (Path(store.root) / "example.test" / "alice" / info.filename).unlink()
    with index(store) as conn:
        conn.execute("DELETE FROM messages WHERE uid = 3")
        conn.execute(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1,"
            " message_count = message_count - 1 WHERE name = 'INBOX'"
        )
    conn.close()
    rows_read.clear()
    box.refresh()
    assert sorted(rows_read) == [1, 2, 4, 5]
    assert [i.uid for i in box.messages()] == [1, 2, 4, 5]


def test_new_uidvalidity_or_lower_modseq_forces_a_reload(
    store: MessageStore, rows_read: list[int]
) -> None:
    fill(store, 4)
    box = store.open_mailbox(USER)
    with index(store) as conn:
        conn.execute("UPDATE mailboxes SET uidvalidity = uidvalidity + 1 WHERE name = 'INBOX'")
    conn.close()
    old = box.uidvalidity
    rows_read.clear()
    box.refresh()
    assert len(rows_read) == 4 and box.uidvalidity == old + 1
    with index(store) as conn:
        conn.execute("UPDATE messages SET flags = '\\Seen', modseq = 1 WHERE uid = 2")
        conn.execute("UPDATE mailboxes SET highestmodseq = 1 WHERE name = 'INBOX'")
    conn.close()
    rows_read.clear()
    box.refresh()
    assert len(rows_read) == 4 and box.highestmodseq == 1
    assert {i.uid: i.flags for i in box.messages()}[2] == {"\\Seen"}


def test_change_in_another_process_is_seen(tmp_path: Path, rows_read: list[int]) -> None:
    root = str(tmp_path / "mail")
    a = MessageStore(root, lambda u: None, hostname="a")
    b = MessageStore(root, lambda u: None, hostname="b")
    try:
        fill(a, 6)
        box_a = a.open_mailbox(USER)
        box_b = b.open_mailbox(USER)
        box_b.set_flags([1], ["\\Answered"], "add")
        box_b.expunge([6])
        box_b.append(MSG, ["\\Flagged"])
        rows_read.clear()
        box_a.refresh()
        assert sorted(rows_read) == [1, 7]
        assert {i.uid: i.flags for i in box_a.messages()} == {
            1: {"\\Answered"},
            2: frozenset(),
            3: frozenset(),
            4: frozenset(),
            5: frozenset(),
            7: {"\\Flagged"},
        }
    finally:
        a.close()
        b.close()


def test_open_without_snapshot_reads_no_row_until_asked(
    store: MessageStore, rows_read: list[int]
) -> None:
    fill(store, 5)
    full = store.open_mailbox(USER)
    numbers = (full.uidvalidity, full.uidnext, full.highestmodseq)
    del full  # nobody holds the snapshot now (nor keeps it loaded)
    store._retained.clear()
    rows_read.clear()
    box = store.open_mailbox(USER, snapshot=False)
    assert rows_read == []
    assert (box.uidvalidity, box.uidnext, box.highestmodseq) == numbers
    assert box.append(MSG, ["\\Seen"]) == 6
    assert box.uidnext == 7 and rows_read == []
    assert [i.uid for i in box.messages()] == [1, 2, 3, 4, 5, 6]
    assert {i.uid: i.flags for i in box.messages()}[6] == {"\\Seen"}
    with pytest.raises(MailboxNotFound):
        store.open_mailbox(USER, "Nope", snapshot=False)


def test_refresh_of_a_deleted_folder_raises(store: MessageStore) -> None:
    store.create_mailbox(USER, "Gone")
    box = store.open_mailbox(USER, "Gone")
    with index(store) as conn:  # the row vanished (another process deleted the folder)
        conn.execute("DELETE FROM mailboxes WHERE name = 'Gone'")
    conn.close()
    with pytest.raises(MailboxNotFound):
        box.refresh()


def test_flag_sets_are_shared_and_their_table_bounded(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    for flags in (["\\Seen"], ["\\Seen"], ["$A"], ["$B"], ["\\Seen"]):
        box.append(MSG, flags)
    monkeypatch.setattr(rows, "_FLAG_SETS_MAX", 2)
    rows._FLAG_SETS.clear()
    elsewhere = other_store(store)
    infos = elsewhere.open_mailbox(USER).messages()
    assert infos[0].flags is infos[1].flags  # one frozenset per distinct flag text
    assert [set(i.flags) for i in infos] == [{"\\Seen"}, {"\\Seen"}, {"$A"}, {"$B"}, {"\\Seen"}]
    assert len(rows._FLAG_SETS) <= 2
    elsewhere.close()
