"""The change journal (``mailgw.journal``): every store and directory mutation gets an entry
with a node-wide sequence number in the mutation's own SQLite transaction."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.directory import Directory
from mailgw.journal import ChangeLog, DBJournal, Sequencer
from mailgw.journal import sequencer as seqmod
from mailgw.model.change import ChangeEntry
from mailgw.store import MessageStore
from mailgw.store.blobs import FileBlobStore

USER = "alice@example.test"
BOB = "bob@example.test"
MSG = b"From: bob@example.org\r\nSubject: hi\r\n\r\nHello world\r\n"
REPO = Path(__file__).resolve().parents[2]
FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8}


def make_store(data: Path, **kw: object) -> MessageStore:
    return MessageStore(str(data / "mail"), lambda u: None, hostname="mx.example", **kw)  # type: ignore[arg-type]


def changelog(data: Path, reactor: object = None) -> ChangeLog:
    return ChangeLog(str(data / "journal"), reactor)


def index_of(data: Path, user: str = USER) -> Path:
    local, domain = user.split("@")
    return data / "mail" / domain / local / "mailgw-index.sqlite"


def deliver(store: MessageStore, tmp_path: Path, user: str = USER) -> int:
    spool = tmp_path / "spooled"
    spool.write_bytes(MSG)
    return store.deliver(user, str(spool))


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- what is journaled ----------------------------------------------------------------------------


def test_every_store_mutation_is_journaled_in_order(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    changes = changelog(tmp_path)
    assert changes.read(0) == []
    uid = deliver(store, tmp_path)
    first = changes.read(0)
    # The user's first use registers INBOX and the default folders ("found"), then delivers.
    assert [e.kind for e in first[:-1]] == ["mailbox.created"] * 6
    assert all(e.payload["found"] for e in first[:-1])
    added = first[-1]
    assert (added.kind, added.user, added.folder) == ("message.added", USER, "INBOX")
    assert added.payload["uid"] == uid and added.payload["size"] == len(MSG)
    assert (index_of(tmp_path).parent / added.payload["file"]).read_bytes() == MSG
    assert [e.seq for e in first] == list(range(1, 8))
    mark = changes.last_seq()
    assert mark == added.seq

    box = store.open_mailbox(USER)
    box.set_flags([uid], ["\\Seen", "$Label"], "add")
    box.set_flags([uid], ["\\Seen"], "add")  # no change: no entry
    box.copy_to([uid], "Archive")
    store.create_mailbox(USER, "Projects")
    store.set_subscribed(USER, "Projects", True)
    box.move_to([uid], "Projects")
    store.rename_mailbox(USER, "Projects", "Work")
    store.open_mailbox(USER, "Archive").expunge([1])
    store.delete_mailbox(USER, "Work")
    entries = changes.read(mark)
    assert [(e.kind, e.folder) for e in entries] == [
        ("message.flags", "INBOX"),
        ("message.copied", "Archive"),
        ("mailbox.created", "Projects"),
        ("mailbox.subscribed", "Projects"),
        ("message.moved", "INBOX"),
        ("mailbox.renamed", "Work"),
        ("message.expunged", "Archive"),
        ("mailbox.deleted", "Work"),
    ]
    assert [e.seq for e in entries] == list(range(mark + 1, mark + 9))
    flags, copied, created, subscribed, moved, renamed, expunged, _deleted = entries
    assert flags.payload["changes"] == [[uid, flags.payload["modseq"], ["$Label", "\\Seen"]]]
    assert copied.payload["from"] == "INBOX" and copied.payload["from_uid"] == uid
    assert copied.payload["uid"] == 1 and copied.payload["file"].startswith("cur/")
    assert copied.payload["flags"] == ["$Label", "\\Seen"]
    assert created.payload["subscribed"] is False and "found" not in created.payload
    assert subscribed.payload == {"subscribed": True}
    assert moved.payload["to"] == "Projects" and moved.payload["uids"] == [[uid, 1]]
    # What a replica needs to reproduce the move: the modseqs the primary gave.
    assert len(moved.payload["modseqs"]) == 1
    assert moved.payload["to_modseq"] == moved.payload["modseqs"][0] + 1
    assert isinstance(copied.payload["tz"], int)
    assert renamed.payload == {"from": "Projects"}
    assert expunged.payload["uids"] == [1]
    assert {(e.user, e.pid) for e in entries} == {(USER, os.getpid())}
    assert changes.read(mark, limit=3) == entries[:3]
    assert changes.read(entries[-1].seq) == []


def test_tier_moves_and_tier2_copies_are_journaled(tmp_path: Path) -> None:
    store = make_store(tmp_path, tier2=FileBlobStore(str(tmp_path / "tier2")))
    uid = deliver(store, tmp_path)
    changes = changelog(tmp_path)
    mark = changes.last_seq()
    assert store.migrate_message(USER, "INBOX", uid)
    store.open_mailbox(USER).copy_to([uid], "Archive")
    assert store.promote_message(USER, "INBOX", uid)
    migrated, copied, promoted = changes.read(mark)
    assert (migrated.kind, migrated.payload["uid"]) == ("tier.migrated", uid)
    assert copied.kind == "message.copied" and copied.payload["blob"] == migrated.payload["blob"]
    assert "file" not in copied.payload
    assert (promoted.kind, promoted.payload["uid"]) == ("tier.promoted", uid)
    assert promoted.payload["file"].startswith("new/")


def test_a_repair_from_the_files_is_journaled(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    uid = deliver(store, tmp_path)
    changes = changelog(tmp_path)
    mark = changes.last_seq()
    maildir = index_of(tmp_path).parent
    (file,) = (maildir / "new").iterdir()
    file.unlink()  # another program removed it, and added another
    (maildir / "new" / "1700000000.M1P1.other,S=3").write_bytes(b"x\r\n")
    store.reindex(USER)
    (entry,) = changes.read(mark)
    assert (entry.kind, entry.folder) == ("mailbox.resynced", "INBOX")
    assert entry.payload["removed"] == [uid]
    assert entry.payload["added"] == [[uid + 1, "new/1700000000.M1P1.other,S=3"]]


def test_directory_mutations_are_journaled(tmp_path: Path) -> None:
    d = Directory(str(tmp_path / "directory.sqlite"), **FAST)  # type: ignore[arg-type]
    d.add_domain("example.test")
    d.add_user(USER, "a long password")
    d.set_quota(USER, 1000)
    d.set_enabled(USER, False)
    d.set_password(USER, "another long password")
    d.add_alias("info@example.test", USER)
    d.remove_alias("info@example.test")
    with pytest.raises(ValueError):
        d.add_user(USER, "a long password")  # refused (exists): rolled back, no entry
    d.remove_user(USER)
    d.remove_domain("example.test")
    entries = changelog(tmp_path).read(0)
    assert [(e.kind, e.user, e.folder) for e in entries] == [
        ("domain.added", "", ""),
        ("user.created", USER, ""),
        ("quota.changed", USER, ""),
        ("user.changed", USER, ""),
        ("user.changed", USER, ""),
        ("alias.added", "info@example.test", ""),
        ("alias.removed", "info@example.test", ""),
        ("user.deleted", USER, ""),
        ("domain.removed", "", ""),
    ]
    assert entries[2].payload == {"quota": 1000}
    assert entries[3].payload == {"enabled": False}
    assert entries[4].payload == {"password": True}
    assert entries[5].payload == {"destination": USER}
    assert [e.seq for e in entries] == list(range(1, 10))
    # No password hash or other secret goes into the journal.
    assert all("argon2" not in str(e.payload) for e in entries)
    d.close()


def test_store_and_directory_share_one_sequence(tmp_path: Path) -> None:
    d = Directory(str(tmp_path / "directory.sqlite"), **FAST)  # type: ignore[arg-type]
    store = make_store(tmp_path)
    d.add_domain("example.test")
    deliver(store, tmp_path)
    d.add_user(USER, "a long password")
    entries = changelog(tmp_path).read(0)
    assert [e.kind for e in entries] == ["domain.added"] + ["mailbox.created"] * 6 + [
        "message.added",
        "user.created",
    ]
    assert [e.seq for e in entries] == list(range(1, 10))
    d.close()


# -- sequence numbers -----------------------------------------------------------------------------


def test_an_index_copied_from_another_node_is_numbered_above_its_rows(tmp_path: Path) -> None:
    """A user's index restored from elsewhere (here: a whole mail root copied, as
    bench/store_tiers.py does) keeps its journal rows; new entries go above them."""
    first = tmp_path / "first"
    store = make_store(first)
    for _ in range(3):
        deliver(store, tmp_path)
    store.close()
    copied_max = max(e.seq for e in changelog(first).read(0))
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "mail", second / "mail")  # the journal/ sequencer is not copied
    store = make_store(second)
    deliver(store, tmp_path)  # numbered 1.. by the new node's sequencer, but above the copy
    store.close()
    with closing(sqlite3.connect(index_of(second))) as c:
        seqs = [row[0] for row in c.execute("SELECT seq FROM journal ORDER BY seq")]
    assert len(seqs) == len(set(seqs)) and seqs[-1] > copied_max
    assert [e.kind for e in changelog(second).read(copied_max)] == ["message.added"]


WRITER = """
import sys
from mailgw.store import MessageStore
from mailgw.directory import Directory
data, name, spool = sys.argv[1:4]
store = MessageStore(data + "/mail", lambda u: None, hostname=name)
for n in range(40):
    user = "alice@example.test" if n % 2 else name + "@example.test"
    store.deliver(user, spool)
