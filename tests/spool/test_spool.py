"""Tests for the durable spool: commit, abort, queue IDs, state moves, update, recover."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Envelope
from mailgw.runtime.threads import pool_runner
from mailgw.spool import CorruptEnvelope, QueuedMessage, Spool, encode_envelope, is_queue_id
from mailgw.spool import spool as spool_module
from mailgw.spool.queueid import ALPHABET, QueueIdGenerator, encode
from mailgw.testing.deferreds import result_of
from mailgw.testing.fakes import CallsFromThreads

T = TypeVar("T")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(str(tmp_path / "spool"))
    yield s
    s.close()


def files(root: Path, name: str) -> list[str]:
    return sorted(os.listdir(root / name))


def envelopes(root: Path, state: str) -> list[str]:
    """The envelope files in a state directory (without the content files of incoming/)."""
    return [n for n in files(root, state) if not n.endswith(".msg")]


def contents(root: Path) -> list[str]:
    """The queue IDs that have a content file."""
    return [n.removesuffix(".msg") for n in files(root, "incoming") if n.endswith(".msg")]


def content_file(root: Path, qid: str) -> Path:
    return root / "incoming" / f"{qid}.msg"


def content_of(spool: Spool, qid: str) -> bytes:
    with spool.load(qid).open_content() as f:
        return f.read()


def write_old_layout(root: Path, qid: str, state: str, data: bytes, envelope: Envelope) -> None:
    """A message as the previous layout stored it: the envelope's JSON alone in its state
    directory, the bare content in incoming/<qid>.msg."""
    envelope.queue_id = qid
    (root / state / qid).write_bytes(encode_envelope(envelope))
    content_file(root, qid).write_bytes(data)


def queue(spool: Spool, data: bytes = b"Subject: hi\r\n\r\nbody\r\n", rcpts=None) -> str:
    msg = spool.begin()
    msg.write(data)
    return result_of(msg.commit(Envelope("bob@example.org", rcpts or ["alice@example.test"])))


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


def test_begin_creates_no_file_and_gives_fresh_ids(spool: Spool, tmp_path: Path) -> None:
    a, b = spool.begin(), spool.begin()
    assert a.queue_id < b.queue_id
    for name in ("tmp", *Spool.STATES):
        assert files(tmp_path / "spool", name) == []
    a.abort()
    b.abort()


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
    msg.write(b"Subject: x\r\n")
    msg.write(b"\r\nhello\r\n")
    assert msg.size == 21
    assert files(root, "tmp") == []  # small messages stay in memory until the commit
    env = Envelope("bob@example.org", ["alice@example.test"])
    qid = result_of(msg.commit(env))
    assert qid == msg.queue_id == env.queue_id
    assert files(root, "tmp") == []
    # one queue file with two names: the content's and the state entry
    assert files(root, "incoming") == [qid, qid + ".msg"]
    assert os.path.samefile(root / "incoming" / qid, content_file(root, qid))
    raw = content_file(root, qid).read_bytes()
    header, _, rest = raw.partition(b"\n")
    assert header.startswith(b"MGWQ1 C ")
    length = int(header.split()[2])
    stored = json.loads(rest[:length])
    assert rest[length:] == b"Subject: x\r\n\r\nhello\r\n"
    assert stored["sender"] == "bob@example.org"
    assert stored["queue_id"] == qid
    assert stored["size"] == 21
    # one directory fsync makes both names durable
    assert fsynced == ["incoming"]
    loaded = spool.load(qid)
    content = str(root / "incoming" / f"{qid}.msg")
    offset = len(header) + 1 + length
    assert loaded == QueuedMessage(qid, "incoming", loaded.envelope, content, offset)
    assert content_of(spool, qid) == b"Subject: x\r\n\r\nhello\r\n"
    assert loaded.content_size() == 21
    assert loaded.envelope.recipients == ["alice@example.test"]
    assert spool.list("incoming") == [qid]


def test_abort_leaves_nothing(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    msg = spool.begin()
    msg.write(b"partial")
    msg.abort()
    msg.abort()  # twice is fine
    for name in ("tmp", *Spool.STATES):
        assert files(root, name) == []
    with pytest.raises(ValueError):
        msg.write(b"more")
    with pytest.raises(ValueError):
        msg.commit(Envelope("", ["a@b.c"]))


def test_abort_after_commit_keeps_the_message(spool: Spool) -> None:
    msg = spool.begin()
    msg.write(b"x")
    qid = result_of(msg.commit(Envelope("", ["a@example.test"])))
    msg.abort()
    assert spool.list("incoming") == [qid]
    with pytest.raises(ValueError):
        msg.commit(Envelope("", ["a@example.test"]))


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
        result_of(msg.commit(Envelope("", ["a@example.test"])))
    msg.abort()  # safe after a failed commit
    for name in ("tmp", *Spool.STATES):
        assert files(root, name) == []
    assert calls == []


@pytest.mark.parametrize("size", [10, 300 * 1024])
def test_failed_content_fsync_removes_tmp(spool: Spool, tmp_path, monkeypatch, size):
    msg = spool.begin()
    msg.write(b"x" * size)

    def bad_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool_module.os, "fsync", bad_fsync)
    with pytest.raises(OSError):
        result_of(msg.commit(Envelope("", ["a@example.test"])))
    monkeypatch.undo()
    for name in ("tmp", "incoming"):
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
        seen.append((qid, envelopes(tmp_path / "spool", "incoming")))

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
        assert [s for s in Spool.STATES if envelopes(root, s)] == [state]
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
    for name in Spool.STATES:
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
    assert contents(root) == sorted([good, bad])  # corrupt keeps its content


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
    content_file(root, orphan).write_bytes(b"orphan")
    # an envelope (rewritten by an update) whose content is gone
    lost = queue(spool)
    spool.update(lost, spool.load(lost).envelope)
    os.unlink(content_file(root, lost))
    spool.close()

    restarted = Spool(str(root))
    assert restarted.recover() == [a, b]
    assert restarted.list("incoming") == [a, b]
    assert restarted.list("active") == []
    assert restarted.list("hold") == [c]
    assert restarted.list("corrupt") == [lost]
    assert files(root, "tmp") == []
    assert contents(root) == sorted([a, b, c])
    assert restarted.load(a).envelope.queue_id == a
    restarted.close()


def test_spool_creates_its_directories(tmp_path: Path) -> None:
    root = tmp_path / "data" / "spool"
    s = Spool(str(root))
    assert sorted(os.listdir(root)) == sorted(["tmp", *Spool.STATES])
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


# -- memory buffer, thread pool, group commit ----------------------------------------------


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(minthreads=0, maxthreads=8, name="spool-test")
    p.start()
    yield p
    p.stop()


def test_large_message_spills_to_tmp_and_commits(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root), memory_limit=16)
    msg = spool.begin()
    msg.write(b"0123456789")
    assert files(root, "tmp") == []
    msg.write(b"abcdefghij")  # over the limit: now a file
    msg.write(b"KLMN")
    assert files(root, "tmp") == [msg.queue_id + ".content"]
    qid = result_of(msg.commit(Envelope("", ["a@example.test"])))
    assert files(root, "tmp") == []
    # spilled: the content file is renamed into place, the envelope has a file of its own
    assert content_file(root, qid).read_bytes() == b"0123456789abcdefghijKLMN"
    assert not os.path.samefile(root / "incoming" / qid, content_file(root, qid))
    assert spool.load(qid).content_offset == 0
    assert spool.load(qid).envelope.size == 24

    other = spool.begin()
    other.write(b"x" * 40)
    assert files(root, "tmp") == [other.queue_id + ".content"]
    other.abort()
    assert files(root, "tmp") == []
    spool.close()


def test_commit_in_a_thread_pool_fires_in_the_reactor_thread(tmp_path, pool) -> None:
    reactor = CallsFromThreads()
    root = tmp_path / "spool"
    spool = Spool(str(root), run=pool_runner(reactor, pool))
    reactor_thread = threading.get_ident()
    listened: list[tuple[str, int]] = []
    spool.add_listener(lambda qid: listened.append((qid, threading.get_ident())))
    results: list[str] = []
    msgs = []
    for i in range(12):
        msg = spool.begin()
        msg.write(b"message %d\r\n" % i)
        msg.commit(Envelope("", ["a@example.test"])).addCallback(results.append)
        msg.abort()  # a lost connection during the commit changes nothing
        msgs.append(msg.queue_id)
    assert results == []  # nothing fired yet: the work is in the pool
    reactor.run_until(lambda: len(results) == 12)
    assert sorted(results) == msgs
    assert sorted(qid for qid, _ in listened) == msgs
    assert {thread for _, thread in listened} == {reactor_thread}
    assert spool.list("incoming") == msgs
    assert files(root, "tmp") == []
    for i, qid in enumerate(msgs):
        assert content_of(spool, qid) == b"message %d\r\n" % i
    assert 1 <= spool.group_commit.groups <= 12
    spool.close()


def test_failed_threaded_commit_fails_the_deferred(tmp_path, pool, monkeypatch) -> None:
    reactor = CallsFromThreads()
    spool = Spool(str(tmp_path / "spool"), run=pool_runner(reactor, pool))
    monkeypatch.setattr(spool_module, "_write_file", raise_enospc)
    failures: list[Failure] = []
    msg = spool.begin()
    msg.write(b"x")
    msg.commit(Envelope("", ["a@example.test"])).addErrback(failures.append)
    reactor.run_until(lambda: bool(failures))
    assert failures[0].check(OSError)
    assert spool.list("incoming") == []
    spool.close()


def raise_enospc(*args: Any) -> None:
    raise OSError(28, "No space left on device")


def test_group_commit_shares_directory_fsyncs(tmp_path: Path) -> None:
    """While one group is being published, later commits gather into the next group, which
    is published with one fsync of content/ and one of incoming/ for all of them."""
    root = tmp_path / "spool"
    spool = Spool(str(root))
    gc = spool.group_commit
    first_fsync_started = threading.Event()
    release = threading.Event()
    fsynced: list[str] = []
    real_fsync_dir = spool.fsync_dir

    def slow_fsync_dir(name: str) -> None:
        fsynced.append(name)
        if len(fsynced) == 1:
            first_fsync_started.set()
            assert release.wait(30)
        real_fsync_dir(name)

    spool.fsync_dir = slow_fsync_dir  # type: ignore[method-assign]
    envelopes = []
    for i in range(6):
        msg = spool.begin()
        msg.write(b"m%d" % i)
        envelopes.append((msg, Envelope("", ["a@example.test"])))
    errors: list[BaseException] = []

    def commit(msg: Any, env: Envelope) -> None:
        try:
            spool._commit_files(msg.queue_id, msg._chunks, None, encode_envelope(env))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    all_joined = threading.Event()

    class Pending(list):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            super().append(item)
            if len(self) == 5:
                all_joined.set()

    leader = threading.Thread(target=commit, args=envelopes[0])
    leader.start()
    assert first_fsync_started.wait(30)
    gc._pending = Pending()  # the leader has taken its group: the next one gathers here
    followers = [threading.Thread(target=commit, args=pair) for pair in envelopes[1:]]
    for t in followers:
        t.start()
    assert all_joined.wait(30)
    release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert errors == []
    assert gc.groups == 2
    assert fsynced == ["incoming", "incoming"]
    assert spool.list("incoming") == sorted(m.queue_id for m, _ in envelopes)
    spool.close()


def test_group_commit_failure_fails_every_member(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    # A rename that fails for one member only fails that member.
    msgs = []
    for i in range(2):
        msg = spool.begin()
        msg.write(b"m%d" % i)
        msgs.append(msg)

    real_link = os.link

    def link(src: str, dst: str) -> None:
        if dst.endswith(msgs[0].queue_id) and "incoming" in dst:
            raise OSError(5, "I/O error")
        real_link(src, dst)

    monkeypatch.setattr(spool_module.os, "link", link)
    with pytest.raises(OSError):
        result_of(msgs[0].commit(Envelope("", ["a@example.test"])))
    qid = result_of(msgs[1].commit(Envelope("", ["a@example.test"])))
    assert spool.list("incoming") == [qid]
    assert contents(root) == [qid]
    # A failing fsync of content/ fails the group before any envelope is published.
    monkeypatch.undo()
    msg = spool.begin()
    msg.write(b"x")

    def fsync_dir(name: str) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool, "fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        result_of(msg.commit(Envelope("", ["a@example.test"])))
    assert spool.list("incoming") == [qid]
    assert contents(root) == [qid]
    assert files(root, "tmp") == []
    spool.close()


def test_move_and_remove_with_a_state_hint(spool: Spool, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "spool"
    qid = queue(spool)
    fsynced: list[str] = []
    real_fsync_dir = spool.fsync_dir

    def tracking(name: str) -> None:
        fsynced.append(name)
        real_fsync_dir(name)

    monkeypatch.setattr(spool, "fsync_dir", tracking)
    spool.move(qid, "active", durable=False, from_state="incoming")
    assert spool.list("active") == [qid] and fsynced == []
    spool.move(qid, "deferred", from_state="active")
    assert sorted(fsynced) == ["active", "deferred"]
    # a stale hint: the message is found where it really is
    spool.move(qid, "hold", from_state="incoming")
    assert spool.list("hold") == [qid]
    with pytest.raises(ValueError):
        spool.move(qid, "active", from_state="nowhere")
    spool.remove(qid, "incoming")  # stale hint again
    assert spool.list("hold") == [] and contents(root) == []
    other = queue(spool)
    spool.move(other, "active", durable=False, from_state="incoming")
    spool.remove(other, "active")
    for name in Spool.STATES:
        assert files(root, name) == []


# -- the content file in incoming/ and the crash windows of a commit ------------------------


def test_content_path_stays_the_same_in_every_state(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qid = queue(spool, b"body\r\n")
    path = spool.load(qid).content_path
    for state in Spool.STATES:
        spool.move(qid, state)
        assert spool.load(qid).content_path == path == str(content_file(root, qid))
        assert content_of(spool, qid) == b"body\r\n"
        assert spool.list(state) == [qid]  # the content file is never listed
    spool.remove(qid)
    assert files(root, "incoming") == []


def test_crash_after_the_queue_file_before_its_link_leaves_nothing(tmp_path: Path) -> None:
    """The queue file is written and fsynced in incoming/ but not yet linked as the state
    entry when the process dies: recovery removes it, the message was never accepted."""
    root = tmp_path / "spool"
    spool = Spool(str(root))
    kept = queue(spool)
    published: list[tuple[str, str, bool]] = []

    def crash(source: str, entry: str, link: bool = False) -> None:
        published.append((source, entry, link))
        raise SystemExit("killed")

    spool.group_commit.publish = crash  # type: ignore[method-assign]
    msg = spool.begin()
    msg.write(b"never acknowledged")
    with pytest.raises(SystemExit):
        spool._commit_files(msg.queue_id, msg._chunks, None, b"{}")
    [(source, entry, link)] = published
    assert link and source == str(content_file(root, msg.queue_id))
    assert not os.path.exists(entry)
    assert contents(root) == sorted([kept, msg.queue_id])
    spool.close()

    restarted = Spool(str(root))
    assert restarted.recover() == []
    assert restarted.list("incoming") == [kept]
    assert files(root, "tmp") == []
    assert contents(root) == [kept]
    assert restarted.list("corrupt") == []
    restarted.close()


def test_crash_after_a_spilled_content_before_its_envelope(tmp_path: Path) -> None:
    """A spilled message: content renamed into incoming/, envelope still in tmp/."""
    root = tmp_path / "spool"
    spool = Spool(str(root), memory_limit=4)

    def crash(source: str, entry: str, link: bool = False) -> None:
        assert not link and os.path.dirname(source) == spool.tmp_dir
        raise SystemExit("killed")

    spool.group_commit.publish = crash  # type: ignore[method-assign]
    msg = spool.begin()
    msg.write(b"a large message")
    with pytest.raises(SystemExit):
        spool._commit_files(msg.queue_id, [], msg._file, b"{}")
    assert contents(root) == [msg.queue_id]
    spool.close()
    restarted = Spool(str(root))
    assert restarted.recover() == []
    assert files(root, "incoming") == [] and files(root, "tmp") == []
    restarted.close()


def test_crash_that_kept_the_entry_but_lost_the_queue_file_name(tmp_path: Path) -> None:
    """Both names are made durable by the same directory fsync; should a crash keep only
    the state entry's, that entry is the whole queue file: recovery links the name again."""
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qid = queue(spool, b"still here\r\n")
    spool.move(qid, "deferred")
    os.unlink(content_file(root, qid))
    spool.close()
    restarted = Spool(str(root))
    assert restarted.recover() == []
    assert restarted.list("deferred") == [qid]
    assert restarted.list("corrupt") == []
    assert content_of(restarted, qid) == b"still here\r\n"
    restarted.close()


