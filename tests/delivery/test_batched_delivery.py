"""Local delivery in jobs of several messages into the real Maildir store: the job shares
the directory fsyncs, and a spool copy goes only after its copies' directory is synced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.store import MessageStore, maildir


@pytest.fixture
def real_store(tmp_path: Path) -> Iterator[MessageStore]:
    s = MessageStore(str(tmp_path / "mail"), lambda user: None, hostname="mx.example")
    yield s
    s.close()


def inbox(root: Path, local: str) -> list[str]:
    return sorted(p.name for p in (root / "example.test" / local / "new").iterdir())


def test_a_job_syncs_each_directory_once_then_removes_the_spool_copies(
    spool, real_store, directory, clock, submit, run, tmp_path
) -> None:
    from mailgw.delivery import LocalDelivery

    delivery = LocalDelivery(spool, real_store, directory, clock, batch=8)
    delivery.startService()
    ids = [submit(["alice@example.test"]) for _ in range(5)]
    ids.append(submit(["team@example.test"]))  # alice and bob: an update between copies
    run(delivery)
    assert len(inbox(tmp_path / "mail", "alice")) == 6
    assert len(inbox(tmp_path / "mail", "bob")) == 1
    assert spool.list("incoming") == [] and spool.list("active") == []
    assert spool.list("deferred") == []
    assert all(qid not in spool.list("active") for qid in ids)
    sync = real_store.tier1.dir_sync
    # The job's messages left the spool together: one removal group, not one per message.
    assert spool.removals.groups == 1
    # One job: alice's new/ is synced once, before the team message records its copy for
    # alice (an envelope update), which covers the five before it too; bob's new/ once at
    # the end of the job. Not once per message.
    assert sync.calls == sync.fsyncs == 2
    assert [m.uid for m in real_store.open_mailbox("alice@example.test").messages()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_a_failed_directory_fsync_defers_the_job_and_leaves_no_copy(
    spool, real_store, directory, clock, submit, run, tmp_path, monkeypatch
) -> None:
    from mailgw.delivery import LocalDelivery

    delivery = LocalDelivery(spool, real_store, directory, clock, batch=8)
    delivery.startService()
    real = maildir.fsync_dir

    def failing(path: str) -> None:
        if path.endswith("/new"):
            raise OSError("I/O error")
        real(path)

    monkeypatch.setattr(maildir, "fsync_dir", failing)
    ids = [submit(["alice@example.test"]) for _ in range(3)]
    run(delivery)
    # Nothing is left in the mailbox (files and index rows taken out again), and every
    # message is still in the spool, deferred for a retry.
    assert inbox(tmp_path / "mail", "alice") == []
    assert real_store.open_mailbox("alice@example.test").messages() == []
    assert sorted(spool.list("deferred")) == sorted(ids)
    assert "directory fsync failed" in spool.load(ids[0]).envelope.last_error

    monkeypatch.setattr(maildir, "fsync_dir", real)
    clock.advance(delivery.retry_interval)
    run(delivery)
    assert len(inbox(tmp_path / "mail", "alice")) == 3
    assert spool.list("deferred") == []
