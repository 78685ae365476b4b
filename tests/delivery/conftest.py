"""Fakes and fixtures for delivery tests: an in-memory store, the shared in-memory directory,
a Clock reactor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.delivery import LocalDelivery
from mailgw.interfaces import QuotaExceeded
from mailgw.model import Envelope
from mailgw.spool import Spool
from mailgw.testing.fakes import FakeDirectory


class FakeStore:
    """Keeps delivered messages per user; users can be made over quota or failing."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, list[bytes]] = {}
        self.over_quota: set[str] = set()
        self.failing: dict[str, BaseException] = {}
        self.calls: list[str] = []
        self.before_deliver: Callable[[str], None] | None = None

    def deliver(
        self,
        user: str,
        content_path: str,
        prefix: bytes = b"",
        folder: str = "INBOX",
        offset: int = 0,
    ):
        self.calls.append(user)
        if self.before_deliver is not None:
            self.before_deliver(user)
        if user in self.failing:
            raise self.failing[user]
        if user in self.over_quota:
            raise QuotaExceeded(user)
        with open(content_path, "rb") as f:
            f.seek(offset)
            data = prefix + f.read()
        box = self.mailboxes.setdefault(user, [])
        box.append(data)
        return len(box)


@pytest.fixture
def spool_root(tmp_path: Path) -> str:
    return str(tmp_path / "spool")


@pytest.fixture
def spool(spool_root: str) -> Iterator[Spool]:
    s = Spool(spool_root)
    yield s
    s.close()


class TurnClock(Clock):
    """A Clock that, like a real reactor, runs a call scheduled during ``advance`` only at the
    next ``advance`` (so "one message per reactor turn" is observable)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


@pytest.fixture
def clock() -> Clock:
    c = TurnClock()
    c.advance(1_000_000)
    return c


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory(
        ["alice@example.test", "bob@example.test", "carol@example.test"],
        {
            "team@example.test": ["alice@example.test", "bob@example.test"],
            "fwd@example.test": ["alice@example.test", "someone@elsewhere.org"],
        },
    )


@pytest.fixture
def make_delivery(spool, store, directory, clock) -> Iterator[Callable[..., LocalDelivery]]:
    made: list[LocalDelivery] = []

    def make(**kwargs) -> LocalDelivery:
        kwargs.setdefault("spool", spool)
        d = LocalDelivery(kwargs.pop("spool"), store, directory, clock, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.running:
            d.stopService()


@pytest.fixture
def submit(spool: Spool) -> Callable[..., str]:
    """Queue a message as the SMTP server would: ``submit(recipients, sender=..., body=...)``."""

    def submit(
        recipients: list[str],
        sender: str = "bob@example.org",
        body: bytes = b"Subject: test\r\n\r\nHello\r\n",
        to: Spool | None = None,
    ) -> str:
        msg = (to or spool).begin()
        msg.write(body)
        queued: list[str] = []
        msg.commit(Envelope(sender, recipients, received_at=1_000_000.0)).addCallback(queued.append)
        assert queued, "the spool's inline runner commits at once"
        return queued[0]

    return submit


@pytest.fixture
def run(clock: Clock) -> Callable[[LocalDelivery], None]:
    """Let the reactor run every delivery turn that is due now."""

    def run(delivery: LocalDelivery) -> None:
        while delivery.pending():
            clock.advance(0)

    return run
