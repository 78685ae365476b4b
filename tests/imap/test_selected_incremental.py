"""Tests for SelectedMailbox over the store's shared snapshot: the untagged updates follow
the snapshot's change reports (equal to those of a private full comparison), held-back
expunges keep their info, and a selection costs little memory per message."""

from __future__ import annotations

import dataclasses
import gc
import sqlite3
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.imap.commands.store import open_target
from mailgw.imap.selected import SelectedMailbox
from mailgw.store import MessageStore, facade
from mailgw.store.index import INDEX_NAME

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


class NoSharedSnapshot:
    """A mailbox offering only the common API: SelectedMailbox keeps a private copy."""

    def __init__(self, mailbox: Any) -> None:
        self._mailbox = mailbox

    def __getattr__(self, name: str) -> Any:
        if name in ("watch", "snapshot_info", "snapshot_count"):
            raise AttributeError(name)
        return getattr(self._mailbox, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), lambda u: None, hostname="mx.example")
    box = s.open_mailbox(USER)
    for i in range(30):
        box.append(MSG + b"%d\r\n" % i, ["\\Seen"] if i % 3 == 0 else [])
    del box  # nobody holds the folder's snapshot
    yield s
    s.close()


@pytest.fixture
def elsewhere(store: MessageStore) -> Iterator[MessageStore]:
    """Another process's store on the same directory."""
    s = MessageStore(store.root, lambda u: None, hostname="other")
    yield s
    s.close()


def select(mailbox: Any, condstore: bool = False) -> SelectedMailbox:
    return SelectedMailbox(mailbox, False, lambda uids: set(), condstore=condstore)


def forbid_full_scan(monkeypatch: pytest.MonkeyPatch, sel: SelectedMailbox) -> None:
    def scan() -> list[object]:
        raise AssertionError("messages() read on a sync")

    monkeypatch.setattr(sel.mailbox, "messages", scan)


@pytest.mark.parametrize("condstore", [False, True])
@pytest.mark.parametrize("where", ["this process", "another process"])
def test_shared_snapshot_sync_equals_full_comparison(
    store: MessageStore,
    elsewhere: MessageStore,
    monkeypatch: pytest.MonkeyPatch,
    condstore: bool,
    where: str,
) -> None:
    fast = select(store.open_mailbox(USER), condstore)
    slow = select(NoSharedSnapshot(elsewhere.open_mailbox(USER)), condstore)
    forbid_full_scan(monkeypatch, fast)
    other = (store if where == "this process" else elsewhere).open_mailbox(USER)
    other.set_flags([4, 10], ["\\Flagged", "$Work"], "add")
    other.expunge([20, 21])
    other.append(MSG, ["$New"])
    assert fast.flags_of(10) == ["\\Seen"]  # what the client knows until the next sync
    held = fast.sync(allow_expunge=False)
    assert held == slow.sync(allow_expunge=False)
    assert b"* FLAGS (" in held[0] and b"$New" in held[0] and b"$Work" in held[0]
    assert b"* 31 EXISTS\r\n" in held
    assert any(line.startswith(b"* 10 FETCH (FLAGS (\\Flagged \\Seen $Work)") for line in held)
    assert not any(b"EXPUNGE" in line for line in held)
    assert fast.gone == {20, 21} and fast.infos[20].uid == 20 and 20 in fast.infos
    other.set_flags([5], ["\\Answered"], "add")
    released = fast.sync(allow_expunge=True)
    assert released == slow.sync(allow_expunge=True)
    assert released[:2] == [b"* 21 EXPUNGE\r\n", b"* 20 EXPUNGE\r\n"]
    assert any(line.startswith(b"* 5 FETCH (FLAGS (\\Answered)") for line in released)
    assert fast.uids == slow.uids and fast.exists == 29
    assert 20 not in fast.infos and fast.infos.get(20) is None
    assert fast.sync(allow_expunge=True) == [] == slow.sync(allow_expunge=True)


