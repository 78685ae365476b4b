"""Tests for tier 2: blob store, migration (crash safety, dedup, expunge races), verify/gc/stats."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgw.runtime.threads import run_inline
from mailgw.store import MessageStore, tier1, tier2
from mailgw.store import blobs as blobs_mod
from mailgw.store.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobRef,
    FileBlobStore,
    check_digest,
    open_message,
    put_message,
    read_header,
    ref_parts,
    split_ref,
)
from mailgw.store.migration import (
    MigrationPolicy,
    MigrationService,
    Migrator,
    gc,
    parse_watermark,
    stats,
    verify,
)
from mailgw.testing.fakes import Quotas

USER = "alice@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\n" + b"Hello tier two\r\n" * 50


@pytest.fixture
def blobs(tmp_path: Path) -> FileBlobStore:
    # Loose files only: these tests look at the file layout (packs: test_tier2_packs.py).
    return FileBlobStore(str(tmp_path / "tier2"), pack_max=0)


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
    # Another process (its own store) holds a snapshot of the folder.
    elsewhere = MessageStore(store.root, lambda user: None, tier2=store.tier2)
    try:
        other = elsewhere.open_mailbox(USER)
        assert store.migrate_message(USER, "INBOX", uid)
        assert box.messages()[0].blob is not None  # this process's snapshot follows
        other.refresh()  # a move between tiers is no change of the message (no modseq)
        assert other.messages()[0].blob is None
        assert other.read_message(uid) == MSG
    finally:
        elsewhere.close()


def test_stale_tier2_entry_of_a_promoted_and_collected_blob(
    store: MessageStore, blobs: FileBlobStore
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    assert store.migrate_message(USER, "INBOX", uid)
    ref = box.messages()[0].blob
    assert ref is not None
    elsewhere = MessageStore(store.root, lambda user: None, tier2=store.tier2)
    try:
        other = elsewhere.open_mailbox(USER)
        assert other.messages()[0].blob == ref
        # This process promotes it back to tier 1 and the blob is collected.
        assert store.promote_message(USER, "INBOX", uid)
        assert box.messages()[0].blob is None
        for digest in split_ref(ref):
            assert blobs.delete(digest)
        other.refresh()
        assert other.messages()[0].blob == ref  # stale, but read through the index
        assert other.read_message(uid) == MSG
        # A blob that is really gone (the index still names it) stays an error.
        assert elsewhere.migrate_message(USER, "INBOX", uid)
        ref2 = elsewhere.open_mailbox(USER).messages()[0].blob
        assert ref2 is not None
        for digest in split_ref(ref2):
            blobs.delete(digest)
        with pytest.raises(BlobNotFound):
            other.read_message(uid)
        with pytest.raises(KeyError):
            other.read_message(uid + 1)
    finally:
        elsewhere.close()


def test_crash_after_switch_before_unlink(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)

    def crash(self: Any, f: Any, filename: str) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(tier1.MaildirBackend, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        store.migrate_message(USER, "INBOX", uid)
    monkeypatch.undo()
    assert len(folder_files(store)) == 1  # the redundant tier-1 file is still there
    box.refresh()  # the next sync removes it instead of indexing it as a new message
    assert folder_files(store) == []
    assert [(m.uid, m.blob is not None) for m in box.messages()] == [(uid, False)]  # stale
    assert [(r[1], r[4] is not None) for r in store.tier_rows(USER)] == [(uid, True)]
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
    assert everything(store).run().moved == 1  # the next run finishes, same blobs
    assert len(list(blobs.iter_refs())) == 2  # header and body
    assert box.read_message(uid) == MSG
    report = verify(store, blobs)
    assert report.ok and report.orphans == []


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
    assert len(orphans) == 2  # its header and body blobs
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
    assert report.checked == len(remaining) + 1  # distinct bodies, one shared header


def test_expunge_of_tier2_message_removes_leftover(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = store.open_mailbox(USER)
    uid = box.append(MSG)
    monkeypatch.setattr(tier1.MaildirBackend, "unlink", lambda *a: None)
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
    assert len(list(blobs.iter_refs())) == 4  # one header, 3 bodies: shared, not copied
    moved = box.move_to([uids[2]], "Trash")
    trash = store.open_mailbox(USER, "Trash")
    assert trash.read_message(moved[0][1]) == MSG + b"2"
    store.rename_mailbox(USER, "Archive", "Old")
    assert store.open_mailbox(USER, "Old").read_message(pairs[1][1]) == MSG + b"1"
    store.delete_mailbox(USER, "Old")
    report = verify(store, blobs)
    assert report.ok and report.orphans == []  # INBOX still refers to them
    box.expunge(uids)
    assert len(verify(store, blobs).orphans) == 2  # 2 bodies; Trash keeps the header


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
    ref = store.open_mailbox(USER).messages()[0].blob
    assert ref
    head, digest = split_ref(ref)  # damage the body
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


def trace(user: str, n: int) -> bytes:
    """The headers an SMTP delivery adds in front of a message: different for every copy."""
    return (
        f"Return-Path: <news@example.org>\r\nDelivered-To: {user}\r\n"
        f"Received: from mx.example.org by mx.example.test id {n:08x}\r\n"
    ).encode()


def test_migration_of_5000_messages_with_dedup(
    tmp_path: Path, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # speed: durability is tested elsewhere
    store = MessageStore(str(tmp_path / "mail"), Quotas(), hostname="mx.example", tier2=blobs)
    users = [f"u{i}@example.test" for i in range(10)]
    head = b"From: news@example.org\r\nSubject: news\r\n\r\n"
    bodies = [b"Hello tier two\r\n" * 50 + b"announcement %d\r\n" % i for i in range(40)]
    expected: dict[tuple[str, int], bytes] = {}
    message_bodies: list[bytes] = []
    n = 0
    for user in users:
        box = store.open_mailbox(user)
        for i in range(500):
            body = bodies[i % 40] if i % 5 else f"{user} private {i}\r\n".encode() * 40
            data = trace(user, n) + head + body  # every copy differs in its trace headers
            n += 1
            expected[(user, box.append(data))] = data
            message_bodies.append(body)
    logical = sum(len(b) for b in expected.values())
    report = everything(store).run()
    assert report.moved == 5000 and report.failed == 0
    st = stats(store, blobs)
    assert list(st) == ["tier1", "tier2", "tier2-headers", "tier2-bodies", "tier2-whole"]
    unique_bodies = set(message_bodies)
    assert st["tier1"].messages == 0
    assert st["tier2"].messages == 5000 and st["tier2"].logical == logical
    assert st["tier2"].blobs == 5000 + len(unique_bodies) == 5000 + 32 + 1000
    headers, bodies_st = st["tier2-headers"], st["tier2-bodies"]
    assert headers.messages == bodies_st.messages == 5000
    assert headers.blobs == 5000 and headers.dedup_ratio == 1.0
    assert bodies_st.blobs == len(unique_bodies)
    assert bodies_st.logical == sum(len(b) for b in message_bodies)
    assert bodies_st.unique_logical == sum(len(b) for b in unique_bodies)
    assert bodies_st.dedup_ratio == pytest.approx(bodies_st.logical / bodies_st.unique_logical)
    assert bodies_st.dedup_ratio > 3
    assert headers.logical + bodies_st.logical == logical
    assert headers.stored + bodies_st.stored == st["tier2"].stored
    assert st["tier2"].unique_logical == headers.unique_logical + bodies_st.unique_logical
    assert st["tier2"].dedup_ratio == pytest.approx(logical / st["tier2"].unique_logical)
    assert st["tier2"].stored < st["tier2"].unique_logical
    assert st["tier2-whole"].messages == 0 and st["tier2-whole"].blobs == 0
    for (user, uid), data in list(expected.items())[::97]:
        box = store.open_mailbox(user)
        assert box.read_message(uid) == data
        assert {m.uid: m.size for m in box.messages()}[uid] == len(data)
    assert all(folder_files(store, u) == [] for u in users)
    store.close()


# -- messages as header + body blobs -------------------------------------------------------------


@pytest.mark.parametrize(
    "data,header",
    [
        (b"Subject: a\r\nX: y\r\n\r\nbody\r\n\r\nmore\r\n", b"Subject: a\r\nX: y\r\n\r\n"),
        (b"Subject: a\n\nbare LF body\n", b"Subject: a\n\n"),
        (b"\r\nno header at all\r\n", b"\r\n"),
    ],
)
def test_put_message_splits_header_and_body(
    blobs: FileBlobStore, data: bytes, header: bytes
) -> None:
    ref, size = put_message(blobs, open_bytes(data))
    assert size == len(data)
    (h, hsize), (b, bsize) = ref_parts(ref, size)
    assert ref == f"{h}:{len(header)}+{b}"
    assert (blobs.get(h), blobs.get(b)) == (header, data[len(header) :])
    assert (hsize, bsize) == (len(header), len(data) - len(header))
    with open_message(blobs, ref) as fh:
        assert fh.read() == data
    with open_message(blobs, ref) as fh:  # small reads cross the part boundary
        assert b"".join(iter(lambda: fh.read(3), b"")) == data


@pytest.mark.parametrize(
    "data",
    [b"Subject: no body\r\nX: y\r\n", b"Subject: empty body\r\n\r\n", b"", b"no newline"],
)
def test_put_message_without_body_is_one_blob(blobs: FileBlobStore, data: bytes) -> None:
    ref, size = put_message(blobs, open_bytes(data))
    assert size == len(data) and split_ref(ref) == [ref]
    assert ref_parts(ref, size) == [(ref, len(data))]
    assert blobs.get(ref) == data
    with open_message(blobs, ref) as fh:
        assert fh.read() == data


def test_put_message_huge_header_stays_whole(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs_mod, "HEADER_MAX", 100)
    data = b"X-Long: " + b"a" * 300 + b"\r\n\r\nbody\r\n"
    ref, size = put_message(blobs, open_bytes(data))
    assert split_ref(ref) == [ref] and blobs.get(ref) == data and size == len(data)
    short = b"Subject: s\r\n\r\n" + b"b" * 500
    ref, _size = put_message(blobs, open_bytes(short))
    assert len(split_ref(ref)) == 2
    assert read_header(open_bytes(b"A: b\r\n" * 10), limit=20) == (b"A: b\r\n" * 3 + b"A: ", False)


def test_prefixed_reader_partial_reads() -> None:
    reader = blobs_mod._Prefixed(b"abcdef", open_bytes(b"ghij"))
    assert reader.read(2) == b"ab"
    assert reader.read(6) == b"cdefgh"
    assert reader.read() == b"ij"
    assert blobs_mod._Prefixed(b"ab", open_bytes(b"cd")).read() == b"abcd"


@pytest.mark.parametrize(
    "ref",
    [
        "a" * 64 + "+" + "b" * 64,  # no header size
        "a" * 64 + ":x+" + "b" * 64,
        "a" * 64 + ":99+" + "b" * 64,  # larger than the message
        "a" * 64 + ":1+" + "b" * 64 + "+" + "c" * 64,
        "a" * 64 + ":1+../../etc/passwd",
        "not a digest",
    ],
)
def test_bad_message_references(ref: str) -> None:
    with pytest.raises(ValueError):
        ref_parts(ref, 10)


def test_open_message_missing_part_closes_the_others(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _size = put_message(blobs, open_bytes(MSG))
    head, body = split_ref(ref)
    opened: list[Any] = []
    real_open = blobs.open

    def tracking_open(r: Any) -> Any:
        fh = real_open(r)
        opened.append(fh)
        return fh

    monkeypatch.setattr(blobs, "open", tracking_open)
    blobs.delete(body)
    with pytest.raises(BlobNotFound):
        open_message(blobs, ref)
    assert len(opened) == 1 and opened[0].closed


def test_legacy_whole_message_rows_still_read(
    store: MessageStore, blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows written before the split (one blob per message) read, copy, verify and gc."""

    def whole(blob_store: Any, fh: Any) -> tuple[str, int]:
        ref = blob_store.put(fh)
        return ref.digest, ref.size

    box = store.open_mailbox(USER)
    old = box.append(trace(USER, 1) + MSG)
    new = box.append(trace(USER, 2) + MSG)
    monkeypatch.setattr(tier2.blobs, "put_message", whole)
    assert store.migrate_message(USER, "INBOX", old)
    monkeypatch.undo()
    assert store.migrate_message(USER, "INBOX", new)
    box.refresh()
    refs = {m.uid: m.blob for m in box.messages()}
    assert refs[old] is not None and split_ref(refs[old]) == [refs[old]]
    assert refs[new] is not None and len(split_ref(refs[new])) == 2
    assert box.read_message(old) == trace(USER, 1) + MSG
    assert box.read_message(new) == trace(USER, 2) + MSG
    st = stats(store, blobs)
    assert st["tier2-whole"].messages == 1 and st["tier2-whole"].blobs == 1
    assert st["tier2-headers"].messages == st["tier2-bodies"].messages == 1
    assert st["tier2"].blobs == 3
    pairs = box.copy_to([old], "Archive")
    assert store.open_mailbox(USER, "Archive").read_message(pairs[0][1]) == trace(USER, 1) + MSG
    assert store.promote_message(USER, "INBOX", old)
    assert box.read_message(old) == trace(USER, 1) + MSG
    report = verify(store, blobs)
    assert report.ok and report.orphans == []


def test_smtp_copies_share_their_body(store: MessageStore, blobs: FileBlobStore) -> None:
    users = [f"user{i}@example.test" for i in range(20)]
    for n, user in enumerate(users):
        store.open_mailbox(user).append(trace(user, n) + MSG)
    everything(store).run()
    st = stats(store, blobs)
    assert st["tier2-bodies"].blobs == 1 and st["tier2-headers"].blobs == 20
    assert st["tier2-bodies"].dedup_ratio == pytest.approx(20.0)
    assert st["tier2"].blobs == 21
    for n, user in enumerate(users):
        box = store.open_mailbox(user)
        assert box.read_message(box.messages()[0].uid) == trace(user, n) + MSG
    # expunge all but one copy: the shared body stays, the others' headers become orphans
    for user in users[1:]:
        box = store.open_mailbox(user)
        box.expunge([m.uid for m in box.messages()])
    assert len(gc(store, blobs, grace=0, clock=lambda: 4e9)) == 19
    report = verify(store, blobs)
    assert report.ok and report.orphans == [] and report.checked == 2
    box = store.open_mailbox(users[0])
    assert box.read_message(box.messages()[0].uid) == trace(users[0], 0) + MSG


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
