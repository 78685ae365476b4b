"""Tests for tier 2: blob store, migration (crash safety, dedup, expunge races), verify/gc/stats."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgw.spool.threads import run_inline
from mailgw.store import MessageStore
from mailgw.store import maildirstore as mds
from mailgw.store.blobs import BlobCorrupt, BlobNotFound, BlobRef, FileBlobStore, check_digest
from mailgw.store.migration import (
    MigrationPolicy,
    MigrationService,
    Migrator,
    gc,
    parse_watermark,
    stats,
    verify,
)

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\n" + b"Hello tier two\r\n" * 50


class Quotas:
    def __init__(self) -> None:
        self.limits: dict[str, int | None] = {}

    def __call__(self, user: str) -> int | None:
        return self.limits.get(user)


@pytest.fixture
def blobs(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(str(tmp_path / "tier2"))


@pytest.fixture
def store(tmp_path: Path, blobs: FileBlobStore) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), Quotas(), hostname="mx.example", tier2=blobs)
    yield s
    s.close()


def everything(store: MessageStore) -> Migrator:
    return Migrator(store, MigrationPolicy(after=1.0), clock=lambda: 4e9)


def folder_files(store: MessageStore, user: str = USER, folder: str = "") -> list[str]:
    local, domain = user.split("@")
    path = os.path.join(store.root, domain, local, folder)
    return sorted(os.listdir(os.path.join(path, "new")) + os.listdir(os.path.join(path, "cur")))


# -- blob store ---------------------------------------------------------------------------------


def test_blob_roundtrip_dedup_and_layout(blobs: FileBlobStore, tmp_path: Path) -> None:
    ref = blobs.put(MSG)
    assert isinstance(ref, BlobRef) and ref.size == len(MSG) and str(ref) == ref.digest
    path = blobs.path(ref)
    assert path == os.path.join(blobs.root, ref.digest[:2], ref.digest[2:4], ref.digest + ".zst")
    assert os.path.getsize(path) < len(MSG)  # compressed
    os.utime(path, (1, 1))
    again = blobs.put(open_bytes(MSG))
    assert again == ref
    assert os.stat(path).st_mtime > 1  # reuse refreshes the mtime (gc grace)
    assert blobs.get(ref) == MSG
    with blobs.open(ref.digest) as fh:
        assert fh.read() == MSG
    assert list(blobs.iter_refs()) == [ref.digest]
    assert os.listdir(os.path.join(blobs.root, "tmp")) == []
    assert blobs.exists(ref) and blobs.delete(ref) and not blobs.exists(ref)
    assert not blobs.delete(ref)
    with pytest.raises(BlobNotFound):
        blobs.get(ref)
    with pytest.raises(BlobNotFound):
        blobs.stat(ref)
    with pytest.raises(ValueError):
        check_digest("../etc/passwd")
    empty = blobs.put(b"")
    assert blobs.get(empty) == b""


def open_bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_blob_corruption_is_detected(blobs: FileBlobStore) -> None:
    ref = blobs.put(MSG)
    other = blobs.put(b"something else entirely\r\n")
    path = blobs.path(ref)
    # a valid zstd frame holding other bytes: decompresses fine, hash does not match
    os.replace(blobs.path(other), path)
    with pytest.raises(BlobCorrupt, match="content hash"):
        blobs.get(ref)
    with open(blobs.path(blobs.put(MSG)), "rb") as fh:
        data = bytearray(fh.read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(BlobCorrupt):
        blobs.open(ref)
    with open(path, "wb") as fh:
        fh.write(b"not zstd at all")
    with pytest.raises(BlobCorrupt):
        blobs.get(ref)


def test_blob_put_failure_leaves_nothing(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        blobs.put(MSG)
    monkeypatch.undo()
    assert list(blobs.iter_refs()) == []
    assert os.listdir(os.path.join(blobs.root, "tmp")) == []


def test_blob_clean_tmp(blobs: FileBlobStore) -> None:
    old = os.path.join(blobs.root, "tmp", "crashed.zst")
    young = os.path.join(blobs.root, "tmp", "busy.zst")
    for p in (old, young):
        open(p, "wb").close()
    os.utime(old, (1, 1))
    assert blobs.clean_tmp(60) == 1
    assert os.listdir(os.path.join(blobs.root, "tmp")) == ["busy.zst"]


def test_large_blob_spills_and_streams(blobs: FileBlobStore) -> None:
    big = os.urandom(1 << 20) * 9  # over SPOOL_MAX
    ref = blobs.put(big)
    with blobs.open(ref) as fh:
        assert fh.read() == big


# -- migration through the store ----------------------------------------------------------------


def test_migrated_messages_read_the_same(store: MessageStore, blobs: FileBlobStore) -> None:
    box = store.open_mailbox(USER)
    uids = [box.append(MSG + bytes([65 + i]), ["\\Seen"] if i % 2 else []) for i in range(4)]
    before = {m.uid: m for m in box.messages()}
    used = store.quota_usage(USER)[0]
    report = everything(store).run()
    assert report.moved == 4 and report.bytes == sum(m.size for m in before.values())
    assert folder_files(store) == []
    box.refresh()
    for m in box.messages():
        old = before[m.uid]
        assert m.blob is not None
        assert (m.size, m.flags, m.internaldate) == (old.size, old.flags, old.internaldate)
        assert box.read_message(m.uid) == MSG + bytes([65 + uids.index(m.uid)])
    assert store.quota_usage(USER)[0] == used
    # idempotent: a second run finds nothing
    assert everything(store).run().moved == 0
    # flags on a tier-2 message live in the index
    box.set_flags([uids[0]], ["\\Flagged", "$Work"], "add")
    assert {m.uid: m.flags for m in box.messages()}[uids[0]] == {"\\Flagged", "$Work"}
    store.reindex(USER)  # keeps tier-2 rows
    box = store.open_mailbox(USER)
    assert [m.uid for m in box.messages()] == uids
    assert box.read_message(uids[0]) == MSG + b"A"
    status = store.mailbox_status(USER, "INBOX")
    assert status.messages == 4 and status.unseen == 2


def test_stale_snapshot_reads_a_message_migrated_meanwhile(store: MessageStore) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    other = store.open_mailbox(USER)
    assert store.migrate_message(USER, "INBOX", uid)
    assert other.messages()[0].blob is None  # snapshot not refreshed
    assert other.read_message(uid) == MSG


def test_crash_after_switch_before_unlink(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)

    def crash(self: Any, f: Any, filename: str) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(mds.MessageStore, "_unlink_message", crash)
    with pytest.raises(KeyboardInterrupt):
        store.migrate_message(USER, "INBOX", uid)
    monkeypatch.undo()
    assert len(folder_files(store)) == 1  # the redundant tier-1 file is still there
    box.refresh()  # the next sync removes it instead of indexing it as a new message
    assert folder_files(store) == []
    assert [(m.uid, m.blob is not None) for m in box.messages()] == [(uid, True)]
    assert box.read_message(uid) == MSG


def test_crash_after_blob_before_switch(
    store: MessageStore, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    real_put = blobs.put

    def put_then_die(data: Any) -> BlobRef:
        real_put(data)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(blobs, "put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.migrate_message(USER, "INBOX", uid)
    monkeypatch.undo()
    box.refresh()
    assert box.messages()[0].blob is None and len(folder_files(store)) == 1
    assert everything(store).run().moved == 1  # the next run finishes, same blob
    assert len(list(blobs.iter_refs())) == 1
    assert box.read_message(uid) == MSG


def test_expunge_between_blob_and_switch(
    store: MessageStore, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    keep = box.append(MSG + b"keep")
    real_put = blobs.put

    def put_and_race(data: Any) -> BlobRef:
        ref = real_put(data)
        if store.open_mailbox(USER).messages()[0].uid == uid:
            store.open_mailbox(USER).expunge([uid])
        return ref

    monkeypatch.setattr(blobs, "put", put_and_race)
    assert store.migrate_message(USER, "INBOX", uid) is False
    monkeypatch.undo()
    box.refresh()
    assert [m.uid for m in box.messages()] == [keep]
    orphans = verify(store, blobs).orphans
    assert len(orphans) == 1
    assert gc(store, blobs, grace=3600) == []  # too young
    assert gc(store, blobs, grace=0, clock=lambda: 4e9) == orphans
    assert list(blobs.iter_refs()) == []


def test_concurrent_expunge_during_migration(store: MessageStore, blobs: FileBlobStore) -> None:
    box = store.open_mailbox(USER)
    uids = [box.append(MSG + str(i).encode()) for i in range(300)]
    victims = set(uids[::3])
    migrator = everything(store)
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            migrator.run()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=migrate)
    t.start()
    other = store.open_mailbox(USER)
    for uid in sorted(victims):
        other.expunge([uid])
    t.join()
    assert errors == []
    everything(store).run()
    box.refresh()
    remaining = {m.uid for m in box.messages()}
    assert remaining == set(uids) - victims
    assert all(m.blob is not None for m in box.messages())
    assert folder_files(store) == []
    for uid in sorted(remaining)[:20]:
        assert box.read_message(uid) == MSG + str(uids.index(uid)).encode()
    gc(store, blobs, grace=0, clock=lambda: 4e9)
    report = verify(store, blobs)
    assert report.ok and report.orphans == []
    assert report.checked == len(remaining)


def test_expunge_of_tier2_message_removes_leftover(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    monkeypatch.setattr(mds.MessageStore, "_unlink_message", lambda *a: None)
    store.migrate_message(USER, "INBOX", uid)
    monkeypatch.undo()
    assert len(folder_files(store)) == 1
    assert box.expunge([uid]) == [uid]
    assert folder_files(store) == []
    box.refresh()
    assert box.messages() == []  # not resurrected


def test_copy_move_rename_delete_with_tier2(store: MessageStore, blobs: FileBlobStore) -> None:
    box = store.open_mailbox(USER)
    uids = [box.append(MSG + str(i).encode(), ["\\Seen"]) for i in range(3)]
    everything(store).run()
    box.refresh()
    pairs = box.copy_to(uids[:2], "Archive")
    arch = store.open_mailbox(USER, "Archive")
    assert [m.blob for m in arch.messages()] == [m.blob for m in box.messages()][:2]
    assert arch.read_message(pairs[0][1]) == MSG + b"0"
    assert len(list(blobs.iter_refs())) == 3  # shared, not copied
    moved = box.move_to([uids[2]], "Trash")
    trash = store.open_mailbox(USER, "Trash")
    assert trash.read_message(moved[0][1]) == MSG + b"2"
    store.rename_mailbox(USER, "Archive", "Old")
    assert store.open_mailbox(USER, "Old").read_message(pairs[1][1]) == MSG + b"1"
    store.delete_mailbox(USER, "Old")
    report = verify(store, blobs)
    assert report.ok and report.orphans == []  # INBOX still refers to them
    box.expunge(uids)
    assert len(verify(store, blobs).orphans) == 2


def test_promote(tmp_path: Path, blobs: FileBlobStore) -> None:
    store = MessageStore(
        str(tmp_path / "mail"), Quotas(), hostname="mx.example", tier2=blobs, promote_on_read=True
    )
    box = store.open_mailbox(USER)
    uid = box.append(MSG, ["\\Answered"])
    assert store.migrate_message(USER, "INBOX", uid)
    assert store.migrate_message(USER, "INBOX", uid) is False
    assert box.read_message(uid) == MSG  # read from tier 2, promoted back
    box.refresh()
    info = box.messages()[0]
    assert info.blob is None and info.filename.endswith(":2,R") and info.uid == uid
    assert box.read_message(uid) == MSG
    assert folder_files(store) == [info.filename.split("/")[1]]
    assert store.promote_message(USER, "INBOX", uid) is False
    store.close()


def test_corrupt_blob_reads_as_error(store: MessageStore, blobs: FileBlobStore) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    everything(store).run()
    digest = store.open_mailbox(USER).messages()[0].blob
    assert digest
    path = blobs.path(digest)
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[-6] ^= 0x55
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(BlobCorrupt):
        box.read_message(uid)
    report = verify(store, blobs)
    assert report.corrupt == [digest] and not report.ok
    os.unlink(path)
    with pytest.raises(BlobNotFound):
        box.read_message(uid)
    assert verify(store, blobs).missing == [(digest, USER, uid, "INBOX")]


def test_tier2_message_without_tier2_configured(tmp_path: Path, store: MessageStore) -> None:
    uid = store.open_mailbox(USER).append(MSG)
    everything(store).run()
    store.close()
    plain = MessageStore(store.root, Quotas(), hostname="mx.example")
    with pytest.raises(OSError, match="tier2_dir"):
        plain.open_mailbox(USER).read_message(uid)
    with pytest.raises(OSError):
        plain.migrate_message(USER, "INBOX", uid)
    plain.close()


# -- many users, duplicates, stats ----------------------------------------------------------------


def test_migration_of_5000_messages_with_dedup(
    tmp_path: Path, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: durability is tested elsewhere
    store = MessageStore(str(tmp_path / "mail"), Quotas(), hostname="mx.example", tier2=blobs)
    users = [f"u{i}@example.test" for i in range(10)]
    bodies = [MSG + b"announcement %d\r\n" % i for i in range(40)]
    expected: dict[tuple[str, int], bytes] = {}
    for user in users:
        box = store.open_mailbox(user)
        for i in range(500):
            body = bodies[i % 40] if i % 5 else MSG + f"{user} private {i}\r\n".encode()
            expected[(user, box.append(body))] = body
    logical = sum(len(b) for b in expected.values())
    report = everything(store).run()
    assert report.moved == 5000 and report.failed == 0
    st = stats(store, blobs)
    unique = {b for b in expected.values()}
    assert st["tier1"].messages == 0
    assert st["tier2"].messages == 5000 and st["tier2"].logical == logical
    assert st["tier2"].blobs == len(unique) == 32 + 1000  # bodies i % 40 with i % 5 != 0
    assert st["tier2"].unique_logical == sum(len(b) for b in unique)
    assert st["tier2"].dedup_ratio == pytest.approx(logical / sum(len(b) for b in unique))
    assert st["tier2"].stored < st["tier2"].unique_logical
    for (user, uid), body in list(expected.items())[::97]:
        assert store.open_mailbox(user).read_message(uid) == body
    assert all(folder_files(store, u) == [] for u in users)
    store.close()


# -- policy and the service -------------------------------------------------------------------


def test_policy_by_age_folder_size_and_watermarks(store: MessageStore) -> None:
    box = store.open_mailbox(USER)
    old = box.append(MSG, internaldate=1000.0)
    new_small = box.append(b"tiny", internaldate=5000.0)
    new_big = box.append(MSG * 3, internaldate=6000.0)
    archived = store.open_mailbox(USER, "Archive").append(MSG, internaldate=7000.0)

    def uids(policy: MigrationPolicy, usage: tuple[int, int] = (100, 10)) -> list[Any]:
        m = Migrator(store, policy, clock=lambda: 8000.0, disk_usage=lambda p: usage)
        return [(c.folder, c.uid) for c in m.candidates(USER)]

    assert uids(MigrationPolicy()) == []
    assert uids(MigrationPolicy(after=3001)) == [("INBOX", old)]
    assert uids(MigrationPolicy(folders=("Archive",))) == [("Archive", archived)]
    assert uids(MigrationPolicy(after=1, min_size=100)) == [
        ("INBOX", old),
        ("INBOX", new_big),
        ("Archive", archived),
    ]
    total = store.quota_usage(USER)[0]
    high = parse_watermark(str(total - 1))
    low = parse_watermark(str(total - len(MSG) - 4))
    assert uids(MigrationPolicy(high_watermark=high, low_watermark=low)) == [
        ("INBOX", old),
        ("INBOX", new_small),
    ]
    assert uids(MigrationPolicy(high_watermark=parse_watermark(str(total)))) == []
    pct = MigrationPolicy(
        high_watermark=parse_watermark("80%"), low_watermark=parse_watermark("79%")
    )
    assert uids(pct, usage=(1000, 800)) == []
    assert uids(pct, usage=(1000, 801)) == [("INBOX", old)]
    assert uids(pct, usage=(10**6, 10**6)) == [
        ("INBOX", old),
        ("INBOX", new_small),
        ("INBOX", new_big),
        ("Archive", archived),
    ]
    assert parse_watermark(" ") is None
    with pytest.raises(ValueError):
        parse_watermark("120%")
    with pytest.raises(ValueError):
        parse_watermark("lots")


def test_policy_from_config() -> None:
    from mailgw.config import load

    class Cfg:
        migrate_after = 86400.0
        migrate_folders = ("Archive",)
        migrate_min_size = 10
        tier1_high_watermark = "90%"
        tier1_low_watermark = ""

    p = MigrationPolicy.from_config(Cfg())
    assert p == MigrationPolicy(86400.0, ("Archive",), 10, ("percent", 0.9), None)
    assert load  # the config module exposes the loader the service uses


def test_service_bounded_rate(store: MessageStore) -> None:
    box = store.open_mailbox(USER)
    uids = [box.append(MSG + str(i).encode()) for i in range(7)]
    clock = Clock()
    calls: list[str] = []

    def run(function: Any, *args: Any) -> Any:
        calls.append(function.__name__)
        return run_inline(function, *args)

    svc = MigrationService(everything(store), clock, run, rate=3, interval=600)
    svc.startService()
    assert calls == []
    clock.advance(600)  # the pass finds 7 candidates, the first batch follows at once
    assert calls == ["candidates", "_batch"]
    assert svc.total.moved == 3
    clock.advance(0.5)
    assert svc.total.moved == 3  # bounded: 3 a second
    clock.advance(0.5)
    assert svc.total.moved == 6
    clock.advance(1)
    assert svc.total.moved == 7
    clock.advance(1)
    assert calls.count("candidates") == 1  # waits the interval for the next pass
    clock.advance(600)
    assert calls.count("candidates") == 2
    box.refresh()
    assert all(m.blob for m in box.messages()) and len(uids) == 7
    svc.stopService()
    assert not clock.getDelayedCalls()


def test_service_survives_errors_and_waits_on_stop(store: MessageStore) -> None:
    from twisted.internet.defer import Deferred, fail

    clock = Clock()
    pending: list[Deferred[Any]] = []

    def failing(function: Any, *args: Any) -> Any:
        return fail(RuntimeError("disk gone"))

    svc = MigrationService(everything(store), clock, failing, rate=5, interval=10)
    svc.startService()
    clock.advance(10)
    assert clock.getDelayedCalls()  # rescheduled after the failure
    svc.stopService()

    def slow(function: Any, *args: Any) -> Any:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    svc2 = MigrationService(everything(store), clock, slow, rate=5, interval=10)
    svc2.startService()
    clock.advance(10)
    stopped = svc2.stopService()
    done: list[object] = []
    stopped.addCallback(done.append)
    assert done == []
    pending[0].callback([])
    assert done == [None]
    assert not clock.getDelayedCalls()
