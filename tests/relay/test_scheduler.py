"""Relay scheduler: routing, failover, retries, bounces, window and per-domain limits (Clock)."""

from __future__ import annotations

import email
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailgw.delivery import LocalDelivery
from mailgw.model import Envelope, Reply
from mailgw.relay.channels import Channel, ChannelSelector, Router, RoutingRule, parse_tiers
from mailgw.relay.client import ConnectFailed, DeliveryResult
from mailgw.relay.mx import MXHost, NoSuchDomain, NullMX, TemporaryDNSError
from mailgw.relay.retry_schedule import RetrySchedule
from mailgw.relay.scheduler import RelayScheduler, RelaySettings, _split_host
from mailgw.spool import Spool
from mailgw.testing.fakes import FakeDirectory


class FakeResolver:
    def __init__(self) -> None:
        self.errors: dict[str, Exception] = {}
        self.lookups: list[str] = []

    def resolve_mx(self, domain: str) -> Deferred[list[MXHost]]:
        self.lookups.append(domain)
        if domain in self.errors:
            return fail(self.errors[domain])
        return succeed([MXHost(10, f"mx.{domain}", ("127.0.0.9",))])

    def resolve_host(self, name: str) -> Deferred[tuple[str, ...]]:
        return succeed(("127.0.0.8",))


Script = Callable[[str, str, list[str]], DeliveryResult]


class FakeDeliver:
    """Records (channel, source, recipients); answers per channel via ``script``."""

    def __init__(self, script: Script | None = None) -> None:
        self.calls: list[tuple[str, str, list[str], list[str]]] = []
        self.script = script or (lambda ch, src, rcpts: ok(rcpts))
        self.pending: list[tuple[Deferred[DeliveryResult], list[str]]] = []
        self.hold = False
        self.prefixes: list[bytes] = []

    def __call__(self, reactor, tx, targets, options, pool, key, max_targets):
        channel, source = key
        self.calls.append((channel, source, list(tx.recipients), [t.address for t in targets]))
        self.prefixes.append(tx.prefix)
        if self.hold:
            d: Deferred[DeliveryResult] = Deferred()
            self.pending.append((d, list(tx.recipients)))
            return d
        return succeed(self.script(channel, source, list(tx.recipients)))


def result(rcpts: list[str], reply: Reply, mx: str = "mx.test") -> DeliveryResult:
    r = DeliveryResult(connected=True, mx=mx, address="127.0.0.9", port=25)
    r.recipients = {x: reply for x in rcpts}
    r.reply = reply
    return r


def ok(rcpts: list[str]) -> DeliveryResult:
    return result(rcpts, Reply(250, "2.0.0", "queued"))


def refused() -> DeliveryResult:
    r = DeliveryResult(mx="mx.test", address="127.0.0.9", port=25)
    r.error = ConnectFailed("connection refused", "connect")
    return r


def make_selector(clock: Clock, threshold: int = 5) -> ChannelSelector:
    channels = [
        Channel("domestic", source_addresses=("127.0.0.4",)),
        Channel("overseas", source_addresses=("127.0.0.2",)),
        Channel("sdn", source_addresses=("127.0.0.3",)),
        Channel("relayhost", kind="smarthost", hosts=("smart.test:2525",)),
    ]
    router = Router(
        [
            RoutingRule(parse_tiers("domestic; overseas, sdn"), recipient_domains=(".cn",)),
            RoutingRule(parse_tiers("relayhost"), recipient_domains=("smart.example",)),
        ],
        parse_tiers("overseas, sdn"),
    )
    return ChannelSelector(channels, router, clock, failure_threshold=threshold, cooldown=600)


class Env:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.spool = Spool(str(tmp_path / "spool"))
        self.resolver = FakeResolver()
        self.deliver = FakeDeliver()
        self.selector = make_selector(self.clock)
        settings.setdefault("status_path", str(tmp_path / "relay" / "channels.json"))
        self.relay = RelayScheduler(
            self.spool,
            self.selector,
            self.resolver,
            self.clock,
            RetrySchedule.parse("1m, 5m", "1h"),
            "mail.example.test",
            settings=RelaySettings(**settings),
            deliver_fn=self.deliver,
        )

    def queue(
        self, recipients: list[str], sender: str = "alice@example.test", state: str = "outbound"
    ) -> str:
        incoming = self.spool.begin()
        incoming.write(b"From: alice@example.test\r\nSubject: hi\r\n\r\nbody\r\n")
        qid: str = []  # type: ignore[assignment]
        incoming.commit(Envelope(sender, recipients, received_at=self.clock.seconds())).addCallback(
            lambda q: qid.append(q)  # type: ignore[attr-defined]
        )
        queue_id = qid[0]
        self.spool.move(queue_id, state)
        return queue_id

    def dsns(self) -> list[tuple[Envelope, email.message.Message]]:
        out = []
        for q in self.spool.list("incoming"):
            m = self.spool.load(q)
            with m.open_content() as f:
                out.append((m.envelope, email.message_from_bytes(f.read())))
        return out


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    e.relay.startService()
    yield e
    e.relay.stopService()
    e.spool.close()


