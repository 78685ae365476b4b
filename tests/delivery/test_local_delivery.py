"""Tests for LocalDelivery: spool -> mailbox, deferral and retry, crash safety, restart."""

from __future__ import annotations

import pytest
from twisted.logger import Logger, formatEvent

from mailgw.delivery import LocalDelivery, delivery_prefix
from mailgw.delivery import local as local_module
from mailgw.spool import Spool
from mailgw.testing.fakes import HeldRunner

BODY = b"Subject: test\r\n\r\nHello\r\n"


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(
        local_module, "log", Logger(observer=lambda e: lines.append(formatEvent(e)))
    )
    return lines


def test_delivers_with_prefix_and_removes_from_spool(
    spool, store, clock, make_delivery, submit, run, logged
):
    delivery = make_delivery()
    delivery.startService()
    qid = submit(["alice@example.test"])
    run(delivery)
    assert store.mailboxes["alice@example.test"] == [
        b"Return-Path: <bob@example.org>\r\nDelivered-To: alice@example.test\r\n" + BODY
    ]
    for state in Spool.STATES:
        assert spool.list(state) == []
    assert spool.list("incoming") == []
    # one log line per delivered message
    assert logged == [
        f"{qid} delivered: from=<bob@example.org> nrcpt=1 to alice@example.test uid=1"
    ]


def test_null_sender_gets_empty_return_path(store, make_delivery, submit, run):
    delivery = make_delivery()
    delivery.startService()
    submit(["alice@example.test"], sender="")
    run(delivery)
    assert store.mailboxes["alice@example.test"][0].startswith(
        b"Return-Path: <>\r\nDelivered-To: alice@example.test\r\n"
    )
    assert delivery_prefix("", "x@y.z") == b"Return-Path: <>\r\nDelivered-To: x@y.z\r\n"
    assert delivery_prefix("ü@é.test", "x@y.z").startswith("Return-Path: <ü@é.test>".encode())


def test_never_delivers_inside_the_commit_callback(store, clock, make_delivery, submit):
    delivery = make_delivery()
    delivery.startService()
    submit(["alice@example.test"])
    assert store.calls == []
    assert delivery.pending() == 1
    clock.advance(0)
    assert store.calls == ["alice@example.test"]
    assert delivery.pending() == 0


def test_one_message_per_reactor_turn(store, clock, make_delivery, submit):
    delivery = make_delivery()
    delivery.startService()
    for _ in range(3):
        submit(["alice@example.test"])
    assert delivery.pending() == 3
    for expected in (1, 2, 3):
        clock.advance(0)
        assert len(store.mailboxes["alice@example.test"]) == expected


def test_wait_idle(clock, make_delivery, submit):
    delivery = make_delivery()
    delivery.startService()
    fired: list[object] = []
    delivery.wait_idle().addCallback(fired.append)
    assert fired == [None]  # nothing queued: fires at once
    submit(["alice@example.test"])
    submit(["bob@example.test"])
    fired.clear()
    delivery.wait_idle().addCallback(fired.append)
    clock.advance(0)
    assert fired == []
    clock.advance(0)
    assert fired == [None]


def test_quota_defers_then_retry_delivers(spool, store, clock, make_delivery, submit, run, logged):
    delivery = make_delivery(retry_interval=300.0)
    delivery.startService()
    store.over_quota.add("alice@example.test")
    qid = submit(["alice@example.test"])
    run(delivery)
    assert spool.list("deferred") == [qid]
    env = spool.load(qid).envelope
    assert env.attempts == 1
    assert env.next_attempt == clock.seconds() + 300.0
    assert "over quota" in env.last_error and "alice@example.test" in env.last_error
    assert any(line.startswith(f"{qid} deferred (attempt 1") for line in logged)

    clock.advance(299)
    run(delivery)
    assert store.calls == ["alice@example.test"]  # not retried early

    store.over_quota.clear()
    clock.advance(1)  # the retry timer fires at next_attempt
    run(delivery)
    assert store.mailboxes["alice@example.test"][0].endswith(BODY)
    assert spool.list("deferred") == [] and spool.list("active") == []


def test_repeated_failures_count_attempts(spool, store, clock, make_delivery, submit, run):
    delivery = make_delivery(retry_interval=60.0)
    delivery.startService()
    store.failing["alice@example.test"] = OSError(28, "No space left on device")
    qid = submit(["alice@example.test"])
    run(delivery)
    for _ in range(3):
        clock.advance(60)
        run(delivery)
    env = spool.load(qid).envelope
    assert env.attempts == 4
    assert "No space left on device" in env.last_error
    assert store.calls == ["alice@example.test"] * 4


