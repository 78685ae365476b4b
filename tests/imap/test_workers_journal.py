"""The worker pool with the change journal: a worker's "changed" is only a hint to read the
journal; the journal's entries go to every worker but the one whose process made them."""

from __future__ import annotations

from pathlib import Path

from mailgw.config import load
from mailgw.imap.worker_pool import HINT_COALESCE, Listener, WorkerPool
from mailgw.journal import ChangeLog
from mailgw.model.change import ChangeEntry
from tests.imap.test_workers import FakeReactor, config_file, control, sent


def journal_pool(tmp_path: Path) -> tuple[WorkerPool, ChangeLog]:
    reactor = FakeReactor()
    changes = ChangeLog(str(tmp_path / "journal"), reactor)
    listeners = [Listener("listen", "tcp:8143:interface=127.0.0.1", False)]
    pool = WorkerPool(
        load(config_file(tmp_path)), reactor, 3, listeners, "/usr/bin/python3", changes=changes
    )
    pool.privilegedStartService()
    pool.startService()
    reactor.run()
    return pool, changes


def entry(seq: int, kind: str, folder: str, pid: int, **payload: object) -> ChangeEntry:
    return ChangeEntry(seq, 0.0, kind, "alice", folder, payload, pid)


def test_entries_go_to_every_worker_but_the_one_that_made_them(tmp_path: Path) -> None:
    pool, changes = journal_pool(tmp_path)
    workers = [pool.workers[i] for i in range(3)]
    for w in workers:
        sent(w)
    assert pool.journal_changed in changes._subscribers
    made_by_1 = workers[1].pid
    pool.journal_changed(
        [
            entry(1, "message.added", "INBOX", made_by_1),
            entry(2, "message.flags", "INBOX", made_by_1),  # same folder: told once
            entry(3, "message.moved", "INBOX", made_by_1, to="Archive"),
            entry(4, "quota.changed", "", made_by_1),  # no folder: nothing to tell
            entry(5, "mailbox.created", "Old", made_by_1, found=True),  # found: no news
        ]
    )
    inbox = {"op": "changed", "user": "alice", "folder": "INBOX"}
    archive = {"op": "changed", "user": "alice", "folder": "Archive"}
    assert [sent(w) for w in workers] == [[inbox, archive], [], [inbox, archive]]
    # The main process's own changes (deliveries) and the mailgw command's: every worker.
    pool.journal_changed([entry(6, "message.expunged", "Sent", 4242)])
    sent_box = {"op": "changed", "user": "alice", "folder": "Sent"}
    assert [sent(w) for w in workers] == [[sent_box]] * 3


def test_a_workers_changed_message_is_a_hint_to_read_the_journal(tmp_path: Path) -> None:
    pool, changes = journal_pool(tmp_path)
    workers = [pool.workers[i] for i in range(3)]
    for w in workers:
        sent(w)
    woken: list[None] = []
    changes.wake = lambda: woken.append(None)  # type: ignore[method-assign]
    control(workers[1], op="changed", user="alice", folder="INBOX")
    control(workers[2], op="changed", user="alice", folder="Sent")
    assert woken == []  # hints arriving together are read in one pass, a moment later
    assert isinstance(pool.reactor, FakeReactor)
    pool.reactor.advance(HINT_COALESCE)
    assert woken == [None]
    assert [sent(w) for w in workers] == [[], [], []]  # nothing forwarded unread
    control(workers[1], op="changed", user="alice", folder="INBOX")
    pool.reactor.advance(HINT_COALESCE)
    assert woken == [None, None]