def test_domestic_first_then_overseas_sdn_round_robin(env: Env) -> None:
    a = env.queue(["bob@example.cn"])
    env.relay.handover(a)
    assert env.deliver.calls[0][:3] == ("domestic", "127.0.0.4", ["bob@example.cn"])
    assert env.spool.list("outbound") == env.spool.list("active") == []
    assert env.spool.list("retry") == []
    for i in range(10):
        env.relay.handover(env.queue([f"u{i}@example.com"]))
    used = [c[0] for c in env.deliver.calls[1:]]
    assert used.count("overseas") == used.count("sdn") == 5


def test_channel_failure_fails_over_at_once(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: (
        result(rcpts, Reply(421, "4.7.0", "try later")) if ch == "overseas" else ok(rcpts)
    )
    qid = env.queue(["bob@example.com"])
    env.relay.handover(qid)
    assert [c[0] for c in env.deliver.calls] == ["overseas", "sdn"]
    assert env.spool.list("retry") == []
    with pytest.raises(KeyError):
        env.spool.load(qid)


def test_5xx_about_the_sending_ip_is_a_channel_failure(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: (
        result(rcpts, Reply(554, "5.7.1", "Service unavailable; Client host [127.0.0.2] blocked"))
        if src == "127.0.0.2"
        else ok(rcpts)
    )
    env.relay.handover(env.queue(["bob@example.com"]))
    assert [c[1] for c in env.deliver.calls] == ["127.0.0.2", "127.0.0.3"]
    assert env.dsns() == []


def test_all_channels_down_defer_retry_then_bounce_after_max_age(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: refused()
    qid = env.queue(["bob@example.com"])
    env.relay.handover(qid)
    assert env.spool.list("retry") == [qid]
    e = env.spool.load(qid).envelope
    assert e.attempts == 1 and e.next_attempt == 60
    assert "connection refused" in e.last_error
    calls = len(env.deliver.calls)
    env.clock.advance(59)
    assert len(env.deliver.calls) == calls
    env.clock.advance(1)
    assert len(env.deliver.calls) == calls + 2
    assert env.spool.load(qid).envelope.next_attempt == 60 + 300
    # The schedule repeats 5m until the maximum age (1h), then the message bounces.
    for _ in range(20):
        env.clock.advance(300)
    with pytest.raises(KeyError):
        env.spool.load(qid)
    [(dsn_env, dsn)] = env.dsns()
    assert dsn_env.sender == "" and dsn_env.recipients == ["alice@example.test"]
    assert dsn.get_content_type() == "multipart/report"
    status = dsn.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; bob@example.com" in status
    assert "Action: failed" in status
    assert "delivery time expired" in status


def test_delay_warning_once_after_the_configured_time(tmp_path: Path) -> None:
    env = Env(tmp_path, delay_warning_after=240.0)
    env.relay.startService()
    env.deliver.script = lambda ch, src, rcpts: refused()
    qid = env.queue(["bob@example.com"])
    env.relay.handover(qid)
    assert env.dsns() == []  # first deferral at 0s: too early to warn
    env.clock.advance(60)  # second attempt at 60s: still too early
    assert env.dsns() == []
    env.clock.advance(300)  # third attempt at 360s: past 240s -> one delay DSN
    [(dsn_env, dsn)] = env.dsns()
    assert dsn_env.sender == "" and dsn_env.recipients == ["alice@example.test"]
    status = dsn.get_payload()[1].as_string()
    assert "Action: delayed" in status and "Status: 4." in status
    assert "Will-Retry-Until:" in status
    assert env.spool.load(qid).envelope.delay_warned
    env.clock.advance(300)  # later deferrals do not warn again
    assert len(env.dsns()) == 1
    env.relay.stopService()
    env.spool.close()


def test_no_delay_warning_by_default_or_for_the_null_sender(tmp_path: Path) -> None:
    env = Env(tmp_path, delay_warning_after=60.0)
    env.relay.startService()
    env.deliver.script = lambda ch, src, rcpts: refused()
    env.relay.handover(env.queue(["bob@example.com"], sender=""))
    env.clock.advance(60)
    env.clock.advance(300)
    assert env.dsns() == []
    env.relay.stopService()
    env.spool.close()
    off = Env(tmp_path / "off")
    off.relay.startService()
    off.deliver.script = lambda ch, src, rcpts: refused()
    off.relay.handover(off.queue(["bob@example.com"]))
    for _ in range(3):
        off.clock.advance(300)
    assert off.dsns() == []
    off.relay.stopService()
    off.spool.close()


def test_recipient_5xx_bounces_at_once_others_delivered(env: Env) -> None:
    def script(ch: str, src: str, rcpts: list[str]) -> DeliveryResult:
        r = ok(rcpts)
        r.recipients["nobody@example.com"] = Reply(550, "5.1.1", "no such user")
        return r

    env.deliver.script = script
    qid = env.queue(["bob@example.com", "nobody@example.com"])
    env.relay.handover(qid)
    assert len(env.deliver.calls) == 1
    with pytest.raises(KeyError):
        env.spool.load(qid)
    [(_, dsn)] = env.dsns()
    status = dsn.get_payload()[1].as_string()
    assert "nobody@example.com" in status and "Status: 5.1.1" in status
    assert "bob@example.com" not in status
    assert env.relay.sent == 1 and env.relay.bounced == 1


def test_never_bounce_a_bounce(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: result(rcpts, Reply(550, "5.1.1", "no"))
    qid = env.queue(["bob@example.com"], sender="")
    env.relay.handover(qid)
    assert env.dsns() == []
    with pytest.raises(KeyError):
        env.spool.load(qid)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NullMX("null.example", "null MX"), "5.1.10"),
        (NoSuchDomain("null.example", "NXDOMAIN"), "5.1.2"),
    ],
)
def test_null_mx_and_no_such_domain_bounce_at_once(env: Env, error: Exception, status: str) -> None:
    env.resolver.errors["null.example"] = error
    env.relay.handover(env.queue(["bob@null.example"]))
    assert env.deliver.calls == []
    [(_, dsn)] = env.dsns()
    assert f"Status: {status}" in dsn.get_payload()[1].as_string()


def test_temporary_dns_failure_defers(env: Env) -> None:
    env.resolver.errors["slow.example"] = TemporaryDNSError("slow.example", "SERVFAIL")
    qid = env.queue(["bob@slow.example"])
    env.relay.handover(qid)
    assert env.spool.list("retry") == [qid]
    assert "SERVFAIL" in env.spool.load(qid).envelope.last_error


def test_partial_progress_is_recorded_and_not_resent(env: Env) -> None:
    env.deliver.script = lambda ch, src, rcpts: (
        refused() if rcpts == ["b@down.example"] else ok(rcpts)
    )
    qid = env.queue(["a@up.example", "b@down.example"])
    env.relay.handover(qid)
    e = env.spool.load(qid).envelope
    assert e.done == ["a@up.example"]
    env.deliver.script = lambda ch, src, rcpts: ok(rcpts)
    env.deliver.calls.clear()
    env.clock.advance(60)
    assert [c[2] for c in env.deliver.calls] == [["b@down.example"]]
    with pytest.raises(KeyError):
        env.spool.load(qid)


class CountingSpool(Spool):
    """A Spool that counts envelope rewrites."""

    updates: list[str]

    def update(self, queue_id: str, envelope: object, state: str | None = None) -> None:
        self.updates.append(queue_id)
        super().update(queue_id, envelope, state)


def test_single_job_delivered_is_removed_without_rewriting_the_envelope(tmp_path: Path) -> None:
    e = Env(tmp_path)
    e.spool = e.relay.spool = CountingSpool(str(tmp_path / "spool"))
    e.spool.updates = []
    captured: list[Any] = []
    inner = e.deliver

    def deliver_fn(reactor, tx, *rest):
        captured.append(tx)
        return inner(reactor, tx, *rest)

    e.relay.deliver_fn = deliver_fn
    e.relay.startService()
    one = e.queue(["a@one.example", "b@one.example"])
    e.relay.handover(one)
    assert e.spool.updates == []  # one job, all delivered: straight to remove
    assert captured[0].data == b"From: alice@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    with pytest.raises(KeyError):
        e.spool.load(one)
    two = e.queue(["a@one.example", "b@two.example"])
    e.relay.handover(two)
    assert e.spool.updates == [two, two]  # two jobs: each records its progress
    with pytest.raises(KeyError):
        e.spool.load(two)
    e.relay.stopService()


def test_large_content_is_streamed_and_missing_content_left_to_the_client(
    tmp_path: Path,
) -> None:
    from mailgw.relay import scheduler

    e = Env(tmp_path)
    captured: list[Any] = []
    inner = e.deliver
    e.relay.deliver_fn = lambda reactor, tx, *rest: (
        captured.append(tx),
        inner(reactor, tx, *rest),
    )[1]
    e.relay.startService()
    big = e.spool.begin()
    big.write(b"Subject: big\r\n\r\n" + b"x" * (scheduler.MEMORY_SEND_LIMIT + 10))
    qid: list[str] = []
    big.commit(Envelope("alice@example.test", ["a@one.example"])).addCallback(qid.append)
    e.spool.move(qid[0], "outbound")
    e.relay.handover(qid[0])
    gone = e.queue(["b@one.example"])
    Path(e.spool.content_path(gone)).unlink()
    e.relay.handover(gone)
    assert [tx.data for tx in captured] == [None, None]
    e.relay.stopService()


def test_smarthost_channel_uses_its_hosts(env: Env) -> None:
    env.relay.handover(env.queue(["x@smart.example"]))
    assert env.deliver.calls[0][0] == "relayhost"
    assert env.deliver.calls[0][3] == ["127.0.0.8"]
    assert "smart.example" not in env.resolver.lookups


def test_window_prefers_fresh_mail_over_retries(tmp_path: Path) -> None:
    e = Env(tmp_path, window=2, retry_share=0.5)
    e.deliver.hold = True
    olds = [e.queue([f"old{i}@example.com"], state="retry") for i in range(4)]
    e.relay.startService()
    # Retries may use half the window: one at a time.
    assert [c[2] for c in e.deliver.calls] == [["old0@example.com"]]
    fresh = [e.queue([f"new{i}@example.com"]) for i in range(3)]
    for q in fresh:
        e.relay.handover(q)
    assert [c[2][0] for c in e.deliver.calls] == ["old0@example.com", "new0@example.com"]
    d, rcpts = e.deliver.pending.pop(0)
    d.callback(ok(rcpts))
    # The freed slot goes to fresh mail although retries are older.
    assert e.deliver.calls[-1][2] == ["new1@example.com"]
    while e.deliver.pending:
        d, rcpts = e.deliver.pending.pop(0)
        d.callback(ok(rcpts))
    assert e.relay.pending() == 0
    assert sorted(c[2][0] for c in e.deliver.calls) == sorted(
        [f"old{i}@example.com" for i in range(4)] + [f"new{i}@example.com" for i in range(3)]
    )
    assert olds and e.spool.list("retry") == []
    e.relay.stopService()


def test_per_domain_concurrency_limit(tmp_path: Path) -> None:
    e = Env(tmp_path, per_domain=2, window=10)
    e.relay.startService()
    e.deliver.hold = True
    for i in range(5):
        e.relay.handover(e.queue([f"u{i}@busy.example"]))
    e.relay.handover(e.queue(["v@other.example"]))
    busy = [c for c in e.deliver.calls if c[2][0].endswith("@busy.example")]
    assert len(busy) == 2
    assert any(c[2] == ["v@other.example"] for c in e.deliver.calls)
    while e.deliver.pending:
        d, rcpts = e.deliver.pending.pop(0)
        d.callback(ok(rcpts))
    assert len(e.deliver.calls) == 6
    d = e.relay.wait_idle()
    assert d.called
    e.relay.stopService()


def test_busy_channels_are_waited_for(tmp_path: Path) -> None:
    e = Env(tmp_path)
    for name in ("overseas", "sdn"):
        e.selector.health[name].in_flight = 20  # at the concurrency limit
    e.relay.startService()
    e.relay.handover(e.queue(["x@example.com"]))
    assert e.deliver.calls == []
    e.selector.health["sdn"].in_flight = 0
    e.clock.advance(0.05)
    assert [c[0] for c in e.deliver.calls] == ["sdn"]
    e.relay.stopService()


def test_held_message_is_skipped_and_status_file_written(env: Env, tmp_path: Path) -> None:
    env.deliver.script = lambda ch, src, rcpts: refused()
    qid = env.queue(["bob@example.com"])
    env.relay.handover(qid)
    env.spool.move(qid, "hold")
    env.deliver.calls.clear()
    env.clock.advance(60)
    assert env.deliver.calls == []
    assert env.spool.list("hold") == [qid]
    env.clock.advance(10)
    status = json.loads((tmp_path / "relay" / "channels.json").read_text())
    names = {c["name"]: c for c in status["channels"]}
    assert names["overseas"]["failures"] == 1
    assert "connection refused" in names["overseas"]["last_error"]
    assert status["queue"]["deferred"] == 1


def test_rescan_picks_up_flushed_retry(tmp_path: Path) -> None:
    e = Env(tmp_path, scan_interval=10)
    e.relay.startService()
    e.deliver.script = lambda ch, src, rcpts: refused()
    qid = e.queue(["bob@example.com"])
    e.relay.handover(qid)
    envelope = e.spool.load(qid).envelope
    assert envelope.next_attempt == 60
    envelope.next_attempt = 0.0  # what `mailgw queue flush` writes
    e.spool.update(qid, envelope)
    e.deliver.script = lambda ch, src, rcpts: ok(rcpts)
    e.clock.advance(9)
    assert e.spool.list("retry") == [qid]
    e.clock.advance(1)  # the rescan finds it due
    with pytest.raises(KeyError):
        e.spool.load(qid)
    e.relay.stopService()


def test_signer_prefix_is_sent(tmp_path: Path) -> None:
    e = Env(tmp_path)
    e.relay.signer = lambda envelope, path: b"DKIM-Signature: v=1; test\r\n"
    e.relay.startService()
    e.relay.handover(e.queue(["x@example.com"]))
    assert e.deliver.prefixes == [b"DKIM-Signature: v=1; test\r\n"]
    e.relay.stopService()


def test_split_host() -> None:
    assert _split_host("smart.test") == ("smart.test", 25)
    assert _split_host("smart.test:2525") == ("smart.test", 2525)
    assert _split_host("[::1]:587") == ("::1", 587)
    assert _split_host("[::1]") == ("::1", 25)


def directory() -> FakeDirectory:
    return FakeDirectory(
        ["carol@example.test"],
        {"team@example.test": ["carol@example.test", "dave@partner.example"]},
    )


class Store:
    def __init__(self) -> None:
        self.got: list[str] = []

    def deliver(self, user: str, path: str, prefix: bytes = b"", offset: int = 0) -> int:
        self.got.append(user)
        return len(self.got)


def test_local_delivery_hands_external_recipients_over(env: Env) -> None:
    store = Store()
    local = LocalDelivery(env.spool, store, directory(), env.clock, relay=env.relay)
    local.startService()
    incoming = env.spool.begin()
    incoming.write(b"Subject: x\r\n\r\nbody\r\n")
    incoming.commit(Envelope("alice@example.test", ["team@example.test", "erin@far.example"]))
    env.clock.advance(0)
    assert store.got == ["carol@example.test"]
    sent = sorted(r for c in env.deliver.calls for r in c[2])
    assert sent == ["dave@partner.example", "erin@far.example"]
    assert env.spool.list("incoming") == env.spool.list("active") == []
    local.stopService()


def test_crash_after_handover_rewrite_is_handed_over_again(env: Env) -> None:
    """Envelope rewritten to external targets, then a crash before the rename: recovery moves
    active back to incoming and local delivery hands it over again, with no local copy."""
    store = Store()
    qid = env.queue(["erin@far.example"], state="active")
    local = LocalDelivery(env.spool, store, directory(), env.clock, relay=env.relay)
    local.startService()  # recovers active -> incoming, then dispatches
    env.clock.advance(0)
    assert store.got == []
    assert [c[2] for c in env.deliver.calls] == [["erin@far.example"]]
    with pytest.raises(KeyError):
        env.spool.load(qid)
    local.stopService()


def test_rescans_keep_one_retry_timer(tmp_path: Path) -> None:
    e = Env(tmp_path, scan_interval=1)
    e.relay.startService()
    e.deliver.script = lambda ch, src, rcpts: refused()
    e.relay.handover(e.queue(["bob@example.com"]))
    for _ in range(5):
        e.clock.advance(1)
    # the retry timer, the rescan timer and the status writer: nothing piles up
    assert len(e.clock.getDelayedCalls()) == 3
    e.relay.stopService()
    assert e.clock.getDelayedCalls() == []