def test_partial_success_does_not_redeliver(spool, store, clock, make_delivery, submit, run):
    delivery = make_delivery(retry_interval=300.0)
    delivery.startService()
    store.over_quota.add("bob@example.test")
    qid = submit(["alice@example.test", "bob@example.test"])
    run(delivery)
    env = spool.load(qid).envelope
    assert spool.load(qid).state == "deferred"
    assert "alice@example.test" in env.done
    assert "bob@example.test" not in env.done
    assert "bob@example.test" in env.last_error and "alice" not in env.last_error

    store.over_quota.clear()
    clock.advance(300)
    run(delivery)
    assert store.calls == ["alice@example.test", "bob@example.test", "bob@example.test"]
    assert len(store.mailboxes["alice@example.test"]) == 1
    assert len(store.mailboxes["bob@example.test"]) == 1
    with pytest.raises(KeyError):
        spool.load(qid)


def test_progress_is_durable_before_the_next_delivery(spool, store, make_delivery, submit, run):
    """A crash after the first delivery must not deliver it again: it is already on disk."""
    seen_on_disk: list[list[str]] = []
    qid = submit(["alice@example.test", "bob@example.test"])
    store.before_deliver = lambda user: seen_on_disk.append(list(spool.load(qid).envelope.done))
    delivery = make_delivery()
    delivery.startService()
    run(delivery)
    assert seen_on_disk[0] == []
    assert "alice@example.test" in seen_on_disk[1]


def test_restart_resumes_incoming_and_active(
    spool_root, store, directory, clock, submit, run, make_delivery
):
    first = Spool(spool_root)
    waiting = submit(["alice@example.test"], to=first)
    interrupted = submit(["bob@example.test"], to=first)
    first.move(interrupted, "active")  # the process died while delivering it
    first.close()

    restarted = Spool(spool_root)
    delivery = make_delivery(spool=restarted)
    delivery.startService()
    run(delivery)
    assert len(store.mailboxes["alice@example.test"]) == 1
    assert len(store.mailboxes["bob@example.test"]) == 1
    for state in Spool.STATES:
        assert restarted.list(state) == []
    restarted.close()
    assert waiting != interrupted


def test_restart_keeps_done_recipients(spool_root, store, make_delivery, submit, run):
    first = Spool(spool_root)
    qid = submit(["alice@example.test", "bob@example.test"], to=first)
    first.move(qid, "active")
    env = first.load(qid).envelope
    env.done += ["alice@example.test>alice@example.test", "alice@example.test"]
    first.update(qid, env)
    first.close()

    restarted = Spool(spool_root)
    delivery = make_delivery(spool=restarted)
    delivery.startService()
    run(delivery)
    assert store.calls == ["bob@example.test"]
    restarted.close()


def test_due_deferred_message_is_delivered_at_start(
    spool, store, clock, make_delivery, submit, run
):
    due = submit(["alice@example.test"])
    later = submit(["bob@example.test"])
    for qid, when in ((due, clock.seconds() - 1), (later, clock.seconds() + 100)):
        env = spool.load(qid).envelope
        env.next_attempt = when
        spool.update(qid, env)
        spool.move(qid, "deferred")
    delivery = make_delivery()
    delivery.startService()
    run(delivery)
    assert store.calls == ["alice@example.test"]
    clock.advance(100)
    run(delivery)
    assert store.calls == ["alice@example.test", "bob@example.test"]


def test_alias_to_several_users_and_one_copy_per_user(store, make_delivery, submit, run):
    delivery = make_delivery()
    delivery.startService()
    submit(["team@example.test", "alice@example.test"])
    run(delivery)
    assert store.calls == ["alice@example.test", "bob@example.test"]
    assert store.mailboxes["bob@example.test"][0].startswith(
        b"Return-Path: <bob@example.org>\r\nDelivered-To: bob@example.test\r\n"
    )


def dsn_of(store, user: str = "alice@example.test") -> bytes:
    [dsn] = [m for m in store.mailboxes.get(user, []) if b"multipart/report" in m]
    return dsn