d = Directory(data + "/directory.sqlite", argon2_time_cost=1, argon2_memory_kib=8)
d.add_domain(name + ".test")
"""


def test_sequence_grows_in_commit_order_across_concurrent_processes(tmp_path: Path) -> None:
    spool = tmp_path / "spooled"
    spool.write_bytes(MSG)
    store = make_store(tmp_path)
    deliver(store, tmp_path)  # alice's index and the directory exist before the race
    Directory(str(tmp_path / "directory.sqlite"), **FAST).close()  # type: ignore[arg-type]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), f"p{i}", str(spool)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    entries = changelog(tmp_path).read(0, limit=10_000)
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs))
    assert seqs == list(range(1, len(seqs) + 1))  # nothing rolled back: no gap
    pids = {p.pid for p in procs}
    added = [e for e in entries if e.kind == "message.added" and e.pid in pids]
    assert len(added) == 80
    assert {e.pid for e in added} == pids
    # alice's messages from both processes: UIDs (allocated in the same transaction) rise
    # with the sequence numbers, so commit order is sequence order.
    alice = [e.payload["uid"] for e in entries if e.kind == "message.added" and e.user == USER]
    assert alice == list(range(1, 42))
    assert sorted(e.payload["domain"] for e in entries if e.kind == "domain.added") == [
        "p0.test",
        "p1.test",
    ]


def test_a_transaction_rolled_back_after_numbering_leaves_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    deliver(store, tmp_path)
    changes = changelog(tmp_path)
    mark = changes.last_seq()
    flush = DBJournal.flush

    def failing(self: DBJournal, conn: sqlite3.Connection) -> None:
        flush(self, conn)
        raise OSError("disk trouble at COMMIT")

    monkeypatch.setattr(DBJournal, "flush", failing)
    with pytest.raises(OSError):
        store.open_mailbox(USER).append(b"Subject: lost\r\n\r\nx\r\n")
    monkeypatch.setattr(DBJournal, "flush", flush)
    assert changes.last_seq() == mark + 1  # numbered, routed, rolled back
    uid = store.open_mailbox(USER).append(b"Subject: kept\r\n\r\nx\r\n")
    (entry,) = changes.read(mark)
    assert (entry.seq, entry.payload["uid"]) == (mark + 2, uid)


KILLED = """
import os, signal, sys
from mailgw.journal import DBJournal
from mailgw.store import MessageStore
data, when = sys.argv[1:3]
store = MessageStore(data + "/mail", lambda u: None, hostname="killed")
box = store.open_mailbox("alice@example.test")
if when == "before-commit":
    flush = DBJournal.flush
    def die(self, conn):
        flush(self, conn)  # the message's row and its entry are written, not committed
        os.kill(os.getpid(), signal.SIGKILL)
    DBJournal.flush = die
