"""Session reuse through the whole relay: the scheduler, the real client and a counting
SMTP peer on loopback (the real reactor): many messages to one destination share a few
sessions, within the channel's concurrency, even when the peer hangs up cached sessions;
a failing channel still fails over."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import maybeDeferred

from mailgw.model import Envelope
from mailgw.relay.channels import Channel, ChannelSelector, Router, parse_tiers
from mailgw.relay.client import ConnectionPool, Timeouts
from mailgw.relay.retry_schedule import RetrySchedule
from mailgw.relay.scheduler import RelayScheduler, RelaySettings
from mailgw.spool import Spool
from tests.relay.reactorhelper import reactor, sleep, within
from tests.relay.smtpserver import Recorder, Script, start_smtp

FAST = Timeouts(**{name: 3.0 for name in Timeouts.__dataclass_fields__})


class HostResolver:
    def resolve_host(self, name: str) -> Any:
        from twisted.internet.defer import succeed

        return succeed(("127.0.0.1",))


@pytest_twisted.async_yield_fixture
async def peers() -> AsyncIterator[Callable[[Script], tuple[int, Recorder]]]:
    ports: list[Any] = []
    recorders: list[Recorder] = []

    def start(script: Script) -> tuple[int, Recorder]:
        port, rec = start_smtp(reactor, script)
        ports.append(port)
        recorders.append(rec)
        return port.getHost().port, rec

    yield start
    for rec in recorders:
        for proto in rec.protocols:
            if proto.transport is not None and proto.transport.connected:
                proto.transport.abortConnection()
    for port in ports:
        await within(maybeDeferred(port.stopListening))
    await sleep(0)


def relay(tmp_path: Path, channels: list[Channel], tiers: str, **pool: Any) -> RelayScheduler:
    selector = ChannelSelector(
        channels, Router([], parse_tiers(tiers)), reactor, failure_threshold=1000
    )
    return RelayScheduler(
        Spool(str(tmp_path / "spool")),
        selector,
        HostResolver(),
        reactor,
        RetrySchedule.parse("1m", "1h"),
        "relay.test",
        pool=ConnectionPool(reactor, **pool),
        settings=RelaySettings(per_domain=50, timeouts=FAST),
    )


def queue(scheduler: RelayScheduler, count: int) -> list[str]:
    """``count`` messages, each to its own recipient at the same domain, in ``outbound``."""
    ids = []
    spool = scheduler.spool
    for i in range(count):
        incoming = spool.begin()
        incoming.write(f"Subject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\nbody {i}\r\n".encode())
        d = incoming.commit(Envelope("alice@example.test", [f"r{i}@dest.test"]))
        qid: list[str] = []
        d.addCallback(qid.append)
        spool.move(qid[0], "outbound")
        ids.append(qid[0])
    return ids


def received(rec: Recorder) -> list[str]:
    return sorted(re.search(rb"Subject: (m\d+)", m).group(1).decode() for m in rec.messages)


async def run(scheduler: RelayScheduler) -> None:
    scheduler.startService()
    try:
        await within(scheduler.wait_idle(), 30)
    finally:
        await within(scheduler.stopService())


@pytest_twisted.ensureDeferred
async def test_many_messages_share_few_sessions_within_the_concurrency(peers, tmp_path) -> None:
    port, rec = peers(Script())
    sink = Channel(
        "sink", kind="smarthost", hosts=(f"127.0.0.1:{port}",), tls="none", concurrency=3
    )
    scheduler = relay(tmp_path, [sink], "sink")
    queue(scheduler, 60)
    await run(scheduler)
    assert received(rec) == sorted(f"m{i}" for i in range(60))
    assert scheduler.sent == 60 and not scheduler.spool.list("active")
    assert rec.max_open <= 3 and rec.connections <= 3
    assert "RSET" not in rec.commands
    assert scheduler.pool.opened == rec.connections


@pytest_twisted.ensureDeferred
async def test_peer_hanging_up_cached_sessions_loses_and_duplicates_nothing(
    peers, tmp_path
) -> None:
    port, rec = peers(Script(close_after_messages=4))
    sink = Channel(
        "sink", kind="smarthost", hosts=(f"127.0.0.1:{port}",), tls="none", concurrency=3
    )
    scheduler = relay(tmp_path, [sink], "sink", max_reuse=1000)
    queue(scheduler, 40)
    await run(scheduler)
    assert received(rec) == sorted(f"m{i}" for i in range(40))  # each exactly once
    assert scheduler.sent == 40 and scheduler.deferred == 0
    assert all(p.messages <= 4 for p in rec.protocols)
    assert rec.max_open <= 3


@pytest_twisted.ensureDeferred
async def test_per_session_message_limit_through_the_scheduler(peers, tmp_path) -> None:
    port, rec = peers(Script())
    sink = Channel(
        "sink", kind="smarthost", hosts=(f"127.0.0.1:{port}",), tls="none", concurrency=2
    )
    scheduler = relay(tmp_path, [sink], "sink", max_reuse=5)
    queue(scheduler, 30)
    await run(scheduler)
    assert received(rec) == sorted(f"m{i}" for i in range(30))
    assert all(p.mails <= 5 for p in rec.protocols) and rec.connections >= 6
    assert rec.max_open <= 2


@pytest_twisted.ensureDeferred
async def test_failover_from_a_channel_whose_sessions_are_refused(peers, tmp_path) -> None:
    """The first channel's peer answers every MAIL with 421 (also on fresh sessions): each
    message goes over to the second channel at once, which reuses its sessions."""
    bad_port, bad = peers(Script(mail_reply="421 4.7.0 try again later"))
    good_port, good = peers(Script())
    channels = [
        Channel(name, kind="smarthost", hosts=(f"127.0.0.1:{port}",), tls="none", concurrency=2)
        for name, port in (("first", bad_port), ("second", good_port))
    ]
    scheduler = relay(tmp_path, channels, "first; second")
    queue(scheduler, 10)
    await run(scheduler)
    assert received(good) == sorted(f"m{i}" for i in range(10))
    assert not any(bad.messages)  # (pipelined: its 354 after the 421 got an empty body)
    assert bad.connections >= 1
    assert scheduler.sent == 10 and scheduler.deferred == 0
    assert good.connections <= 2
