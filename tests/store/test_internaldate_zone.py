"""Tests for the internal date's zone in the store: APPEND keeps it, COPY/MOVE/RENAME INBOX and
tier 2 carry it, deliveries get the server's zone, old indexes upgrade with +0000."""

from __future__ import annotations

import datetime
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.store import MessageStore, rows
from mailgw.store.blobs import FileBlobStore
from mailgw.store.index import INDEX_NAME, UserIndex

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: zone\r\n\r\n" + b"body\r\n" * 20
EST = datetime.timezone(datetime.timedelta(hours=-5))
# 01-Jan-2020 23:30:00 -0500 is 2 January 04:30 UTC.
WHEN = datetime.datetime(2020, 1, 1, 23, 30, tzinfo=EST)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    s = MessageStore(
        str(tmp_path / "mail"),
        lambda user: None,
        hostname="mx.example",
        tier2=FileBlobStore(str(tmp_path / "tier2")),
    )
    yield s
    s.close()


@pytest.fixture
def server_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process runs at UTC+02:30 (a POSIX TZ string: no tz database needed)."""
    monkeypatch.setenv("TZ", "XYZ-02:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def zones(store: MessageStore, folder: str = "INBOX") -> list[tuple[float, int]]:
    return [
        (m.internaldate, m.internaldate_tz) for m in store.open_mailbox(USER, folder).messages()
    ]


def test_split_internaldate() -> None:
    assert rows.split_internaldate(None) == (None, None)
    assert rows.split_internaldate(WHEN) == (WHEN.timestamp(), -300)
    assert rows.split_internaldate(1_600_000_000) == (1_600_000_000.0, 0)
    plus = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(minutes=345)))
    assert rows.split_internaldate(plus)[1] == 345
    with pytest.raises(ValueError, match="no time zone"):
        rows.split_internaldate(datetime.datetime(2020, 1, 1))


def test_append_keeps_the_zone_through_copy_move_and_reopen(
    store: MessageStore, tmp_path: Path
) -> None:
    store.create_mailbox(USER, "A")
    store.create_mailbox(USER, "B")
    box = store.open_mailbox(USER)
    uid = box.append(MSG, ["\\Seen"], WHEN)
    info = box.messages()[-1]
    assert (info.internaldate, info.internaldate_tz) == (WHEN.timestamp(), -300)
    # The file's mtime is the instant.
    path = tmp_path / "mail" / "example.test" / "alice" / info.filename
    assert path.stat().st_mtime == WHEN.timestamp()
    # A flag change keeps it.
    box.set_flags([uid], ["\\Flagged"], "add")
    assert zones(store) == [(WHEN.timestamp(), -300)]
    # COPY (tier 1), then MOVE.
    assert box.copy_to([uid], "A") == [(uid, 1)]
    assert zones(store, "A") == [(WHEN.timestamp(), -300)]
    a = store.open_mailbox(USER, "A")
    assert a.move_to([1], "B") == [(1, 1)]
    assert zones(store, "A") == []
    assert zones(store, "B") == [(WHEN.timestamp(), -300)]
    # A fresh process (new store, same index) reads the column.
    store.close()
    again = MessageStore(str(tmp_path / "mail"), lambda user: None, hostname="mx.example")
    try:
        assert zones(again) == zones(again, "B") == [(WHEN.timestamp(), -300)]
        # reindex keeps the rows of files it knows.
        again.reindex(USER)
        assert zones(again, "B") == [(WHEN.timestamp(), -300)]
    finally:
        again.close()


def test_append_messages_and_numbers(store: MessageStore) -> None:
    _, uids = store.append_messages(USER, "INBOX", [(MSG, [], WHEN), (MSG, [], 1_600_000_000.0)])
    assert uids == [1, 2]
    assert zones(store) == [(WHEN.timestamp(), -300), (1_600_000_000.0, 0)]
    with pytest.raises(ValueError):
        store.append_messages(USER, "INBOX", [(MSG, [], datetime.datetime(2020, 1, 1))])
    assert len(zones(store)) == 2


def test_rename_inbox_keeps_the_zone(store: MessageStore) -> None:
    store.open_mailbox(USER).append(MSG, (), WHEN)
    store.rename_mailbox(USER, "INBOX", "Old")
    assert zones(store) == []
    assert zones(store, "Old") == [(WHEN.timestamp(), -300)]


def test_tier2_migrate_copy_promote_keep_the_zone(store: MessageStore) -> None:
    store.create_mailbox(USER, "A")
    box = store.open_mailbox(USER)
    uid = box.append(MSG, (), WHEN)
    assert store.migrate_message(USER, "INBOX", uid)
    assert box.messages()[0].blob is not None
    assert zones(store) == [(WHEN.timestamp(), -300)]
    # COPY of a tier-2 message: a new row sharing the blob (_place_blob).
    assert box.copy_to([uid], "A") == [(uid, 1)]
    copied = store.open_mailbox(USER, "A").messages()[0]
    assert copied.blob is not None
    assert (copied.internaldate, copied.internaldate_tz) == (WHEN.timestamp(), -300)
    assert store.promote_message(USER, "INBOX", uid)
    promoted = store.open_mailbox(USER).messages()[0]
    assert promoted.blob is None
    assert (promoted.internaldate, promoted.internaldate_tz) == (WHEN.timestamp(), -300)


def test_delivery_and_foreign_files_get_the_server_zone(
    store: MessageStore, tmp_path: Path, server_zone: None
) -> None:
    spool = tmp_path / "spool"
    spool.write_bytes(MSG)
    store.deliver(USER, str(spool))
    # An APPEND without a date is "now" in the server's zone too.
    store.open_mailbox(USER).append(MSG)
    # A file dropped in by another Maildir program.
    foreign = tmp_path / "mail" / "example.test" / "alice" / "new" / "1.foreign.host"
    foreign.write_bytes(MSG)
    os.utime(foreign, (1_600_000_000, 1_600_000_000))
    got = zones(store)
    assert [tz for _, tz in got] == [150, 150, 150]
    assert got[2][0] == 1_600_000_000


def test_delivery_on_a_utc_server_is_plus_zero(
    store: MessageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    try:
        spool = tmp_path / "spool"
        spool.write_bytes(MSG)
        store.deliver(USER, str(spool))
        assert zones(store)[0][1] == 0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_old_index_without_the_column_upgrades_with_zero(tmp_path: Path) -> None:
    path = str(tmp_path / INDEX_NAME)
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE messages (mailbox INTEGER NOT NULL, uid INTEGER NOT NULL,"
        " base TEXT NOT NULL, filename TEXT NOT NULL, size INTEGER NOT NULL,"
        " flags TEXT NOT NULL DEFAULT '', internaldate REAL NOT NULL, modseq INTEGER NOT NULL,"
        " blob TEXT, PRIMARY KEY (mailbox, uid)) WITHOUT ROWID;"
        "INSERT INTO messages VALUES (1, 7, 'b', 'new/b', 3, '', 1600000000.5, 2, NULL);"
    )
    conn.commit()
    conn.close()
    index = UserIndex(path)
    try:
        row = index.conn.execute(
            f"SELECT {rows.ROW_COLUMNS} FROM messages WHERE uid = 7"
        ).fetchone()
        info = rows.info_from_row(row)
        assert (info.uid, info.internaldate, info.internaldate_tz) == (7, 1600000000.5, 0)
    finally:
        index.close()
