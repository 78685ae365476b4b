"""Tests for tier-2 pack files: write/read/dedup, verify, gc with repack, crash windows
(writer processes killed between the steps), concurrent writers, loose-store migration."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgw.store import MessageStore
from mailgw.store.blobs import BlobCorrupt, BlobNotFound, FileBlobStore, split_ref
from mailgw.store.migration import MigrationPolicy, Migrator, gc, stats, verify
from mailgw.store.packs import RECORD, PackStore
from mailgw.testing.fakes import Quotas

USER = "alice@example.test"


def blob(n: int, size: int = 300) -> bytes:
    """Distinct, compressible bytes."""
    return (f"Received: from host{n} by mx; {n}\r\n".encode() * (size // 30 + 1))[:size]


@pytest.fixture
def blobs(tmp_path: Path) -> Iterator[FileBlobStore]:
    b = FileBlobStore(str(tmp_path / "tier2"))
    yield b
    b.close()


def pack_files(b: FileBlobStore) -> list[str]:
    return sorted(n for n in os.listdir(b.packs.root) if n.endswith(".pack"))


def loose_files(b: FileBlobStore) -> list[str]:
    return [
        name
        for top, _dirs, names in os.walk(b.root)
        if not top.startswith((b.packs.root, os.path.join(b.root, "tmp")))
        for name in names
    ]


def in_child(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked process; its exit status (os.waitstatus_to_exitcode)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# -- write, read, dedup -------------------------------------------------------------------------


def test_small_blobs_are_packed_large_ones_loose(blobs: FileBlobStore) -> None:
    small, large = blob(1), os.urandom(blobs.pack_max + 1)
    ref = blobs.put(small)
    big = blobs.put(large)
    assert not os.path.exists(blobs.path(ref)) and os.path.exists(blobs.path(big))
    assert pack_files(blobs) == ["pack-00000001.pack"]
    assert blobs.get(ref) == small and blobs.get(big) == large
    with blobs.open(ref) as fh:
        assert fh.read() == small
    assert blobs.exists(ref) and sorted(blobs.iter_refs()) == sorted([ref.digest, big.digest])
    path, offset, length = blobs.where(ref)
    assert path.endswith("pack-00000001.pack") and offset == 0
    assert os.path.getsize(path) == length < len(small)  # compressed, one record
    size, _mtime = blobs.stat(ref)
    assert size == length
    # exactly pack_max bytes still goes to a pack
    edge = blobs.put(os.urandom(blobs.pack_max))
    assert not os.path.exists(blobs.path(edge)) and blobs.exists(edge)
    assert blobs.get(blobs.put(b"")) == b""


def test_dedup_writes_nothing_and_refreshes_mtime(blobs: FileBlobStore) -> None:
    ref = blobs.put(blob(1))
    path, _o, _l = blobs.where(ref)
    before = os.path.getsize(path)
    blobs.touch(ref, 1000.0)
    assert blobs.stat(ref)[1] == 1000.0
    assert blobs.put(blob(1)) == ref
    assert os.path.getsize(path) == before
    assert blobs.stat(ref)[1] > 1000.0  # gc grace starts again
    assert list(blobs.iter_refs()) == [ref.digest]


def test_reads_pread_one_record(blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = [blobs.put(blob(n, 2000)) for n in range(50)]
    pack, _o, _l = blobs.where(refs[0])
    sizes: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        sizes.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    assert blobs.get(refs[25]) == blob(25, 2000)
    assert sizes == [blobs.where(refs[25])[2]] and sizes[0] < os.path.getsize(pack) // 10


def test_delete_then_put_again(blobs: FileBlobStore) -> None:
    ref = blobs.put(blob(1))
    assert blobs.delete(ref) and not blobs.exists(ref) and not blobs.delete(ref)
    with pytest.raises(BlobNotFound):
        blobs.get(ref)
    with pytest.raises(BlobNotFound):
        blobs.stat(ref)
    assert blobs.put(blob(1)) == ref and blobs.get(ref) == blob(1)


def test_packs_roll_over_at_their_target(blobs: FileBlobStore) -> None:
    blobs.packs.target = 2000
    refs = [blobs.put(os.urandom(900)) for _ in range(6)]
    assert len(pack_files(blobs)) == 3
    assert len({blobs.where(r)[0] for r in refs}) == 3
    assert all(blobs.get(r) for r in refs)


# -- damage -------------------------------------------------------------------------------------


def damage(path: str, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x20]))


@pytest.mark.parametrize("where", ["frame", "header", "truncated"])
def test_a_damaged_record_is_corrupt_never_wrong_bytes(blobs: FileBlobStore, where: str) -> None:
    first, ref, last = (blobs.put(blob(n)) for n in range(3))
    path, offset, length = blobs.where(ref)
    if where == "frame":
        damage(path, offset + RECORD.size + length // 3)
    elif where == "header":
        damage(path, offset + 10)  # inside the digest
    else:
        os.truncate(path, offset + length - 1)
    with pytest.raises(BlobCorrupt):
        blobs.get(ref)
    with pytest.raises(BlobCorrupt):
        blobs.open(ref)
    assert blobs.get(first) == blob(0)
    if where != "truncated":
        assert blobs.get(last) == blob(2)


def test_a_missing_pack_is_corrupt(blobs: FileBlobStore) -> None:
    ref = blobs.put(blob(1))
    os.unlink(blobs.where(ref)[0])
    with pytest.raises(BlobCorrupt, match="missing"):
        blobs.get(ref)


# -- through the store: migration, verify, gc with repack ---------------------------------------


@pytest.fixture
def store(tmp_path: Path, blobs: FileBlobStore) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), Quotas(), hostname="mx.example", tier2=blobs)
    yield s
    s.close()


def message(n: int, body: int = 3000) -> bytes:
    head = f"From: bob@example.org\r\nSubject: message {n}\r\nMessage-ID: <{n}@x>\r\n\r\n"
    return head.encode() + random.Random(n).randbytes(body // 2).hex().encode()


def migrate_all(store: MessageStore) -> None:
    Migrator(store, MigrationPolicy(after=1.0), clock=lambda: 4e9).run()


def test_verify_reports_a_damaged_packed_blob(store: MessageStore, blobs: FileBlobStore) -> None:
    box = store.open_mailbox(USER)
    uids = [box.append(message(n)) for n in range(5)]
    migrate_all(store)
    assert loose_files(blobs) == []  # headers and these bodies are small: all packed
    report = verify(store, blobs)
    assert report.ok and report.checked == 10 and not report.orphans
    ref = store.open_mailbox(USER).messages()[2].blob
    assert ref
    _head, body = split_ref(ref)
    path, offset, length = blobs.where(body)
    damage(path, offset + length - 2)
    report = verify(store, blobs)
    assert report.corrupt == [body] and not report.ok
    with pytest.raises(BlobCorrupt):
        box.read_message(uids[2])
    assert box.read_message(uids[1]) == message(1)


def test_gc_repacks_mostly_dead_packs(store: MessageStore, blobs: FileBlobStore) -> None:
    blobs.packs.target = 8000
    box = store.open_mailbox(USER)
    uids = [box.append(message(n)) for n in range(40)]
    migrate_all(store)
    before = pack_files(blobs)
    assert len(before) > 3
    on_disk = sum(os.path.getsize(os.path.join(blobs.packs.root, n)) for n in before)
    keep = uids[::8]
    box.expunge([u for u in uids if u not in keep])
    for digest in blobs.iter_refs():
        blobs.touch(digest, 1000.0)
    removed = gc(store, blobs, grace=60.0)
    assert len(removed) == 2 * (len(uids) - len(keep))
    after = pack_files(blobs)
    assert not set(after) & set(before[:-1])  # every sealed pack was mostly dead: rewritten
    assert sum(os.path.getsize(os.path.join(blobs.packs.root, n)) for n in after) < on_disk / 3
    for uid in keep:
        assert box.read_message(uid) == message(uids.index(uid))
    report = verify(store, blobs)
    assert report.ok and not report.orphans and report.checked == 2 * len(keep)
    tiers = stats(store, blobs)
    assert tiers["tier2"].blobs == 2 * len(keep)


def test_repack_keeps_packs_that_are_mostly_live(blobs: FileBlobStore) -> None:
    blobs.packs.target = 3000
    refs = [blobs.put(os.urandom(1000)) for _ in range(9)]
    blobs.delete(refs[0])
    assert blobs.repack(0.5) == (0, 0)
    for r in refs[1:3]:
        blobs.delete(r)
    packs = pack_files(blobs)
    removed, reclaimed = blobs.repack(0.5)
    assert removed == 1 and reclaimed > 2000 and packs[0] not in pack_files(blobs)
    assert all(blobs.get(r) for r in refs[3:])


def test_a_read_racing_a_repack_looks_again(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs.packs.target = 1000
    refs = [blobs.put(os.urandom(600)) for _ in range(3)]
    stale = blobs.packs.locate(refs[1].digest)
    blobs.delete(refs[0])
    assert blobs.repack(1.01)[0] == 2  # every sealed pack
    real = blobs.packs.locate
    answers = [stale]
    monkeypatch.setattr(blobs.packs, "locate", lambda d: answers.pop() if answers else real(d))
    assert blobs.get(refs[1]) is not None and not answers


# -- crash windows ------------------------------------------------------------------------------


def test_writer_killed_after_append_before_index(tmp_path: Path) -> None:
    root = str(tmp_path / "tier2")
    FileBlobStore(root).close()

    def child() -> None:
        b = FileBlobStore(root)
        b.put(blob(1))
        real = b.packs._append

        def append(record: bytes) -> tuple[int, int]:
            real(record)  # on disk, fsynced
            die()
            raise AssertionError

        b.packs._append = append  # type: ignore[method-assign]
        b.put(blob(2))

    assert in_child(child) == -signal.SIGKILL
    b = FileBlobStore(root)
    digest = hashlib.sha256(blob(2)).hexdigest()
    assert not b.exists(digest)  # its bytes are in the pack, dead; no row points at them
    st = b.packs.stats()
    assert st.blobs == 1 and st.bytes > st.live_bytes
    assert b.get(hashlib.sha256(blob(1)).hexdigest()) == blob(1)
    ref = b.put(blob(2))  # the lock died with the writer
    assert b.get(ref) == blob(2) and ref.digest == digest
    b.close()


@pytest.mark.parametrize("step", ["before-switch", "before-unlink"])
def test_repack_killed_between_its_steps(tmp_path: Path, step: str) -> None:
    root = str(tmp_path / "tier2")
    b = FileBlobStore(root)
    b.packs.target = 2000
    data = [os.urandom(900) for _ in range(6)]
    refs = [b.put(d) for d in data]
    b.delete(refs[0])
    b.delete(refs[2])
    packs = pack_files(b)

    def child() -> None:
        c = FileBlobStore(root)
        c.packs.target = 2000
        if step == "before-switch":
            c.packs._switch = lambda switches: die()  # type: ignore[method-assign]
        else:
            real = os.unlink

            def unlink(path: Any, *args: Any, **kw: Any) -> None:
                if str(path).endswith(".pack"):
                    die()
                real(path, *args, **kw)

            os.unlink = unlink  # type: ignore[assignment]
        c.repack(0.6)

    assert in_child(child) == -signal.SIGKILL
    assert pack_files(b)[: len(packs)] == packs  # nothing removed yet
    for r, d in zip(refs, data, strict=True):
        if r not in (refs[0], refs[2]):
            assert b.get(r) == d
    # the next repack finishes the job: the old packs go, the live blobs stay readable
    b.repack(0.6)
    assert packs[0] not in pack_files(b) and packs[1] not in pack_files(b)
    for r, d in zip(refs, data, strict=True):
        if r not in (refs[0], refs[2]):
            assert b.get(r) == d
    assert sorted(b.iter_refs()) == sorted(r.digest for i, r in enumerate(refs) if i not in (0, 2))
    b.close()


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_writer_processes_and_threads(tmp_path: Path) -> None:
    root = str(tmp_path / "tier2")
    FileBlobStore(root).close()
    per, shared = 60, 20

    def writer(k: int) -> None:
        b = FileBlobStore(root)
        b.packs.target = 20000
        errors: list[BaseException] = []

        def run(t: int) -> None:
            try:
                for n in range(per):
                    b.put(blob(1000 * (2 * k + t) + n + 100))
                    b.put(blob(n % shared))  # the same blobs in every writer
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        b.close()
        if errors:
            raise errors[0]

    pids = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                writer(k)
            except BaseException:
                code = 3
            os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0, 0, 0]
    b = FileBlobStore(root)
    expected = {blob(n % shared) for n in range(per)} | {
        blob(1000 * w + n + 100) for w in range(6) for n in range(per)
    }
    digests = {hashlib.sha256(d).hexdigest(): d for d in expected}
    assert sorted(b.iter_refs()) == sorted(digests)
    for digest, data in digests.items():
        assert b.get(digest) == data
    st = b.packs.stats()
    assert st.blobs == len(digests) and st.bytes == st.live_bytes  # no copy twice, no torn
    b.close()


# -- a store from before packs ------------------------------------------------------------------


def test_loose_store_stays_readable_and_packs(tmp_path: Path) -> None:
    root = str(tmp_path / "tier2")
    old = FileBlobStore(root, pack_max=0)
    small = [old.put(blob(n)) for n in range(5)]
    large = old.put(os.urandom(40000))
    assert len(loose_files(old)) == 6 and pack_files(old) == []
    old.touch(small[0], 1000.0)
    old.close()
    b = FileBlobStore(root)
    assert all(b.get(r) == blob(n) for n, r in enumerate(small))
    assert b.put(blob(1)) == small[1] and pack_files(b) == []  # dedup against the loose file
    # a crash of pack_loose after packing, before the unlink: the blob is in both places
    b.packs.put(small[4].digest, blob(4), 3)
    assert sorted(b.iter_refs()) == sorted(r.digest for r in [*small, large])
    damage(b.path(small[3]), 20)
    moved, freed = b.pack_loose()
    assert moved == 4 and freed > 0  # the damaged one stays loose, for verify to report
    assert sorted(loose_files(b)) == sorted(os.path.basename(b.path(r)) for r in (small[3], large))
    assert b.stat(small[0])[1] == 1000.0  # the mtime travels (gc grace)
    assert all(b.get(r) == blob(n) for n, r in enumerate(small) if n != 3)
    with pytest.raises(BlobCorrupt):
        b.get(small[3])
    assert sorted(b.iter_refs()) == sorted(r.digest for r in [*small, large])
    assert b.delete(small[1]) and not b.exists(small[1])
    b.close()


def test_pack_index_survives_reopen(tmp_path: Path) -> None:
    b = FileBlobStore(str(tmp_path / "tier2"))
    refs = [b.put(blob(n)) for n in range(3)]
    b.close()
    again = PackStore(str(tmp_path / "tier2" / "packs"))
    assert sorted(again.digests()) == sorted(r.digest for r in refs)
    assert again.read(refs[1].digest) == blob(1)
    again.close()


# -- a lost or damaged pack index ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["lost", "damaged"])
def test_pack_index_is_rebuilt_from_the_records(tmp_path: Path, how: str) -> None:
    root = str(tmp_path / "tier2")
    b = FileBlobStore(root)
    b.packs.target = 3000
    data = [os.urandom(700) for _ in range(8)]
    refs = [b.put(d) for d in data]
    pack, offset, length = b.where(refs[3])
    b.delete(refs[5])
    b.close()
    damage(pack, offset + RECORD.size + 5)  # a damaged record is not indexed again
    index = os.path.join(root, "packs", "index.sqlite")
    if how == "lost":
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index + suffix)
    else:
        with open(index, "r+b") as fh:
            fh.write(b"garbage" * 20)
    with open(pack, "ab") as fh:
        fh.write(RECORD.pack(b"MGP1", bytes(32), 500) + b"torn")  # a crashed append
    b = FileBlobStore(root)
    assert b.packs.rebuilt_because
    alive = [r.digest for i, r in enumerate(refs) if i != 3]  # the deleted one is an orphan
    assert sorted(b.iter_refs()) == sorted(alive)
    for i, r in enumerate(refs):
        if i != 3:
            assert b.get(r) == data[i]
    assert not b.exists(refs[3])
    assert b.put(os.urandom(10)) and len(list(b.iter_refs())) == len(alive) + 1
    b.close()
    if how == "damaged":
        assert [n for n in os.listdir(os.path.dirname(index)) if ".corrupt-" in n]
    again = FileBlobStore(root)  # no rebuild when the index is there
    assert again.packs.rebuilt_because == ""
    again.close()


def test_delete_older_than_spares_a_refreshed_blob(blobs: FileBlobStore) -> None:
    packed, loose = blobs.put(blob(1)), blobs.put(os.urandom(blobs.pack_max + 10))
    for ref in (packed, loose):
        blobs.touch(ref, 1000.0)
        blobs.put(blobs.get(ref))  # a writer stored it again: mtime now
        assert not blobs.delete(ref, older_than=2000.0) and blobs.exists(ref)
        blobs.touch(ref, 1000.0)
        assert blobs.delete(ref, older_than=2000.0) and not blobs.exists(ref)


class Trickle:
    """A binary stream that returns at most 7 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        n = 7 if n < 0 else min(n, 7)
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_short_reads_of_the_source(blobs: FileBlobStore) -> None:
    small, large = blob(1, 5000), blob(2, blobs.pack_max + 100)
    ref = blobs.put(Trickle(small))  # type: ignore[arg-type]
    assert ref.size == len(small) and not os.path.exists(blobs.path(ref))
    big = blobs.put(Trickle(large))  # type: ignore[arg-type]
    assert big.size == len(large) and os.path.exists(blobs.path(big))
    assert blobs.get(ref) == small and blobs.get(big) == large
