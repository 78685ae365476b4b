"""The tracking database and its writer: batches, lookups, retention and size pruning,
several writers at once, and what the Tracker does when it cannot keep up."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mailgw.tracking import Kind, Tracker
from mailgw.tracking import store as st
from mailgw.tracking.store import Event
from mailgw.tracking.timeline import group, lookup, parse_when, render


def sample(tracker: Tracker, qid: str, t: float, rcpt: str = "bob@example.test") -> None:
    tracker.record(
        Kind.RECEIVED,
        qid,
        message_id=f"<{qid}@sender.test>",
        addresses=["carol@sender.test", rcpt],
        when=t,
        role="mx",
        sender="carol@sender.test",
        recipients=[rcpt],
        size=100,
    )
    tracker.record(
        Kind.DELIVERED,
        qid,
        addresses=[rcpt],
        when=t + 1,
        recipient=rcpt,
        user=rcpt,
        folder="INBOX",
        uid=7,
    )


def test_events_are_found_by_queue_id_message_id_and_address(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    tracker = Tracker(path)
    sample(tracker, "Q1", 1000.0)
    sample(tracker, "Q2", 2000.0, rcpt="dave@example.test")
    assert tracker.flush()
    assert [m["queue_id"] for m in lookup(path, "Q1")] == ["Q1"]
    assert [m["queue_id"] for m in lookup(path, "<Q2@sender.test>")] == ["Q2"]
    assert [m["queue_id"] for m in lookup(path, "Q2@sender.test")] == ["Q2"]  # no brackets
    assert [m["queue_id"] for m in lookup(path, "CAROL@sender.test")] == ["Q1", "Q2"]
    assert [m["queue_id"] for m in lookup(path, "carol@sender.test", since=1500)] == ["Q2"]
    assert [m["queue_id"] for m in lookup(path, "carol@sender.test", until=1500)] == ["Q1"]
    assert lookup(path, "nobody@example.test") == []
    [m] = lookup(path, "Q1")
    assert m["message_id"] == "<Q1@sender.test>" and m["status"] == "delivered"
    assert [e["kind"] for e in m["events"]] == ["received", "delivered"]
    assert m["events"][1]["uid"] == 7
    with pytest.raises(ValueError):
        lookup(path, "  ")


def test_missing_database_finds_nothing(tmp_path: Path) -> None:
    assert lookup(str(tmp_path / "none.sqlite"), "Q1") == []


def test_writer_thread_batches_and_flushes_on_stop(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    tracker = Tracker(path, flush_interval=60.0, flush_events=10)
    tracker.start()
    for i in range(25):  # 2 full batches wake the writer; the rest waits for stop()
        tracker.record(Kind.QUEUED, f"Q{i}", recipients=[])
    tracker.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 25
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    before = REGISTRY.get_sample_value("mailgw_tracking_events_dropped_total") or 0.0
    tracker = Tracker(str(tmp_path / "t.sqlite"), max_pending=3)
    for i in range(5):
        tracker.record(Kind.QUEUED, f"Q{i}")
    assert tracker.dropped == 2
    assert REGISTRY.get_sample_value("mailgw_tracking_events_dropped_total") == before + 2
    tracker.close()
    assert len(lookup(str(tmp_path / "t.sqlite"), "Q0")) == 1


def test_an_unwritable_database_loses_events_not_mail(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")  # (root ignores modes: tests run as root)
    tracker = Tracker(str(tmp_path / "file" / "t.sqlite"))
    tracker.record(Kind.QUEUED, "Q1")
    tracker.close()  # logged, not raised
    assert tracker.dropped == 1
    threaded = Tracker(str(tmp_path / "file" / "t.sqlite"))
    threaded.start()
    threaded.record(Kind.QUEUED, "Q1")
    assert threaded.flush()
    threaded.stop()
    assert threaded.dropped == 1


def test_retention_prunes_old_events_and_their_references(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    tracker = Tracker(path)
    sample(tracker, "OLD", 1000.0)
    sample(tracker, "NEW", 90_000.0)
    tracker.close()
    conn = st.connect(path)
    removed = st.prune(conn, now=100_000.0, retention=86_400.0, max_size=1 << 30)
    assert removed == 2
    assert lookup(path, "OLD") == [] and lookup(path, "<OLD@sender.test>") == []
    assert [m["queue_id"] for m in lookup(path, "carol@sender.test")] == ["NEW"]


def test_max_size_removes_the_oldest_first_and_shrinks_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    conn = st.connect(path)
    big = "x" * 2000
    batch = [Event(float(i), "queued", f"Q{i:05d}", {"pad": big}) for i in range(2000)]
    st.write(conn, batch)
    before = st.data_size(conn)
    assert before > 4_000_000
    removed = st.prune(conn, now=2000.0, retention=1e9, max_size=1_000_000)
    assert removed > 1000
    assert st.data_size(conn) <= 1_000_000
    assert Path(path).stat().st_size <= 1_200_000  # pages given back, WAL truncated
    left = [r[0] for r in conn.execute("SELECT queue_id FROM events ORDER BY time")]
    assert left and left[-1] == "Q01999"  # the newest stay
    assert "Q00000" not in left


def test_the_writer_prunes_on_its_own(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    now = [100_000.0]
    tracker = Tracker(path, clock=lambda: now[0], retention=3600.0, prune=True, prune_interval=0)
    sample(tracker, "OLD", 1000.0)
    tracker.start()
    assert tracker.flush()
    tracker.record(Kind.QUEUED, "NEW")  # the next pass prunes OLD
    assert tracker.flush()
    tracker.stop()
    assert lookup(path, "OLD") == [] and len(lookup(path, "NEW")) == 1


def _write_many(path: str, prefix: str) -> None:
    tracker = Tracker(path, flush_events=7)
    tracker.start()
    for i in range(200):
        tracker.record(Kind.QUEUED, f"{prefix}{i}", addresses=["x@example.test"])
    tracker.stop()


def test_several_processes_write_the_same_database(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    # fork, not spawn: spawned children under coverage's subprocess patch left the whole
    # run's coverage data empty (make test reported 0%).
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, p)) for p in ("A", "B", "C")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 600
    assert len(lookup(path, "x@example.test")) == 600


def test_no_tracking_only_counts() -> None:
    before = REGISTRY.get_sample_value("mailgw_messages_received_total", {"role": "unit"}) or 0.0
    Tracker(None).record(Kind.RECEIVED, "Q", role="unit")
    after = REGISTRY.get_sample_value("mailgw_messages_received_total", {"role": "unit"})
    assert after == before + 1


def test_metrics_follow_the_events(tmp_path: Path) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    tracker = Tracker(None)
    checks = [
        (Kind.DELIVERED, {}, "mailgw_messages_delivered_total", {"role": "delivery"}),
        (Kind.RELAYED, {"channel": "sdn"}, "mailgw_messages_relayed_total", {"channel": "sdn"}),
        (Kind.RELAYED, {"channel": "sdn"}, "mailgw_messages_delivered_total", {"role": "relay"}),
        (Kind.DEFERRED, {}, "mailgw_messages_deferred_total", {"channel": "local"}),
        (Kind.ATTEMPT, {"channel": "x"}, "mailgw_relay_attempts_failed_total", {"channel": "x"}),
        (Kind.BOUNCED, {}, "mailgw_messages_bounced_total", {}),
        (Kind.EXPIRED, {}, "mailgw_messages_expired_total", {}),
        (Kind.DELETED, {}, "mailgw_messages_deleted_total", {}),
        (
            Kind.REJECTED,
            {"role": "mx", "stage": "rcpt"},
            "mailgw_messages_rejected_total",
            {"role": "mx", "stage": "rcpt"},
        ),
    ]
    for kind, detail, name, labels in checks:
        before = value(name, **labels)
        tracker.record(kind, "Q", **detail)
        assert value(name, **labels) == before + 1, (kind, name)
    verdicts = [{"check": "unit-check", "verdict": "reject"}]
    before = value("mailgw_policy_verdicts_total", check="unit-check", verdict="reject")
    tracker.record(Kind.POLICY, "Q", verdicts=verdicts)
    assert value("mailgw_policy_verdicts_total", check="unit-check", verdict="reject") == before + 1


def test_timeline_text_and_status() -> None:
    events = [
        Event(10.0, "received", "Q", {"role": "mx", "sender": "a@x", "recipients": ["b@y"]}),
        Event(11.0, "attempt", "Q", {"recipient": "b@y", "channel": "overseas", "reply": "421"}),
        Event(12.0, "deferred", "Q", {"recipients": ["b@y"], "reason": "down", "next_try": 99}),
        Event(13.0, "relayed", "Q", {"recipient": "b@y", "channel": "sdn", "tls": True}),
    ]
    [m] = group(events)
    assert m["status"] == "relayed" and m["sender"] == "a@x"
    text = render([m])
    lines = text.splitlines()
    assert lines[0].startswith("Q  relayed")
    assert "received   via mx" in lines[2]
    assert "attempt    <b@y> channel=overseas" in lines[3]
    assert "deferred   <b@y> channel=local" in lines[4] and ": down" in lines[4]
    assert "relayed    <b@y> channel=sdn" in lines[5] and "tls=yes" in lines[5]
    json.dumps(m)  # JSON-able as it is


def test_parse_when() -> None:
    assert parse_when("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_when("90", 1000.0) == 910.0
    assert parse_when("@1234.5", 0) == 1234.5
    assert parse_when("2026-12-06T03:00:00+00:00", 0) == 1796526000.0
    with pytest.raises(ValueError):
        parse_when("yesterday", 0)


def test_connect_waits_while_another_connection_holds_a_new_file(tmp_path: Path) -> None:
    import threading

    path = str(tmp_path / "t.sqlite")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (a)")  # a new file, still in rollback mode
    # Another process in the middle of setting it up: SQLite refuses the switch to WAL at
    # once ("database is locked") instead of waiting for its busy timeout.
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    conn = st.connect(path)  # "database is locked" at first: tried again, not raised
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
        holder.close()


def test_a_writer_that_could_not_open_tries_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "t.sqlite")
    real = st.connect
    calls: list[str] = []

    def flaky(p: str) -> sqlite3.Connection:
        calls.append(p)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(p)

    monkeypatch.setattr(st, "connect", flaky)
    tracker = Tracker(path, flush_interval=0.05)
    tracker.start()
    tracker.record(Kind.QUEUED, "Q1")
    tracker.stop()
    assert len(calls) == 2 and len(lookup(path, "Q1")) == 1