else:
    end = DBJournal.end
    def die(self, committed):
        if committed:  # committed, the sequencer lock still held
            os.kill(os.getpid(), signal.SIGKILL)
        end(self, committed)
    DBJournal.end = die
box.append(b"Subject: killed\\r\\n\\r\\nx\\r\\n")
"""


@pytest.mark.parametrize("when", ["before-commit", "after-commit"])
def test_kill_9_leaves_the_mutation_and_its_entry_together(tmp_path: Path, when: str) -> None:
    store = make_store(tmp_path)
    deliver(store, tmp_path)
    store.close()
    changes = changelog(tmp_path)
    mark = changes.last_seq()
    result = run_child(KILLED, str(tmp_path), when)
    assert result.returncode == -signal.SIGKILL, result.stderr
    with sqlite3.connect(index_of(tmp_path)) as db:
        rows = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        logged = db.execute("SELECT count(*) FROM journal WHERE seq > ?", (mark,)).fetchone()[0]
    committed = when == "after-commit"
    assert (rows, logged) == ((2, 1) if committed else (1, 0))
    # The number was handed out either way (the lock died with the process): never again.
    assert changes.last_seq() == mark + 1
    entries = changes.read(mark)
    assert [e.kind for e in entries] == (["message.added"] if committed else [])
    again = make_store(tmp_path)
    uid = again.open_mailbox(USER, "Sent").append(b"Subject: later\r\n\r\nx\r\n")
    entries = changes.read(mark)
    assert entries[-1].seq > mark + 1 and entries[-1].payload["uid"] == uid
    if not committed:
        # The killed writer's file (renamed in before the COMMIT) is adopted by the next
        # look at the folder, with an entry of its own.
        assert len(again.open_mailbox(USER).messages()) == 2
        assert changes.read(entries[-1].seq)[0].kind == "mailbox.resynced"


def test_after_a_reboot_the_counter_restarts_at_the_fsynced_mark(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    deliver(store, tmp_path)
    seq_file = tmp_path / "journal" / "seq"
    state = seqmod.State.decode(seq_file.read_bytes())
    assert state.boot == seqmod.BOOT_ID
    assert state.next < state.mark <= state.next + seqmod.RESERVE
    handed_out = state.next - 1
    # A power failure: the counter went back (written, never fsynced), the mark survived;
    # the last route line was lost with the page cache, the entry survived in the WAL.
    routes = sorted((tmp_path / "journal" / "routes").iterdir())[-1]
    lines = routes.read_bytes().splitlines(keepends=True)
    routes.write_bytes(b"".join(lines[:-1]))
    lost = seqmod.State(1, state.mark, "an-earlier-boot", state.segment, state.retention)
    seq_file.write_bytes(lost.encode())
    changes = changelog(tmp_path)
    assert [e.seq for e in changes.read(0)] == list(range(1, handed_out))  # route lost
    uid = store.open_mailbox(USER).append(b"Subject: after\r\n\r\nx\r\n")
    entries = changes.read(0)
    assert entries[-1].seq == state.mark and entries[-1].payload["uid"] == uid
    assert [e.seq for e in entries[:-1]] == list(range(1, handed_out + 1))  # found again
    after = seqmod.State.decode(seq_file.read_bytes())
    assert after.boot == seqmod.BOOT_ID and after.mark > after.next


def test_retention_prunes_entries_and_route_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seqmod, "SEGMENT_BYTES", 200)
    store = make_store(tmp_path)
    for _ in range(10):
        deliver(store, tmp_path)
    changes = changelog(tmp_path)
    routes = tmp_path / "journal" / "routes"
    segments = sorted(routes.iterdir())
    assert len(segments) > 2
    everything = changes.read(0)
    assert [e.seq for e in everything] == list(range(1, 17))  # read across segments
    assert changes.read(8) == everything[8:]
    # Age everything by two hours; keep one hour.
    with sqlite3.connect(index_of(tmp_path)) as db:
        db.execute("UPDATE journal SET time = time - 7200")
    for segment in segments:
        os.utime(segment, (segment.stat().st_mtime - 7200,) * 2)
    Sequencer.for_dir(str(tmp_path / "journal")).set_retention(3600)
    later = make_store(tmp_path)  # a new writer prunes at its first transaction
    for _ in range(8):
        deliver(later, tmp_path)
    left = changes.read(0)
    assert [e.seq for e in left] == list(range(17, 25))
    remaining = {p.name for p in routes.iterdir()}
    assert not remaining & {p.name for p in segments[:-1]}  # idle past the retention: gone
    assert seqmod.State.decode((tmp_path / "journal" / "seq").read_bytes()).retention == 3600


def test_retention_is_configured_and_documented() -> None:
    from mailgw.config import load

    config = load(str(REPO / "etc" / "mailgw.ini"))
    assert config.store.journal_retention == 7 * 86400
    assert config.store.journal_poll_interval == 1.0


# -- being told -----------------------------------------------------------------------------------

APPENDER = """
import sys
from mailgw.store import MessageStore
from mailgw.directory import Directory
store = MessageStore(sys.argv[1] + "/mail", lambda u: None, hostname="other")
box = store.open_mailbox("alice@example.test")
for n in range(int(sys.argv[2])):
    uid = box.append(b"Subject: %d\\r\\n\\r\\nx\\r\\n" % n)
    box.set_flags([uid], ["\\\\Seen"], "add")