def test_an_envelope_file_without_its_content_goes_to_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qid = queue(spool)
    spool.update(qid, spool.load(qid).envelope)  # the entry is an envelope file now
    os.unlink(content_file(root, qid))
    spool.close()
    restarted = Spool(str(root))
    assert restarted.recover() == []
    assert restarted.list("corrupt") == [qid]
    assert restarted.list("incoming") == []
    restarted.close()


def test_update_keeps_the_content_and_its_offset(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qid = queue(spool, b"Subject: u\r\n\r\nbody\r\n")
    before = spool.load(qid)
    spool.move(qid, "active", durable=False, from_state="incoming")
    envelope = before.envelope
    envelope.done.append("alice@example.test")
    spool.update(qid, envelope, "active")
    after = spool.load(qid, "active")
    assert after.envelope.done == ["alice@example.test"]
    assert after.content_offset == before.content_offset > 0
    assert not os.path.samefile(root / "active" / qid, content_file(root, qid))
    assert (root / "active" / qid).read_bytes().startswith(b"MGWQ1 E ")
    assert content_of(spool, qid) == b"Subject: u\r\n\r\nbody\r\n"
    spool.update(qid, after.envelope)  # a second update, no hint
    assert spool.load(qid).content_offset == before.content_offset
    with pytest.raises(KeyError):
        spool.update("0000000000000ZZZ", envelope)


def test_load_by_state_opens_only_that_state(spool: Spool, monkeypatch) -> None:
    qid = queue(spool)
    spool.move(qid, "outbound")
    opened: list[str] = []
    real_open = os.open

    def tracking_open(path: str, *args: Any) -> int:
        opened.append(path)
        return real_open(path, *args)

    monkeypatch.setattr(spool_module.os, "open", tracking_open)
    assert spool.load(qid, "outbound").state == "outbound"
    assert opened == [spool.envelope_path("outbound", qid)]
    opened.clear()
    assert spool.load(qid, "retry").state == "outbound"  # a stale hint: looked for
    assert opened[0] == spool.envelope_path("retry", qid) and len(opened) == 7
    with pytest.raises(ValueError):
        spool.load(qid, "nowhere")


def test_a_bad_header_line_is_a_corrupt_envelope(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qids = [queue(spool) for _ in range(4)]
    for qid, data in zip(
        qids,
        [b"MGWQ1 C x\n{}", b"MGWQ1 E 2\n{}", b"MGWQ1 C 99\n{}", b"MGWQ1 Q 2 0\n{}"],
        strict=True,
    ):
        os.unlink(root / "incoming" / qid)
        (root / "incoming" / qid).write_bytes(data)
        with pytest.raises(CorruptEnvelope):
            spool.load(qid)
    assert spool.recover() == []
    assert spool.list("corrupt") == qids


def test_removals_share_directory_fsyncs(tmp_path: Path) -> None:
    """While one removal group is being fsynced, later removals gather into the next group,
    which unlinks its entries, fsyncs each state directory once and then the queue files."""
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qids = [queue(spool) for _ in range(6)]
    for qid in qids[1:4]:
        spool.move(qid, "active", durable=False, from_state="incoming")
    first_fsync_started = threading.Event()
    release = threading.Event()
    fsynced: list[str] = []
    real_fsync_dir = spool.fsync_dir

    def slow_fsync_dir(name: str) -> None:
        fsynced.append(name)
        if len(fsynced) == 1:
            first_fsync_started.set()
            assert release.wait(30)
        real_fsync_dir(name)

    spool.fsync_dir = slow_fsync_dir  # type: ignore[method-assign]
    rm = spool.removals
    all_joined = threading.Event()

    class Pending(list):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            super().append(item)
            if len(self) == 5:
                all_joined.set()

    leader = threading.Thread(target=spool.remove, args=(qids[0], "incoming"))
    leader.start()
    assert first_fsync_started.wait(30)
    # the leader's entry is unlinked, its queue file not yet (the fsync comes first)
    assert qids[0] not in spool.list("incoming") and qids[0] in contents(root)
    rm._pending = Pending()
    hints = [None, "active", "active", "incoming", "incoming"]  # None: looked for
    followers = [
        threading.Thread(target=spool.remove, args=(qid, hint))
        for qid, hint in zip(qids[1:], hints, strict=True)
    ]
    for t in followers:
        t.start()
    assert all_joined.wait(30)
    release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert rm.groups == 2
    assert fsynced[0] == "incoming" and sorted(fsynced[1:]) == ["active", "incoming"]
    assert files(root, "incoming") == [] and files(root, "active") == []
    spool.close()


def test_remove_many_is_one_group_with_one_fsync_per_directory(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qids = [queue(spool) for _ in range(5)]
    for qid in qids[:3]:
        spool.move(qid, "active", durable=False, from_state="incoming")
    fsynced: list[str] = []
    real_fsync_dir = spool.fsync_dir

    def counting_fsync_dir(name: str) -> None:
        fsynced.append(name)
        real_fsync_dir(name)

    spool.fsync_dir = counting_fsync_dir  # type: ignore[method-assign]
    groups = spool.removals.groups
    # the hint is wrong for two of them: they are found in incoming/ all the same
    assert spool.remove_many([*qids, "not-a-queue-id"], "active") == {}
    assert spool.removals.groups == groups + 1
    assert sorted(fsynced) == ["active", "incoming"]
    assert contents(root) == []
    assert spool.remove_many([], "active") == {}
    spool.close()


def test_remove_many_reports_a_failed_fsync_per_message(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qids = [queue(spool) for _ in range(2)]
    spool.move(qids[0], "active", durable=False, from_state="incoming")
    real_fsync_dir = spool.fsync_dir

    def fsync_dir(name: str) -> None:
        if name == "active":
            raise OSError(5, "I/O error")
        real_fsync_dir(name)

    monkeypatch.setattr(spool, "fsync_dir", fsync_dir)
    errors = spool.remove_many(qids)
    assert list(errors) == [qids[0]] and isinstance(errors[qids[0]], OSError)
    assert contents(root) == [qids[0]]  # its queue file stays; the other one is gone
    spool.close()


def test_a_failed_removal_fsync_keeps_the_queue_files(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qid = queue(spool)

    def fsync_dir(name: str) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool, "fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        spool.remove(qid, "incoming")
    assert contents(root) == [qid]  # after a crash: gone (no entry) or still fully queued
    monkeypatch.undo()
    spool.remove(qid)  # idempotent: the entry is gone, the queue file goes now
    assert files(root, "incoming") == []
    spool.remove("not-a-queue-id")


def test_crash_during_remove_after_the_envelope_is_gone(tmp_path: Path) -> None:
    """``remove`` unlinks the envelope, fsyncs, then unlinks the content: a crash between the
    two leaves an orphan content file, which recovery removes."""
    root = tmp_path / "spool"
    spool = Spool(str(root))
    qid = queue(spool)
    spool.move(qid, "deferred")
    os.unlink(root / "deferred" / qid)
    spool.close()
    restarted = Spool(str(root))
    restarted.recover()
    assert files(root, "incoming") == []
    assert all(restarted.list(state) == [] for state in Spool.STATES)
    restarted.close()


def test_recover_migrates_the_oldest_layout(tmp_path: Path) -> None:
    """A spool written with content in content/<qid> is converted at start-up."""
    root = tmp_path / "spool"
    Spool(str(root)).close()
    queued, deferred = "0000000000000AAA", "0000000000000AAB"
    write_old_layout(root, queued, "incoming", b"old body\r\n", Envelope("", ["a@b.test"]))
    write_old_layout(root, deferred, "deferred", b"deferred body\r\n", Envelope("", ["a@b"]))
    (root / "content").mkdir()
    for qid in (queued, deferred):
        os.rename(content_file(root, qid), root / "content" / qid)
    orphan = "0" * 11 + "ZZZZZ"
    (root / "content" / orphan).write_bytes(b"no envelope")
    (root / "content" / "stray.tmp").write_bytes(b"junk")

    restarted = Spool(str(root))
    fsynced: list[str] = []
    real_fsync_dir = restarted.fsync_dir

    def tracking_fsync_dir(name: str) -> None:
        fsynced.append(name)
        real_fsync_dir(name)

    restarted.fsync_dir = tracking_fsync_dir  # type: ignore[method-assign]
    assert restarted.recover() == []
    assert "incoming" in fsynced
    assert not (root / "content").exists()
    assert sorted(os.listdir(root)) == sorted(["tmp", *Spool.STATES])
    assert contents(root) == sorted([queued, deferred])
    assert content_of(restarted, queued) == b"old body\r\n"
    message = restarted.load(deferred)
    assert message.state == "deferred"
    assert content_of(restarted, deferred) == b"deferred body\r\n"
    assert restarted.recover() == []  # nothing left to migrate
    restarted.close()


def test_the_previous_layout_is_read_updated_and_removed(tmp_path: Path) -> None:
    """The previous layout (JSON envelope files, bare content in incoming/<qid>.msg) is a
    valid spool of this one: its messages load with offset 0, survive recovery, updates and
    moves, and are removed; new commits next to them use queue files."""
    root = tmp_path / "spool"
    Spool(str(root)).close()
    old = {
        "0000000000000AAA": ("incoming", b"one\r\n"),
        "0000000000000AAB": ("active", b"two\r\n"),
        "0000000000000AAC": ("deferred", b"three\r\n"),
    }
    for qid, (state, data) in old.items():
        write_old_layout(root, qid, state, data, Envelope("s@x.test", ["r@y.test"]))
    spool = Spool(str(root))
    assert spool.recover() == ["0000000000000AAB"]
    new = queue(spool, b"new\r\n")
    for qid, (_, data) in old.items():
        m = spool.load(qid)
        assert m.content_offset == 0 and m.content_size() == len(data)
        assert content_of(spool, qid) == data
    envelope = spool.load("0000000000000AAC").envelope
    envelope.attempts = 3
    spool.update("0000000000000AAC", envelope, "deferred")
    assert spool.load("0000000000000AAC").envelope.attempts == 3
    assert content_of(spool, "0000000000000AAC") == b"three\r\n"
    spool.move("0000000000000AAA", "hold")
    for qid in old:
        spool.remove(qid)
    assert spool.list("incoming") == [new] and contents(root) == [new]
    assert content_of(spool, new) == b"new\r\n"
    spool.close()


def test_recover_leaves_other_files_in_incoming_alone(spool: Spool, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    qid = queue(spool)
    (root / "incoming" / "README").write_bytes(b"not ours")
    spool.recover()
    assert files(root, "incoming") == sorted(["README", qid, qid + ".msg"])
    assert spool.list("incoming") == [qid]


def test_inject_queues_a_copy_in_a_state(tmp_path: Path) -> None:
    """``Spool.inject`` (the quarantine's release): content and envelope written durably into
    a state, from another process; refused for a bad ID or state, or an ID already queued."""
    spool = Spool(str(tmp_path / "spool"))
    source = tmp_path / "msg"
    source.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    qid = "0000000000000ABC"
    spool.inject(qid, str(source), Envelope("a@b.test", ["c@d.test"], channel="sdn"), "deferred")
    m = spool.load(qid)
    assert m.state == "deferred" and m.envelope.channel == "sdn" and m.envelope.queue_id == qid
    assert os.path.samefile(m.content_path, spool.envelope_path("deferred", qid))
    with m.open_content() as f:
        assert f.read() == b"Subject: x\r\n\r\nbody\r\n"
    with pytest.raises(FileExistsError):
        spool.inject(qid, str(source), Envelope("a@b.test", ["c@d.test"]), "hold")
    with pytest.raises(ValueError):
        spool.inject("../x", str(source), Envelope("a@b.test", ["c@d.test"]), "hold")
    with pytest.raises(ValueError):
        spool.inject("0000000000000ABD", str(source), Envelope("a@b.test", []), "nowhere")
    assert spool.recover() == [] and spool.list("deferred") == [qid]  # nothing orphaned


def test_rewrite_header_after_commit_or_abort_is_refused(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    m = spool.begin()
    m.write(b"x\r\n")
    m.abort()
    with pytest.raises(ValueError):
        m.rewrite_header(lambda h: h)