def test_external_alias_target_without_relay_bounces_and_local_copy_is_kept(
    spool, store, clock, make_delivery, submit, run, logged
):
    """Issue 9: with the relay off, an external target waited in ``deferred`` forever."""
    delivery = make_delivery(retry_interval=10.0)
    delivery.startService()
    qid = submit(["fwd@example.test"], sender="carol@example.test")
    run(delivery)
    with pytest.raises(KeyError):
        spool.load(qid)  # done: nothing deferred
    assert sorted(store.calls) == ["alice@example.test", "carol@example.test"]  # copy, DSN
    dsn = store.mailboxes["carol@example.test"][0]
    assert dsn.startswith(b"Return-Path: <>\r\nDelivered-To: carol@example.test\r\n")
    assert b"Final-Recipient: rfc822; fwd@example.test" in dsn
    assert b"Status: 5.4.4" in dsn and b"Action: failed" in dsn
    assert b"<someone@elsewhere.org>: No route to this domain" in dsn
    assert b"Subject: test" in dsn  # the original headers come back
    assert len(store.mailboxes["alice@example.test"]) == 1
    assert any(f"{qid} bounced <fwd@example.test> to <carol@example.test>" in x for x in logged)
    clock.advance(10)
    run(delivery)
    assert len(store.calls) == 2  # no second copy nor second DSN


def test_unknown_recipient_bounces_at_once_and_lookup_failure_defers(
    spool, store, directory, make_delivery, submit, run
):
    """Issue 9: "no such recipient" was deferred every 5 minutes forever, without a DSN."""
    directory.resolve_errors["carol@example.test"] = RuntimeError("directory database is locked")
    delivery = make_delivery()
    delivery.startService()
    qid = submit(
        ["gone@example.test", "carol@example.test", "alice@example.test"],
        sender="bob@example.test",
    )
    run(delivery)
    env = spool.load(qid).envelope
    assert spool.load(qid).state == "deferred"
    assert "gone@example.test" in env.done  # bounced: never retried
    assert "no such recipient" not in env.last_error and "gone" not in env.last_error
    assert "directory lookup failed" in env.last_error  # a temporary failure still waits
    assert sorted(store.calls) == ["alice@example.test", "bob@example.test"]
    dsn = dsn_of(store, "bob@example.test")
    assert b"Final-Recipient: rfc822; gone@example.test" in dsn and b"Status: 5.1.1" in dsn
    assert b"carol@example.test" not in dsn.split(b"text/rfc822-headers")[0]


def test_remote_recipient_without_relay_bounces(spool, store, make_delivery, submit, run):
    delivery = make_delivery()
    delivery.startService()
    qid = submit(["x@far.example", "bob@example.test"], sender="alice@example.test")
    run(delivery)
    with pytest.raises(KeyError):
        spool.load(qid)
    assert sorted(store.calls) == ["alice@example.test", "bob@example.test"]
    dsn = dsn_of(store)
    assert b"Final-Recipient: rfc822; x@far.example" in dsn and b"Status: 5.4.4" in dsn
    assert b"To: <alice@example.test>" in dsn and b"From: Mail Delivery System" in dsn


def test_unroutable_mail_from_the_null_sender_is_dropped_without_a_bounce(
    spool, store, make_delivery, submit, run, logged
):
    delivery = make_delivery()
    delivery.startService()
    qid = submit(["x@far.example", "gone@example.test"], sender="")
    run(delivery)
    with pytest.raises(KeyError):
        spool.load(qid)
    assert store.calls == [] and spool.list("incoming") == []
    assert any("null sender, no bounce" in line for line in logged)


def test_bounce_to_a_remote_sender_without_relay_is_not_bounced_again(
    spool, store, make_delivery, submit, run, logged
):
    delivery = make_delivery()
    delivery.startService()
    submit(["gone@example.test"])  # from bob@example.org: the DSN cannot go out either
    run(delivery)
    assert store.calls == []
    assert all(spool.list(state) == [] for state in ("incoming", "active", "deferred"))
    assert sum("null sender, no bounce" in line for line in logged) == 1


def test_failed_dsn_commit_keeps_the_message_for_a_retry(
    spool, store, clock, make_delivery, submit, run, monkeypatch
):
    delivery = make_delivery(retry_interval=10.0)
    delivery.startService()
    qid = submit(["gone@example.test"], sender="alice@example.test")
    real_begin = spool.begin
    monkeypatch.setattr(spool, "begin", lambda: (_ for _ in ()).throw(OSError(28, "disk full")))
    run(delivery)
    assert spool.load(qid).state == "deferred" and store.calls == []
    monkeypatch.setattr(spool, "begin", real_begin)
    clock.advance(10)
    run(delivery)
    with pytest.raises(KeyError):
        spool.load(qid)
    assert b"Status: 5.1.1" in dsn_of(store)


