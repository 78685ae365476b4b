"""A user whose name cannot name a mailbox (``a/b@...``, made before names were checked) fails
permanently: bounced to the sender once, never deferred and retried forever."""

from __future__ import annotations

import pytest

from mailgw.interfaces import InvalidMailbox
from mailgw.store import MessageStore

BAD = "a/b@example.test"


def test_store_refuses_the_name(tmp_path) -> None:
    store = MessageStore(str(tmp_path / "mail"), lambda user: None)
    source = tmp_path / "msg"
    source.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    with pytest.raises(InvalidMailbox):
        store.deliver(BAD, str(source))
    assert not (tmp_path / "mail" / "example.test" / "a").exists()
    store.close()


def test_bad_name_is_bounced_once_and_not_deferred(
    spool, store, directory, clock, make_delivery, submit, run
) -> None:
    directory.add_user(BAD)
    store.failing[BAD] = InvalidMailbox(f"invalid user name {BAD!r}")
    delivery = make_delivery(hostname="mx.example.test")
    delivery.startService()
    qid = submit(
        [BAD, "alice@example.test"],
        sender="carol@example.test",
        body=b"Subject: hello\r\nX-Id: 7\r\n\r\nbody\r\n",
    )
    run(delivery)
    assert len(store.mailboxes["alice@example.test"]) == 1
    # the bounce went to the (local) sender, nothing is left queued or deferred
    for state in ("incoming", "active", "deferred"):
        assert spool.list(state) == [], (state, qid)
    [text] = store.mailboxes["carol@example.test"]
    assert b"Final-Recipient: rfc822; a/b@example.test" in text
    assert b"Status: 5.1.3" in text and b"Action: failed" in text
    assert b"X-Id: 7" in text  # the original headers go back to the sender
    clock.advance(10_000)  # nothing is retried
    run(delivery)
    assert store.calls.count(BAD) == 1


def test_bad_name_with_null_sender_is_dropped_without_bounce(
    spool, store, directory, make_delivery, submit, run
) -> None:
    directory.add_user(BAD)
    store.failing[BAD] = InvalidMailbox("invalid user name")
    delivery = make_delivery()
    delivery.startService()
    submit([BAD], sender="")
    run(delivery)
    for state in ("incoming", "active", "deferred"):
        assert spool.list(state) == []