def test_own_changes_are_not_reported_again(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sel = select(store.open_mailbox(USER))
    forbid_full_scan(monkeypatch, sel)
    for info in sel.mailbox.set_flags([2], ["\\Deleted"], "add").values():
        sel.update_info(info)
    sel.update_info(dataclasses.replace(info, uid=99))  # not a message of the client: ignored
    assert 99 not in sel.infos and sel.infos.get(99, "none") == "none"
    with pytest.raises(KeyError):
        sel.infos[99]
    assert sel.sync(allow_expunge=True) == []
    sel.mailbox.expunge([2])
    assert sel.sync(allow_expunge=True) == [b"* 2 EXPUNGE\r\n"]
    assert sel.exists == 29


def test_messages_that_came_and_went_are_never_told(store: MessageStore) -> None:
    sel = select(store.open_mailbox(USER))
    other = store.open_mailbox(USER)
    uid = other.append(MSG)
    other.expunge([uid])
    assert sel.sync(allow_expunge=True) == []
    assert sel.exists == 30 and uid not in sel.infos


def test_unexplained_difference_falls_back_to_full_comparison(
    store: MessageStore, elsewhere: MessageStore, tmp_path: Path
) -> None:
    sel = select(store.open_mailbox(USER))
    assert elsewhere.open_mailbox(USER).append(MSG) == 31
    info = sel.infos[7]
    (tmp_path / "mail" / "example.test" / "alice" / info.filename).unlink()
    conn = sqlite3.connect(str(tmp_path / "mail" / "example.test" / "alice" / INDEX_NAME))
    with conn:  # a row dropped without a tombstone, a flag changed: the snapshot reloads
        conn.execute("DELETE FROM messages WHERE uid = 7")
        conn.execute("UPDATE messages SET flags = '\\Flagged', modseq = modseq WHERE uid = 8")
        conn.execute(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1,"
            " message_count = message_count - 1 WHERE name = 'INBOX'"
        )
    conn.close()
    assert sel.sync(allow_expunge=True) == [
        b"* 7 EXPUNGE\r\n",
        b"* 30 EXISTS\r\n",  # no RECENT: the count did not change (as Dovecot)
        b"* 7 FETCH (FLAGS (\\Flagged))\r\n",
    ]
    assert 7 not in sel.uids


def test_idle_selection_keeps_no_per_message_state(store: MessageStore) -> None:
    sel = select(store.open_mailbox(USER))
    other = store.open_mailbox(USER)
    other.set_flags([3], ["\\Flagged"], "add")
    assert list(sel._told) == [3]  # only the changed message, with what the client knows
    assert sel.dirty is False
    sel.dirty = True  # the session's hint; the sync refreshes anyway
    assert sel.sync(allow_expunge=True) == [b"* 3 FETCH (FLAGS (\\Flagged))\r\n"]
    assert sel._told == {} and not sel.dirty


def test_sessions_share_the_snapshot_memory(store: MessageStore) -> None:
    box = store.open_mailbox(USER)
    for i in range(970):
        box.append(MSG + b"%d\r\n" % i)
    first = select(store.open_mailbox(USER))
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        sels = [select(store.open_mailbox(USER)) for _ in range(20)]
        for sel in sels:
            sel.sync(allow_expunge=True)
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - start) / len(sels)
    finally:
        tracemalloc.stop()
    assert first.exists == 1000
    assert per_session < 16 * 1024, per_session  # a private copy costs ~300 KiB here
    del sels, sel, first, box
    gc.collect()
    # Kept loaded for the next SELECT after its last Mailbox is gone, within the bound.
    assert list(store._snapshots.values()) == list(store._retained.values())
    assert len(store._snapshots) == 1


def test_kept_snapshots_are_bounded(store: MessageStore, monkeypatch: Any) -> None:
    monkeypatch.setattr(facade, "RETAINED_SNAPSHOT_MESSAGES", 30)
    store.create_mailbox(USER, "Other")
    store.open_mailbox(USER)  # 30 messages: kept
    gc.collect()
    assert len(store._snapshots) == 1
    other = store.open_mailbox(USER, "Other")
    other.append(MSG)
    store.open_mailbox(USER, "Other")  # opened last: kept; INBOX would pass the bound
    del other
    gc.collect()
    assert [key[2] for key in store._snapshots] == ["Other"]
    box = store.open_mailbox(USER)  # INBOX again, loaded anew (the bound is checked on open)
    assert len(box.messages()) == 30
    assert sorted(key[2] for key in store._retained) == ["INBOX", "Other"]


def test_a_kept_snapshot_catches_up_with_changes_made_meanwhile(
    store: MessageStore, elsewhere: MessageStore, tmp_path: Path
) -> None:
    box = store.open_mailbox(USER)
    box.set_flags([2], ["\\Seen"], "add")
    del box
    gc.collect()
    assert len(store._retained) == 1
    # Changed while nobody holds the folder: by a writer with a private snapshot (as a
    # delivery thread: a delivery, an expunge) and by another process.
    content = tmp_path / "spooled"
    content.write_bytes(MSG + b"late\r\n")
    assert store.deliver(USER, str(content)) == 31
    private = store.open_mailbox(USER, snapshot=False)
    private.expunge([1])
    far = elsewhere.open_mailbox(USER)
    far.set_flags([3], ["\\Flagged"], "add")
    far.expunge([4])
    far.append(MSG + b"far\r\n")
    again = store.open_mailbox(USER)
    assert [m.uid for m in again.messages()] == [2, 3] + list(range(5, 33))
    assert again.snapshot().uids().tolist() == [2, 3] + list(range(5, 33))
    assert again.messages() == elsewhere.open_mailbox(USER).messages()
    sel = select(store.open_mailbox(USER))
    assert sel.exists == 30
    assert sel.flags_of(2) == ["\\Seen"] and sel.flags_of(3) == ["\\Flagged"]


def test_maildir_targets_are_opened_without_their_messages(store: MessageStore) -> None:
    store._retained.clear()  # no snapshot kept loaded from the fixture's appends
    gc.collect()
    box = open_target(store, USER, "INBOX")
    assert box.snapshot_count() == 0 and box.uidnext == 31
    assert len(box.messages()) == 30