def test_unexpected_store_error_defers(spool, store, make_delivery, submit, run, logged):
    store.failing["alice@example.test"] = RuntimeError("bug in the store")
    delivery = make_delivery()
    delivery.startService()
    qid = submit(["alice@example.test"])
    run(delivery)
    message = spool.load(qid)
    assert message.state == "deferred"
    assert message.envelope.last_error == "internal error during delivery"
    assert f"{qid} delivery failed unexpectedly" in logged


def test_corrupt_envelope_goes_to_corrupt(spool, store, make_delivery, submit, run):
    qid = submit(["alice@example.test"])
    delivery = make_delivery()
    delivery.startService()
    with open(f"{spool.root}/incoming/{qid}", "wb") as f:
        f.write(b"garbage")
    run(delivery)
    assert spool.list("corrupt") == [qid]
    assert store.calls == []


def test_corrupt_deferred_envelope_found_by_retry_scan(spool, clock, make_delivery, submit):
    qid = submit(["alice@example.test"])
    spool.move(qid, "deferred")
    with open(f"{spool.root}/deferred/{qid}", "wb") as f:
        f.write(b"[]")
    delivery = make_delivery()
    delivery.spool.recover = lambda: []  # let the scan meet it, not start-up recovery
    delivery.startService()
    assert spool.list("corrupt") == [qid]


def test_held_or_vanished_messages_are_skipped(spool, store, clock, make_delivery, submit):
    delivery = make_delivery()
    delivery.startService()
    held = submit(["alice@example.test"])
    spool.move(held, "hold")
    vanished = submit(["bob@example.test"])
    spool.remove(vanished)
    clock.advance(0)
    clock.advance(0)
    assert store.calls == []
    assert spool.list("hold") == [held]


def test_old_message_logs_would_bounce(spool, store, clock, make_delivery, submit, run, logged):
    store.over_quota.add("alice@example.test")
    delivery = make_delivery(max_attempts_age=3600.0)
    delivery.startService()
    clock.advance(7200)
    qid = submit(["alice@example.test"])
    run(delivery)
    assert spool.load(qid).state == "deferred"
    assert any(line.startswith(f"{qid} queued for") and "would bounce" in line for line in logged)


def test_stop_cancels_timers_and_start_again_resumes(store, clock, make_delivery, submit, run):
    delivery = make_delivery()
    delivery.startService()
    submit(["alice@example.test"])
    fired: list[object] = []
    delivery.wait_idle().addCallback(fired.append)
    delivery.stopService()
    assert clock.getDelayedCalls() == []
    assert fired == [None]
    submit(["bob@example.test"])  # committed while stopped: stays in incoming
    assert delivery.pending() == 0
    clock.advance(0)
    assert store.calls == []
    delivery.startService()  # listener not registered twice
    run(delivery)
    assert sorted(store.calls) == ["alice@example.test", "bob@example.test"]


def test_bad_retry_interval(spool, store, directory, clock) -> None:
    with pytest.raises(ValueError):
        LocalDelivery(spool, store, directory, clock, retry_interval=0)


def test_alias_changed_between_attempts_completes_without_a_second_copy(
    spool, store, directory, clock, make_delivery, submit, run
):
    store.over_quota.add("alice@example.test")
    delivery = make_delivery(retry_interval=10.0)
    delivery.startService()
    qid = submit(["team@example.test"])
    run(delivery)
    assert spool.load(qid).state == "deferred"
    directory.aliases["team@example.test"] = ["bob@example.test"]
    clock.advance(10)
    run(delivery)
    assert store.calls == ["alice@example.test", "bob@example.test"]
    with pytest.raises(KeyError):
        spool.load(qid)


def test_duplicate_notifications_and_early_deferred_are_ignored(
    spool, store, clock, make_delivery, submit, run
):
    delivery = make_delivery(retry_interval=50.0)
    delivery.startService()
    store.over_quota.add("alice@example.test")
    qid = submit(["alice@example.test"])
    delivery._committed(qid)  # a second notification for the same message
    assert delivery.pending() == 1
    run(delivery)
    assert spool.load(qid).state == "deferred"
    delivery._committed(qid)  # deferred and not due: left alone
    run(delivery)
    assert store.calls == ["alice@example.test"]
    assert spool.load(qid).envelope.attempts == 1