Directory(sys.argv[1] + "/directory.sqlite", argon2_time_cost=1, argon2_memory_kib=8).add_domain(sys.argv[3])
"""


def test_the_tail_hears_other_processes_changes_once_and_in_order(tmp_path: Path) -> None:
    clock = Clock()
    store = make_store(tmp_path, reactor=clock)
    deliver(store, tmp_path)
    heard: list[ChangeEntry] = []
    folders: list[tuple[str, str]] = []
    store.changes.subscribe(heard.extend)
    store.add_listener(lambda user, folder: folders.append((user, folder)))
    store.changes.start(poll_interval=1.0)
    try:
        deliver(store, tmp_path)  # this process's own change: heard at once, once
        assert [(e.kind, e.pid) for e in heard] == [("message.added", os.getpid())]
        assert folders == [(USER, "INBOX")]
        result = run_child(APPENDER, str(tmp_path), "5", "one.test")
        assert result.returncode == 0, result.stderr
        assert len(heard) == 1  # not yet looked
        store.changes.wake()  # a worker's hint (or the poll)
        theirs = heard[1:]
        assert [e.kind for e in theirs] == ["message.added", "message.flags"] * 5 + ["domain.added"]
        assert [e.payload.get("uid") for e in theirs[:10:2]] == [3, 4, 5, 6, 7]
        assert {e.pid for e in theirs} != {os.getpid()}
        seqs = [e.seq for e in heard]
        assert seqs == sorted(set(seqs))
        assert folders[1:] == [(USER, "INBOX")]  # one batch, one call per folder
        clock.advance(1.0)  # the poll finds nothing new
        store.changes.wake()
        assert len(heard) == 12
        result = run_child(APPENDER, str(tmp_path), "1", "two.test")
        assert result.returncode == 0, result.stderr
        clock.advance(1.0)  # found by the poll
        assert [e.kind for e in heard[12:]] == ["message.added", "message.flags", "domain.added"]
    finally:
        store.changes.stop()


def test_the_tail_waits_for_a_writer_between_numbering_and_commit(tmp_path: Path) -> None:
    clock = Clock()
    changes = changelog(tmp_path, clock)
    changes.start(poll_interval=0)
    heard: list[ChangeEntry] = []
    changes.subscribe(heard.extend)
    sequencer = Sequencer(str(tmp_path / "journal"))  # another process's writer, in effect
    sequencer.begin()
    try:
        changes.wake()  # would skip an entry not committed yet: it tries again instead
        assert heard == [] and clock.getDelayedCalls()
    finally:
        sequencer.end()
    clock.advance(0.01)
    assert not clock.getDelayedCalls()
    changes.stop()


def test_the_tail_reads_this_processs_changes_it_was_not_handed(tmp_path: Path) -> None:
    clock = Clock()
    store = make_store(tmp_path, reactor=clock)
    deliver(store, tmp_path)
    heard: list[ChangeEntry] = []
    store.changes.subscribe(heard.extend)
    store.changes.start(poll_interval=0)
    try:
        directory = Directory(str(tmp_path / "directory.sqlite"), **FAST)  # type: ignore[arg-type]
        directory.add_domain("own.test")  # journaled here, not handed to the store's log
        deliver(store, tmp_path)  # handed over at once
        assert [e.kind for e in heard] == ["message.added"]
        store.changes.wake()
        assert [(e.kind, e.pid) for e in heard] == [
            ("message.added", os.getpid()),
            ("domain.added", os.getpid()),
        ]
        store.changes.wake()
        assert len(heard) == 2  # each once
        directory.close()
    finally:
        store.changes.stop()


def test_retention_pruning_records_the_highest_number_it_deleted(tmp_path: Path) -> None:
    """Rows go by age long before their route segment: readers learn from ``pruned`` that
    numbers up to it may be gone (replication then resyncs a replica standing below)."""
    store = make_store(tmp_path)
    for _ in range(3):
        deliver(store, tmp_path)
    sequencer = Sequencer.for_dir(str(tmp_path / "journal"))
    assert sequencer.pruned() == 0  # nothing pruned yet
    with sqlite3.connect(index_of(tmp_path)) as db:
        db.execute("UPDATE journal SET time = time - 7200 WHERE seq <= 4")
    sequencer.set_retention(3600)
    later = make_store(tmp_path)  # a new writer prunes at its first transaction
    deliver(later, tmp_path)
    assert sequencer.pruned() == 4
    assert [e.seq for e in changelog(tmp_path).read(0)][0] == 5
    assert len(sequencer.segments()) == 1  # the route segment is still there
    sequencer.begin()
    try:
        sequencer.record_pruned(2)  # never goes back
    finally:
        sequencer.end()
    assert sequencer.pruned() == 4


def test_a_rolled_back_prune_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    deliver(store, tmp_path)
    with sqlite3.connect(index_of(tmp_path)) as db:
        db.execute("UPDATE journal SET time = time - 7200")
    Sequencer.for_dir(str(tmp_path / "journal")).set_retention(3600)
    later = make_store(tmp_path)
    flush = DBJournal.flush

    def failing(self: DBJournal, conn: sqlite3.Connection) -> None:
        flush(self, conn)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(DBJournal, "flush", failing)
    with pytest.raises(sqlite3.OperationalError):
        deliver(later, tmp_path)
    monkeypatch.setattr(DBJournal, "flush", flush)
    assert Sequencer.for_dir(str(tmp_path / "journal")).pruned() == 0
    with sqlite3.connect(index_of(tmp_path)) as db:  # the DELETE was rolled back too
        assert db.execute("SELECT count(*) FROM journal").fetchone()[0] > 0


def _open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


def test_the_sequencer_is_closed_when_its_last_directory_closes(tmp_path: Path) -> None:
    journal = str(tmp_path / "data" / "journal")
    first = Directory(str(tmp_path / "data" / "directory.sqlite"))
    second = Directory(str(tmp_path / "data" / "directory.sqlite"))
    first.add_domain("one.test")
    sequencer = Sequencer.for_dir(journal)  # a third user: the same one
    assert any(path.startswith(journal) for path in _open_fds())
    first.close()
    first.close()  # twice: released once
    second.add_domain("two.test")  # still open for the others
    Sequencer.release(sequencer)
    assert any(path.startswith(journal) for path in _open_fds())
    second.close()
    assert not any(path.startswith(journal) for path in _open_fds())
    again = Directory(str(tmp_path / "data" / "directory.sqlite"))  # a new one opens afresh
    try:
        again.add_domain("three.test")
        other = Sequencer.for_dir(journal)
        Sequencer.release(other)
        assert other is not sequencer
    finally:
        again.close()
    assert not any(path.startswith(journal) for path in _open_fds())
