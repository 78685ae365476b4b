"""Tests for the durable spool: commit, abort, queue IDs, state moves, update, recover."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Envelope
from mailgw.spool import CorruptEnvelope, QueuedMessage, Spool, is_queue_id
from mailgw.spool import spool as spool_module
from mailgw.spool.queueid import ALPHABET, QueueIdGenerator, encode


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(str(tmp_path / "spool"))
    yield s
    s.close()


def files(root: Path, name: str) -> list[str]:
    return sorted(os.listdir(root / name))


def queue(spool: Spool, data: bytes = b"Subject: hi\r\n\r\nbody\r\n", rcpts=None) -> str:
    msg = spool.begin()
    msg.write(data)
    return msg.commit(Envelope("bob@example.org", rcpts or ["alice@example.test"]))


# -- queue IDs ------------------------------------------------------------------------------


def test_queue_ids_unique_sortable_and_safe() -> None:
    gen = QueueIdGenerator()
    ids = [gen.next() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_queue_id(i) for i in ids)
    assert all(c in ALPHABET for c in ids[0])


def test_queue_ids_of_two_processes_differ_at_the_same_instant(monkeypatch) -> None:
    a, b = QueueIdGenerator(pid=100), QueueIdGenerator(pid=101)
    monkeypatch.setattr("mailgw.spool.queueid.time.time_ns", lambda: 1_700_000_000_000_000_000)
    ida, idb = a.next(), b.next()
    assert ida != idb and ida[:11] == idb[:11]
    # the same process never repeats even when the clock stands still or goes back
    assert a.next() > ida
    monkeypatch.setattr("mailgw.spool.queueid.time.time_ns", lambda: 1_000)
    assert a.next() > ida


def test_begin_skips_an_id_whose_temp_file_exists(spool: Spool, tmp_path: Path) -> None:
    ids = iter(["0" * 16, "0" * 15 + "1"])
    spool._ids.next = lambda: next(ids)  # type: ignore[method-assign]
    (tmp_path / "spool" / "tmp" / ("0" * 16 + ".content")).write_bytes(b"other")
    msg = spool.begin()
    assert msg.queue_id == "0" * 15 + "1"
    msg.abort()


def test_encode_orders_like_numbers() -> None:
    values = [0, 1, 31, 32, 1023, 1024, 10**15]
    encoded = [encode(v, 11) for v in values]
    assert encoded == sorted(encoded)
    with pytest.raises(ValueError):
        encode(32**2, 2)
    assert not is_queue_id("../../etc/passwd")


# -- commit / abort -------------------------------------------------------------------------


def test_interfaces_are_provided(spool: Spool) -> None:
    verifyObject(ISpool, spool)
    msg = spool.begin()
    verifyObject(IIncomingMessage, msg)
    msg.abort()


def test_commit_makes_content_and_envelope_durable(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    fsynced: list[str] = []
    real_fsync_dir = spool.fsync_dir

    def tracking_fsync_dir(name: str) -> None:
        fsynced.append(name)
        real_fsync_dir(name)

    spool.fsync_dir = tracking_fsync_dir  # type: ignore[method-assign]
    msg = spool.begin()
    assert files(root, "tmp") == [msg.queue_id + ".content"]
    msg.write(b"Subject: x\r\n")
    msg.write(b"\r\nhello\r\n")
    assert msg.size == 21
    env = Envelope("bob@example.org", ["alice@example.test"])
    qid = msg.commit(env)
    assert qid == msg.queue_id == env.queue_id
    assert files(root, "tmp") == []
    assert files(root, "content") == [qid]
    assert files(root, "incoming") == [qid]
    assert (root / "content" / qid).read_bytes() == b"Subject: x\r\n\r\nhello\r\n"
    stored = json.loads((root / "incoming" / qid).read_bytes())
    assert stored["sender"] == "bob@example.org"
    assert stored["queue_id"] == qid
    assert stored["size"] == 21
    # content directory durable before the envelope appears in incoming
    assert fsynced == ["content", "incoming"]
    loaded = spool.load(qid)
    assert loaded == QueuedMessage(qid, "incoming", loaded.envelope, str(root / "content" / qid))
    assert loaded.envelope.recipients == ["alice@example.test"]
    assert spool.list("incoming") == [qid]


def test_abort_leaves_nothing(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    msg = spool.begin()
    msg.write(b"partial")
    msg.abort()
    msg.abort()  # twice is fine
    for name in ("tmp", "content", *Spool.STATES):
        assert files(root, name) == []
    with pytest.raises(ValueError):
        msg.write(b"more")
    with pytest.raises(ValueError):
        msg.commit(Envelope("", ["a@b.c"]))


def test_abort_after_commit_keeps_the_message(spool: Spool) -> None:
    msg = spool.begin()
    msg.write(b"x")
    qid = msg.commit(Envelope("", ["a@example.test"]))
    msg.abort()
    assert spool.list("incoming") == [qid]


def test_failed_commit_removes_everything_and_reraises(spool: Spool, tmp_path, monkeypatch):
    root = tmp_path / "spool"
    calls: list[str] = []
    spool.add_listener(calls.append)
    msg = spool.begin()
    msg.write(b"data")

    def failing_fsync_dir(name: str) -> None:
        if name == "incoming":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError):
        msg.commit(Envelope("", ["a@example.test"]))
    msg.abort()  # safe after a failed commit
    for name in ("tmp", "content", *Spool.STATES):
        assert files(root, name) == []
    assert calls == []


def test_failed_content_fsync_removes_tmp(spool: Spool, tmp_path, monkeypatch):
    msg = spool.begin()
    msg.write(b"data")

    def bad_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool_module.os, "fsync", bad_fsync)
    with pytest.raises(OSError):
        msg.commit(Envelope("", ["a@example.test"]))
    monkeypatch.undo()
    for name in ("tmp", "content", "incoming"):
        assert files(tmp_path / "spool", name) == []


def test_commit_needs_an_envelope(spool: Spool) -> None:
    msg = spool.begin()
    with pytest.raises(TypeError):
        msg.commit({"sender": ""})
    msg.abort()


def test_listeners_called_after_commit_even_if_one_fails(spool: Spool, tmp_path) -> None:
    seen: list[tuple[str, list[str]]] = []

    def broken(qid: str) -> None:
        raise RuntimeError("listener bug")

    def recorder(qid: str) -> None:
        # the message is already visible when listeners run
        seen.append((qid, os.listdir(tmp_path / "spool" / "incoming")))

    spool.add_listener(broken)
    spool.add_listener(recorder)
    with pytest.raises(TypeError):
        spool.add_listener("not callable")
    qid = queue(spool)
    assert seen == [(qid, [qid])]


def test_ids_of_committed_messages_sort_by_arrival(spool: Spool) -> None:
    ids = [queue(spool) for _ in range(20)]
    assert spool.list("incoming") == ids


# -- state moves, update, remove ------------------------------------------------------------


def test_move_between_states(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qid = queue(spool)
    for state in ("active", "deferred", "hold", "incoming"):
        spool.move(qid, state)
        assert spool.load(qid).state == state
        assert [s for s in Spool.STATES if files(root, s)] == [state]
    spool.move(qid, "incoming")  # no-op
    assert spool.list("incoming") == [qid]
    with pytest.raises(ValueError):
        spool.move(qid, "nowhere")
    with pytest.raises(KeyError):
        spool.move("0" * 16, "active")
    with pytest.raises(ValueError):
        spool.list("nowhere")


def test_update_is_atomic_and_keeps_state(spool: Spool, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "spool"
    qid = queue(spool, rcpts=["a@example.test", "b@example.test"])
    spool.move(qid, "deferred")
    env = spool.load(qid).envelope
    env.done.append("a@example.test")
    env.attempts = 3
    spool.update(qid, env)
    again = spool.load(qid)
    assert again.state == "deferred"
    assert again.envelope.done == ["a@example.test"] and again.envelope.attempts == 3
    assert files(root, "tmp") == []

    # a failure while writing leaves the old envelope intact and no temp file
    def bad_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    env.attempts = 4
    monkeypatch.setattr(spool_module.os, "fsync", bad_fsync)
    with pytest.raises(OSError):
        spool.update(qid, env)
    monkeypatch.undo()
    assert spool.load(qid).envelope.attempts == 3
    assert files(root, "tmp") == []
    with pytest.raises(KeyError):
        spool.update("0" * 16, env)
    with pytest.raises(TypeError):
        spool.update(qid, {"sender": ""})


def test_remove_is_idempotent(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qid = queue(spool)
    spool.move(qid, "active")
    spool.remove(qid)
    spool.remove(qid)
    spool.remove("../content")  # not a queue ID: ignored
    for name in ("content", *Spool.STATES):
        assert files(root, name) == []
    with pytest.raises(KeyError):
        spool.load(qid)
    with pytest.raises(KeyError):
        spool.load("nonsense")


def test_load_of_corrupt_envelope_raises(spool: Spool, tmp_path: Path) -> None:
    qid = queue(spool)
    (tmp_path / "spool" / "incoming" / qid).write_bytes(b"{not json")
    with pytest.raises(CorruptEnvelope):
        spool.load(qid)


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1, 2]",
        b'{"recipients": []}',
        b'{"sender": 1, "recipients": []}',
        b'{"sender": "", "recipients": [1]}',
        b"\xff\xfe",
    ],
)
def test_recover_moves_unparseable_envelopes_to_corrupt(spool: Spool, tmp_path, data) -> None:
    root = tmp_path / "spool"
    good = queue(spool)
    bad = queue(spool)
    spool.move(bad, "deferred")
    (root / "deferred" / bad).write_bytes(data)
    assert spool.recover() == []
    assert spool.list("corrupt") == [bad]
    assert spool.list("incoming") == [good]
    assert files(root, "content") == sorted([good, bad])  # corrupt keeps its content


def test_recover_requeues_active_and_cleans_up(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    a = queue(spool)
    b = queue(spool)
    c = queue(spool)
    spool.move(a, "active")
    spool.move(b, "active")
    spool.move(c, "hold")
    # a message still being received when the process died
    unfinished = spool.begin()
    unfinished.write(b"half a message")
    # an update interrupted before its rename
    (root / "tmp" / f"{c}.7").write_bytes(b"{}")
    # content whose envelope never arrived in incoming
    orphan = "0" * 11 + "ZZZZZ"
    (root / "content" / orphan).write_bytes(b"orphan")
    # an envelope whose content is gone
    lost = queue(spool)
    os.unlink(root / "content" / lost)
    spool.close()

    restarted = Spool(str(root))
    assert restarted.recover() == [a, b]
    assert restarted.list("incoming") == [a, b]
    assert restarted.list("active") == []
    assert restarted.list("hold") == [c]
    assert restarted.list("corrupt") == [lost]
    assert files(root, "tmp") == []
    assert files(root, "content") == sorted([a, b, c])
    assert restarted.load(a).envelope.queue_id == a
    restarted.close()


def test_spool_creates_its_directories(tmp_path: Path) -> None:
    root = tmp_path / "data" / "spool"
    s = Spool(str(root))
    assert sorted(os.listdir(root)) == sorted(["tmp", "content", *Spool.STATES])
    s.fsync_dir("incoming")
    s.close()
    s.close()
    Spool(str(root)).close()  # existing layout is reused


def test_move_fsyncs_both_directories_unless_told_not_to(spool: Spool, monkeypatch) -> None:
    qid = queue(spool)
    fsynced: list[str] = []
    monkeypatch.setattr(spool, "fsync_dir", fsynced.append)
    spool.move(qid, "active", durable=False)
    assert fsynced == []
    spool.move(qid, "deferred")
    assert sorted(fsynced) == ["active", "deferred"]