def test_retry_scan_survives_a_message_vanishing(spool, clock, make_delivery, monkeypatch):
    delivery = make_delivery()
    monkeypatch.setattr(spool, "recover", lambda: [])
    real_list = spool.list
    monkeypatch.setattr(
        spool, "list", lambda state: real_list(state) + (["0" * 16] if state == "deferred" else [])
    )
    delivery.startService()
    assert delivery.pending() == 0
    assert len(clock.getDelayedCalls()) == 1  # the retry timer is armed


def test_failure_to_defer_after_a_crash_is_logged(spool, store, make_delivery, submit, run, logged):
    qid = submit(["alice@example.test"])

    def remove_then_fail(user: str) -> None:
        spool.remove(qid)
        raise RuntimeError("store bug")

    store.before_deliver = remove_then_fail
    delivery = make_delivery()
    delivery.startService()
    run(delivery)
    assert f"{qid} could not be deferred" in logged


def test_failure_to_move_to_corrupt_is_logged(
    spool, make_delivery, submit, run, logged, monkeypatch
):
    qid = submit(["alice@example.test"])
    with open(f"{spool.root}/incoming/{qid}", "wb") as f:
        f.write(b"garbage")
    delivery = make_delivery()
    delivery.spool.recover = lambda: []

    def failing_move(queue_id: str, state: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(spool, "move", failing_move)
    delivery.startService()
    run(delivery)
    assert any(line.startswith(f"{qid} could not move to corrupt") for line in logged)


def test_at_most_concurrency_messages_in_flight(spool, store, clock, make_delivery, submit):
    runner = HeldRunner()
    with pytest.raises(ValueError):
        make_delivery(concurrency=0)
    delivery = make_delivery(run=runner, concurrency=2)
    delivery.startService()
    ids = [submit(["alice@example.test"]) for _ in range(3)]
    for _ in range(5):
        clock.advance(0)
    assert len(runner.held) == 2  # the third waits for a free slot
    assert delivery.pending() == 3
    idle = delivery.wait_idle()
    fired: list[object] = []
    idle.addCallback(fired.append)
    delivery._committed(ids[0])  # a notification for a message in flight is ignored
    runner.run_one()
    assert store.calls == ["alice@example.test"]
    clock.advance(0)
    assert len(runner.held) == 2
    runner.run_one()
    runner.run_one()
    assert fired == [None] and delivery.pending() == 0
    assert len(store.mailboxes["alice@example.test"]) == 3
    for state in Spool.STATES:
        assert spool.list(state) == []


def test_file_into_a_folder_created_when_missing(spool, store, make_delivery, run, logged):
    """``Envelope.folder`` (the policy's ``file_into``): each local copy goes to that folder,
    created first when the store does not have it; a name the store refuses: INBOX."""
    from mailgw.interfaces import MailboxNotFound
    from mailgw.model import Envelope

    folders: dict[str, set[str]] = {"alice@example.test": {"INBOX"}}
    stored: list[tuple[str, str]] = []
    plain = store.deliver

    def deliver(user, content_path, prefix=b"", folder="INBOX", offset=0):
        if folder == "Bad/Name":
            raise ValueError("invalid name")
        if folder not in folders.setdefault(user, {"INBOX"}):
            raise MailboxNotFound(folder)
        stored.append((user, folder))
        return plain(user, content_path, prefix, folder, offset)

    def create_mailbox(user, name):
        folders.setdefault(user, {"INBOX"}).add(name)

    store.deliver, store.create_mailbox = deliver, create_mailbox
    delivery = make_delivery()
    delivery.startService()
    for folder in ("Junk", "Junk", "Bad/Name", ""):
        msg = spool.begin()
        msg.write(BODY)
        msg.commit(Envelope("s@x.example", ["alice@example.test"], folder=folder))
        run(delivery)
    assert stored == [
        ("alice@example.test", "Junk"),
        ("alice@example.test", "Junk"),
        ("alice@example.test", "INBOX"),
        ("alice@example.test", "INBOX"),
    ]
    assert any("created folder Junk of alice@example.test" in line for line in logged)
    assert any("unusable" in line for line in logged)
