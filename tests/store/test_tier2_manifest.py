"""Tier-2 manifests: a lost or damaged index gets every tier-2 message back from them."""

from __future__ import annotations

import datetime
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.store import MessageStore
from mailgw.store import manifest as mf
from mailgw.store.blobs import FileBlobStore
from mailgw.store.index import INDEX_NAME
from mailgw.store.migration import MigrationPolicy, Migrator

USER = "alice@example.test"
ZONE = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


def message(i: int) -> bytes:
    return f"From: bob@example.org\r\nSubject: n{i}\r\n\r\n".encode() + b"body %d\r\n" % i * 40


@pytest.fixture
def blobs(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(str(tmp_path / "tier2"))


def new_store(tmp_path: Path, blobs: FileBlobStore) -> MessageStore:
    return MessageStore(str(tmp_path / "mail"), lambda user: None, hostname="mx", tier2=blobs)


@pytest.fixture
def store(tmp_path: Path, blobs: FileBlobStore) -> Iterator[MessageStore]:
    s = new_store(tmp_path, blobs)
    yield s
    s.close()


def migrate_all(store: MessageStore, user: str = USER) -> int:
    report = Migrator(store, MigrationPolicy(after=1.0), clock=lambda: 4e9).run(user)
    assert report.failed == 0
    return report.moved


def user_path(tmp_path: Path) -> Path:
    return tmp_path / "mail" / "example.test" / "alice"


def drop_index(tmp_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = user_path(tmp_path) / (INDEX_NAME + suffix)
        if path.exists():
            path.unlink()


def state(store: MessageStore, user: str = USER) -> dict[str, Any]:
    """Everything a client sees of every folder: UIDVALIDITY and per UID the flags,
    INTERNALDATE with its zone, size and bytes (an empty folder without tier-2 history has no
    manifest: only its emptiness counts)."""
    out: dict[str, Any] = {}
    for name in store.list_mailboxes(user):
        box = store.open_mailbox(user, name)
        messages = {
            m.uid: (m.flags, m.internaldate, m.internaldate_tz, m.size, box.read_message(m.uid))
            for m in box.messages()
        }
        out[name] = (box.uidvalidity, messages) if messages else {}
    return out


def rebuilt(tmp_path: Path, blobs: FileBlobStore, store: MessageStore) -> MessageStore:
    """Close ``store``, delete the index, run reindex in a new store (as the CLI does)."""
    store.close()
    drop_index(tmp_path)
    fresh = new_store(tmp_path, blobs)
    fresh.reindex(USER)
    fresh.close()
    return new_store(tmp_path, blobs)


def fill(store: MessageStore) -> None:
    """INBOX and Projects with system flags, keywords, dates in several zones."""
    store.create_mailbox(USER, "Projects")
    inbox = store.open_mailbox(USER)
    archive = store.open_mailbox(USER, "Projects")
    for i in range(6):
        when = datetime.datetime(2024, 3, 1 + i, 10, 20, 30, tzinfo=ZONE if i % 2 else datetime.UTC)
        flags = [["\\Seen"], ["\\Flagged", "$Important"], [], ["\\Answered", "$Label1", "todo"]][
            i % 4
        ]
        inbox.append(message(i), flags, when)
        archive.append(message(100 + i), ["\\Seen", "$Junk"] if i % 2 else [], when)


def test_lost_index_brings_back_every_tier2_message(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    fill(store)
    assert migrate_all(store) == 12
    before = state(store)
    status = store.mailbox_status(USER, "INBOX")
    store = rebuilt(tmp_path, blobs, store)
    try:
        assert state(store) == before  # same UIDVALIDITY, UIDs, flags, keywords, dates, bytes
        after = store.mailbox_status(USER, "INBOX")
        assert after.uidvalidity == status.uidvalidity
        assert after.uidnext >= status.uidnext and after.highestmodseq > status.highestmodseq
        assert after.messages == status.messages and after.size == status.size
        # nothing is shown as new to the clients
        assert after.recent == 0
    finally:
        store.close()


def test_changes_after_migration_survive_a_lost_index(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    fill(store)
    migrate_all(store)
    inbox = store.open_mailbox(USER)
    uids = [m.uid for m in inbox.messages()]
    inbox.set_flags([uids[0]], ["$Keyword", "\\Deleted"], "add")
    inbox.set_flags([uids[1]], ["\\Flagged"], "remove")
    inbox.set_flags([uids[2]], ["\\Draft"], "set")
    assert inbox.expunge([uids[3]]) == [uids[3]]
    moved = inbox.move_to([uids[4]], "Projects")
    copied = inbox.copy_to([uids[5]], "Trash")
    store.rename_mailbox(USER, "Projects", "Old/Projects")
    assert moved and copied
    before = state(store)
    assert "Projects" not in before and len(before["Old/Projects"][1]) == 7
    store = rebuilt(tmp_path, blobs, store)
    try:
        assert state(store) == before
    finally:
        store.close()


def test_tier1_messages_of_a_rebuilt_folder_get_new_uids_and_old_ones_vanish(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    inbox = store.open_mailbox(USER)
    old = [inbox.append(message(i)) for i in range(3)]
    migrate_all(store)
    late = [inbox.append(message(10 + i), ["\\Seen"]) for i in range(3)]  # tier 1
    inbox.expunge([late[0]])
    status = store.mailbox_status(USER, "INBOX")
    store = rebuilt(tmp_path, blobs, store)
    try:
        box = store.open_mailbox(USER)
        assert box.uidvalidity == status.uidvalidity
        by_uid = {m.uid: m for m in box.messages()}
        assert [u for u in by_uid if by_uid[u].blob is not None] == old
        renumbered = [u for u in by_uid if by_uid[u].blob is None]
        # never a UID handed out before under this UIDVALIDITY (the expunged one included)
        assert len(renumbered) == 2 and min(renumbered) >= status.uidnext
        assert {box.read_message(u) for u in renumbered} == {message(11), message(12)}
        assert all(by_uid[u].flags == {"\\Seen"} for u in renumbered)
        # a QRESYNC client hears that the old tier-1 UIDs are gone
        _changed, vanished = box.changes_since(status.highestmodseq)
        assert set(late) <= set(vanished) and not set(old) & set(vanished)
    finally:
        store.close()


def test_reserved_uids_are_never_handed_out_again(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mf, "UID_RESERVE", 2)
    monkeypatch.setattr(mf, "MODSEQ_RESERVE", 2)
    inbox = store.open_mailbox(USER)
    inbox.append(message(0))
    migrate_all(store)
    gone = [inbox.append(message(i)) for i in range(1, 9)]
    inbox.expunge(gone)
    status = store.mailbox_status(USER, "INBOX")
    store = rebuilt(tmp_path, blobs, store)
    try:
        box = store.open_mailbox(USER)
        assert box.uidvalidity == status.uidvalidity and box.uidnext >= status.uidnext
        assert box.highestmodseq > status.highestmodseq
        assert box.append(message(50)) >= status.uidnext
    finally:
        store.close()


def log_path(tmp_path: Path, folder: str = "") -> Path:
    return user_path(tmp_path) / folder / mf.LOG_NAME


def test_uncommitted_tail_is_cut_before_the_next_append(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    inbox = store.open_mailbox(USER)
    uid = inbox.append(message(1))
    migrate_all(store)
    # what a transaction that died between its manifest fsync and its COMMIT leaves behind
    ghost = mf.put(999, "0" * 64, 10, "", 0.0, 0, "ghost", "new/ghost")
    with open(log_path(tmp_path), "ab") as fh:
        fh.write(mf.encode(ghost))
    inbox.set_flags([uid], ["\\Seen"], "add")
    found = mf.read(str(log_path(tmp_path)))
    assert found is not None and 999 not in found.messages
    assert found.messages[uid]["flags"] == "\\Seen"
    store = rebuilt(tmp_path, blobs, store)
    try:
        assert [(m.uid, m.flags) for m in store.open_mailbox(USER).messages()] == [
            (uid, {"\\Seen"})
        ]
    finally:
        store.close()


def test_torn_and_damaged_lines_are_skipped(tmp_path: Path, blobs: FileBlobStore) -> None:
    head = mf.encode(mf.header(7, "g"))
    a = mf.encode(mf.put(1, "a" * 64, 5, "\\Seen", 1.5, 60, "b1", "new/b1"))
    b = mf.encode(mf.put(2, "b" * 64, 5, "", 2.5, 0, "b2", "new/b2"))
    damaged = b.replace(b'"size":5', b'"size":6')
    found = mf.parse([head, a, damaged, mf.encode(mf.set_flags(1, "")), b[:-3]])
    assert found is not None and found.uidvalidity == 7 and found.damaged == 1
    assert set(found.messages) == {1} and found.messages[1]["flags"] == ""
    assert found.size == len(head) + len(a) + len(damaged) + len(mf.encode(mf.set_flags(1, "")))
    assert mf.parse([a]) is None  # no header
    assert mf.parse([damaged[:-1] + b"x\n"]) is None


def test_log_stays_small_and_is_rewritten_when_lost(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mf, "COMPACT_MIN", 4096)
    inbox = store.open_mailbox(USER)
    uids = [inbox.append(message(i)) for i in range(5)]
    migrate_all(store)
    for i in range(400):
        inbox.set_flags(uids, ["\\Seen"], "add" if i % 2 else "remove")
    size = os.path.getsize(log_path(tmp_path))
    assert size < 3 * 4096  # compacted, not 2,000 flag records
    # a lost (or foreign) log is written again from the index at the next change
    log_path(tmp_path).unlink()
    inbox.set_flags([uids[0]], ["$Again"], "add")
    found = mf.read(str(log_path(tmp_path)))
    assert found is not None and sorted(found.messages) == uids
    assert found.messages[uids[0]]["flags"] == "$Again \\Seen"
    before = state(store)
    store = rebuilt(tmp_path, blobs, store)
    try:
        assert state(store) == before
    finally:
        store.close()


def test_index_from_before_manifests_gets_them_on_open(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    fill(store)
    migrate_all(store)
    before = state(store)
    store.close()
    for folder in ("", ".Projects"):
        log_path(tmp_path, folder).unlink()
    conn = sqlite3.connect(user_path(tmp_path) / INDEX_NAME)
    with conn:
        conn.execute("UPDATE mailboxes SET t2_log_gen = NULL")
        conn.execute("DELETE FROM meta WHERE key = 'tier2_manifests'")
    conn.close()
    store = new_store(tmp_path, blobs)
    store.list_mailboxes(USER)
    assert log_path(tmp_path).exists() and log_path(tmp_path, ".Projects").exists()
    store = rebuilt(tmp_path, blobs, store)
    try:
        assert state(store) == before
    finally:
        store.close()


def test_corrupt_index_is_rebuilt_with_tier2(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    fill(store)
    migrate_all(store)
    before = state(store)
    store.close()
    index = user_path(tmp_path) / INDEX_NAME
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    fresh = new_store(tmp_path, blobs)
    assert fresh.reindex(USER) == 12
    fresh.close()
    store = new_store(tmp_path, blobs)
    try:
        assert state(store) == before
    finally:
        store.close()


def test_promoted_message_leaves_the_manifest(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore
) -> None:
    inbox = store.open_mailbox(USER)
    a, b = inbox.append(message(1)), inbox.append(message(2))
    migrate_all(store)
    assert store.promote_message(USER, "INBOX", a)
    found = mf.read(str(log_path(tmp_path)))
    assert found is not None and sorted(found.messages) == [b]
    store = rebuilt(tmp_path, blobs, store)
    try:
        box = store.open_mailbox(USER)
        got = {box.read_message(m.uid): m for m in box.messages()}
        assert sorted(got) == [message(1), message(2)]  # one copy each
        assert got[message(2)].uid == b and got[message(2)].blob is not None
        assert got[message(1)].blob is None
    finally:
        store.close()


# -- kill -9 at every step of a migration --------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from mailgw.store import MessageStore, blobs as blobs_mod, tier1, tier2 as tier2_mod
    from mailgw.store.blobs import FileBlobStore
    from mailgw.store.migration import MigrationPolicy, Migrator

    root, tier2, point, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}

    def die_after(func):
        def wrapper(*args, **kwargs):
            result = func(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] > after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    def die_before(func):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                os.kill(os.getpid(), signal.SIGKILL)
            return func(*args, **kwargs)
        return wrapper

    if point == "blob":  # blobs written, index not switched
        blobs_mod.put_message = die_after(blobs_mod.put_message)
    elif point == "manifest":  # manifest record fsynced, COMMIT not done
        P = tier2_mod.Tier2Placement
        P._append_manifest = die_after(P._append_manifest)
    elif point == "unlink":  # COMMIT done, Maildir file not unlinked
        B = tier1.MaildirBackend
        B.unlink = die_before(B.unlink)
    store = MessageStore(root, lambda u: None, hostname="mx", tier2=FileBlobStore(tier2))
    Migrator(store, MigrationPolicy(after=1.0), clock=lambda: 4e9).run()
    """
)


@pytest.mark.parametrize("point", ["blob", "manifest", "unlink"])
def test_kill_9_during_migration_then_lost_index_loses_nothing(
    tmp_path: Path, blobs: FileBlobStore, store: MessageStore, point: str
) -> None:
    inbox = store.open_mailbox(USER)
    expected = {
        inbox.append(message(i), ["\\Seen", "$k"] if i % 2 else []): message(i) for i in range(6)
    }
    store.close()
    for after in (2, 1):  # die while migrating the third, then the second of the rest
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "mail"), blobs.root, point, str(after)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # the index survived: everything there, once
    store = new_store(tmp_path, blobs)
    box = store.open_mailbox(USER)
    assert {m.uid: box.read_message(m.uid) for m in box.messages()} == expected
    # and after the index is lost too
    store = rebuilt(tmp_path, blobs, store)
    try:
        box = store.open_mailbox(USER)
        got = {m.uid: box.read_message(m.uid) for m in box.messages()}
        assert sorted(got.values()) == sorted(expected.values())  # nothing lost, no duplicate
        tier2 = {m.uid for m in box.messages() if m.blob is not None}
        assert {u: got[u] for u in tier2} == {u: expected[u] for u in tier2}  # same UIDs
        assert len(tier2) >= 2
        for m in box.messages():
            if m.uid in tier2:
                assert m.flags == ({"\\Seen", "$k"} if m.uid % 2 == 0 else set())
        assert migrate_all(store) == 6 - len(tier2)
    finally:
        store.close()
