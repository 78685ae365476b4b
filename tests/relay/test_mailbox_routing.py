"""Gateway mode of the relay: users' mail goes to their mailbox node over LMTP (Clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgw.model import Reply
from mailgw.relay.client import DeliveryResult
from mailgw.relay.scheduler import MailboxRouting
from tests.relay.test_scheduler import Env, ok, refused, result

NODES = {"be1": ("127.0.0.2", 8024), "be2": ("127.0.0.3", 8024)}
USERS = {"alice@example.test": "be1", "bob@example.test": "be2", "carol@example.test": "be1"}


class Routing:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.fail = False

    def node_of(self, rcpt: str) -> str | None:
        if self.fail:
            raise OSError("directory down")
        return USERS.get(rcpt)

    def routing(self) -> MailboxRouting:
        return MailboxRouting(self.node_of, lambda r: r in self.held, NODES, hold_retry=5.0)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    e.routing = Routing()  # type: ignore[attr-defined]
    e.relay.mailboxes = e.routing.routing()  # type: ignore[attr-defined]
    e.relay.startService()
    yield e
    e.relay.stopService()
    e.spool.close()


def lmtp_calls(env: Env) -> list[tuple[str, list[str], list[str]]]:
    return [(c[1], c[2], c[3]) for c in env.deliver.calls if c[0] == "lmtp"]


def test_users_go_to_their_node_others_through_channels(env: Env) -> None:
    qid = env.queue(["alice@example.test", "bob@example.test", "carol@example.test", "x@remote.cn"])
    env.relay.handover(qid)
    calls = sorted(lmtp_calls(env))
    assert calls == [
        ("be1", ["alice@example.test", "carol@example.test"], ["127.0.0.2"]),
        ("be2", ["bob@example.test"], ["127.0.0.3"]),
    ]
    assert [c[0] for c in env.deliver.calls if c[0] != "lmtp"] == ["domestic"]
    assert env.resolver.lookups == ["remote.cn"]  # no MX lookup for mailbox nodes
    with pytest.raises(KeyError):
        env.spool.load(qid)


def test_a_node_down_defers_on_the_retry_schedule(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: refused() if src == "be2" else ok(rcpts)
    qid = env.queue(["alice@example.test", "bob@example.test"])
    env.relay.handover(qid)
    m = env.spool.load(qid)
    assert m.state == "retry"
    assert m.envelope.done == ["alice@example.test"]
    assert "via LMTP to be2" in m.envelope.last_error
    assert m.envelope.next_attempt == env.clock.seconds() + 60  # the schedule's "1m"
    env.deliver.script = lambda ch, src, rcpts: ok(rcpts)
    env.deliver.calls.clear()
    env.clock.advance(61)
    assert lmtp_calls(env) == [("be2", ["bob@example.test"], ["127.0.0.3"])]
    with pytest.raises(KeyError):
        env.spool.load(qid)


def test_per_recipient_lmtp_replies_deliver_bounce_or_defer(env: Env) -> None:
    def script(ch: str, src: str, rcpts: list[str]) -> DeliveryResult:
        r = ok(rcpts)
        r.recipients["carol@example.test"] = Reply(452, "4.2.2", "Mailbox full")
        return r

    env.routing.held = set()  # type: ignore[attr-defined]
    env.deliver.script = script
    qid = env.queue(["alice@example.test", "carol@example.test"])
    env.relay.handover(qid)
    m = env.spool.load(qid)
    assert m.envelope.done == ["alice@example.test"]
    assert "Mailbox full" in m.envelope.last_error

    env.deliver.script = lambda ch, src, rcpts: result(rcpts, Reply(550, "5.1.1", "No such user"))
    env.clock.advance(61)
    with pytest.raises(KeyError):
        env.spool.load(qid)
    [(_, dsn)] = env.dsns()
    assert "carol@example.test" in dsn.get_payload()[1].as_string()


def test_a_held_user_waits_for_the_hold_retry_then_goes(env: Env) -> None:
    env.routing.held.add("alice@example.test")  # type: ignore[attr-defined]
    qid = env.queue(["alice@example.test"])
    env.relay.handover(qid)
    assert lmtp_calls(env) == []
    m = env.spool.load(qid)
    assert m.state == "retry"
    assert m.envelope.next_attempt == env.clock.seconds() + 5.0  # hold_retry, not the schedule
    assert "being moved" in m.envelope.last_error
    env.clock.advance(5)
    assert lmtp_calls(env) == []  # still held: waits again
    env.routing.held.clear()  # type: ignore[attr-defined]
    env.clock.advance(5)
    assert lmtp_calls(env) == [("be1", ["alice@example.test"], ["127.0.0.2"])]


def test_lookup_failure_defers(env: Env) -> None:
    env.routing.fail = True  # type: ignore[attr-defined]
    qid = env.queue(["alice@example.test"])
    env.relay.handover(qid)
    assert env.deliver.calls == []
    m = env.spool.load(qid)
    assert m.state == "retry" and "lookup failed" in m.envelope.last_error


def test_lmtp_options_and_source_address(tmp_path: Path) -> None:
    e = Env(tmp_path)
    seen: list[object] = []
    inner = e.deliver

    def deliver(reactor, tx, targets, options, pool, key, max_targets):  # type: ignore[no-untyped-def]
        seen.append(options)
        return inner(reactor, tx, targets, options, pool, key, max_targets)

    e.relay.deliver_fn = deliver
    routing = Routing()
    e.relay.mailboxes = MailboxRouting(
        routing.node_of, lambda r: False, NODES, bind_address="127.0.0.11"
    )
    e.relay.startService()
    try:
        e.relay.handover(e.queue(["alice@example.test"]))
        [options] = seen
        assert options.lmtp and options.tls == "none"  # type: ignore[attr-defined]
        assert options.bind_address == "127.0.0.11"  # type: ignore[attr-defined]
        assert options.helo == "mail.example.test"  # type: ignore[attr-defined]
    finally:
        e.relay.stopService()
        e.spool.close()
