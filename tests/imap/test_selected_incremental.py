"""Tests for SelectedMailbox.sync's incremental path: the untagged updates come from the
index's changes since the last sync, equal to those of a full comparison."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.imap.selected import SelectedMailbox
from mailgw.imap.session import _open_target
from mailgw.store import MessageStore
from mailgw.store.index import INDEX_NAME

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


class NoSnapshotLookup:
    """A mailbox offering only the common API: SelectedMailbox compares everything."""

    def __init__(self, mailbox: Any) -> None:
        self._mailbox = mailbox

    def __getattr__(self, name: str) -> Any:
        if name in ("snapshot_info", "snapshot_count"):
            raise AttributeError(name)
        return getattr(self._mailbox, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), lambda u: None, hostname="mx.example")
    box = s.open_mailbox(USER)
    for i in range(30):
        box.append(MSG + b"%d\r\n" % i, ["\\Seen"] if i % 3 == 0 else [])
    yield s
    s.close()


def select(mailbox: Any, condstore: bool = False) -> SelectedMailbox:
    return SelectedMailbox(mailbox, False, lambda uids: set(), condstore=condstore)


def forbid_full_scan(monkeypatch: pytest.MonkeyPatch, sel: SelectedMailbox) -> None:
    def scan() -> list[object]:
        raise AssertionError("messages() read on an incremental sync")

    monkeypatch.setattr(sel.mailbox, "messages", scan)


@pytest.mark.parametrize("condstore", [False, True])
def test_incremental_sync_equals_full_comparison(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch, condstore: bool
) -> None:
    fast = select(store.open_mailbox(USER), condstore)
    slow = select(NoSnapshotLookup(store.open_mailbox(USER)), condstore)
    forbid_full_scan(monkeypatch, fast)
    other = store.open_mailbox(USER)
    other.set_flags([4, 10], ["\\Flagged", "$Work"], "add")
    other.expunge([20, 21])
    other.append(MSG, ["$New"])
    held = fast.sync(allow_expunge=False)
    assert held == slow.sync(allow_expunge=False)
    assert b"* FLAGS (" in held[0] and b"$New" in held[0] and b"$Work" in held[0]
    assert b"* 31 EXISTS\r\n" in held
    assert any(line.startswith(b"* 10 FETCH (FLAGS (\\Flagged \\Seen $Work)") for line in held)
    assert not any(b"EXPUNGE" in line for line in held)
    other.set_flags([5], ["\\Answered"], "add")
    released = fast.sync(allow_expunge=True)
    assert released == slow.sync(allow_expunge=True)
    assert released[:2] == [b"* 21 EXPUNGE\r\n", b"* 20 EXPUNGE\r\n"]
    assert any(line.startswith(b"* 5 FETCH (FLAGS (\\Answered)") for line in released)
    assert fast.uids == slow.uids and fast.exists == 29
    assert fast.sync(allow_expunge=True) == []


def test_own_changes_are_not_reported_again(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sel = select(store.open_mailbox(USER))
    forbid_full_scan(monkeypatch, sel)
    for info in sel.mailbox.set_flags([2], ["\\Deleted"], "add").values():
        sel.update_info(info)
    assert sel.sync(allow_expunge=True) == []
    sel.mailbox.expunge([2])
    assert sel.sync(allow_expunge=True) == [b"* 2 EXPUNGE\r\n"]
    assert sel.exists == 29


def test_unexplained_difference_falls_back_to_full_comparison(
    store: MessageStore, tmp_path: Path
) -> None:
    sel = select(store.open_mailbox(USER))
    info = sel.infos[7]
    (tmp_path / "mail" / "example.test" / "alice" / info.filename).unlink()
    conn = sqlite3.connect(str(tmp_path / "mail" / "example.test" / "alice" / INDEX_NAME))
    with conn:  # a row dropped without a tombstone: the index explains nothing
        conn.execute("DELETE FROM messages WHERE uid = 7")
        conn.execute(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1,"
            " message_count = message_count - 1 WHERE name = 'INBOX'"
        )
    conn.close()
    assert sel.sync(allow_expunge=True) == [b"* 7 EXPUNGE\r\n"]
    assert 7 not in sel.uids


def test_dirty_selection_compares_everything(store: MessageStore) -> None:
    sel = select(store.open_mailbox(USER))
    calls: list[int] = []
    original = sel.mailbox.messages

    def counting() -> list[object]:
        calls.append(1)
        return list(original())

    sel.mailbox.messages = counting
    sel.dirty = True
    assert sel.sync(allow_expunge=True) == []
    assert calls == [1] and not sel.dirty


def test_targets_of_other_stores_are_opened_plainly() -> None:
    class OtherStore:
        def open_mailbox(self, user: str, name: str = "INBOX") -> tuple[str, str]:
            return user, name

    assert _open_target(OtherStore(), USER, "Sent") == (USER, "Sent")


def test_maildir_targets_are_opened_without_their_messages(store: MessageStore) -> None:
    box = _open_target(store, USER, "INBOX")
    assert box.snapshot_count() == 0 and box.uidnext == 31
    assert len(box.messages()) == 30
