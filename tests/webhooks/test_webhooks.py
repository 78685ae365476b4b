"""Webhook payloads, signatures and the outbox's retry bookkeeping."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from mailgw.webhooks.outbox import Outbox
from mailgw.webhooks.sender import payload_of, sign


def test_signature_is_hmac_of_timestamp_dot_body() -> None:
    body = b'{"event": "message.delivered"}'
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"k" * 16, 1700000000, body) == "sha256=" + expected


def test_events_mapped_from_tracking() -> None:
    assert payload_of("delivered", "q", 1.0, {"recipient": "a@x", "uid": 3}) == (
        "delivered",
        {"recipient": "a@x"},
    )
    assert payload_of("bounced", "q", 1.0, {"recipients": ["a@x"], "reason": "550"})[0] == "failed"
    assert payload_of("expired", "q", 1.0, {})[1] == {"cause": "expired"}
    verdicts = [{"verdict": "accept"}, {"verdict": "quarantine", "check": "rules", "reason": "r"}]
    assert payload_of("policy", "q", 1.0, {"verdicts": verdicts}) == (
        "quarantined",
        {"check": "rules", "reason": "r"},
    )
    assert payload_of("policy", "q", 1.0, {"verdicts": verdicts[:1]}) == ("", None)
    assert payload_of("received", "q", 1.0, {}) == ("", None)


def test_outbox_survives_reopen_and_counts_failures(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sqlite")
    box = Outbox(path)
    box.add([("d1", "http://r/", "message.delivered", b"{}", 100.0)])
    (row,) = box.due(100.0)
    box.failed(row.id, 160.0, "HTTP 503")
    assert box.due(150.0) == [] and box.next_due() == 160.0
    assert box.counts() == {"pending": 1, "failing": 1}
    box.close()
    box = Outbox(path)  # a restart
    (row,) = box.due(160.0)
    assert row.attempts == 1 and row.delivery == "d1"
    box.sent(row.id)
    assert box.counts() == {"pending": 0, "failing": 0}
    box.add([("d2", "http://r/", "message.failed", b"{}", 10.0)])
    assert [r.delivery for r in box.expire(20.0)] == ["d2"] and box.next_due() is None


def test_tracker_listeners_hear_every_event_even_without_a_database() -> None:
    from mailgw.tracking import Tracker

    heard: list[tuple[str, str, float, dict[str, object]]] = []
    tracker = Tracker(None, clock=lambda: 5.0)

    def broken(*args: object) -> None:
        raise RuntimeError("a listener bug does not stop recording")

    tracker.listeners.extend([broken, lambda *a: heard.append(a)])  # type: ignore[arg-type]
    tracker.record("delivered", "q1", message_id="<m>", recipient="a@x")
    assert heard == [("delivered", "q1", 5.0, {"recipient": "a@x", "message_id": "<m>"})]


class _Settings:
    urls = ("http://hook.test/a",)
    events = ("delivered", "failed", "quarantined")
    timeout = 5.0
    retry_initial = 10.0
    retry_max = 25.0
    max_age = 1000.0


class _Response:
    phrase = b"OK"
    length = 0

    def __init__(self, code: int) -> None:
        self.code = code

    def deliverBody(self, protocol: object) -> None:  # noqa: N802 (Twisted)
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.dataReceived(b"")  # type: ignore[attr-defined]
        protocol.connectionLost(Failure(ResponseDone()))  # type: ignore[attr-defined]


class _Agent:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.sent: list[tuple[bytes, object]] = []

    def request(self, method: bytes, url: bytes, headers: object, body: object) -> object:
        from twisted.internet import defer

        self.sent.append((url, headers))
        code = self.codes.pop(0)
        if code == 0:
            return defer.fail(ConnectionRefusedError("refused"))
        return defer.succeed(_Response(code))


def test_service_sends_signed_retries_with_backoff_and_removes_on_2xx(tmp_path: Path) -> None:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from mailgw.webhooks.sender import WebhookService

    clock = Clock()
    clock.advance(1000)

    def run(f: object, *args: object) -> object:
        return defer.maybeDeferred(f, *args)  # type: ignore[arg-type]

    agent = _Agent()
    agent.codes = [0, 503, 204]
    box = Outbox(str(tmp_path / "w.sqlite"))
    clock.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
    service = WebhookService(clock, run, box, _Settings(), b"s" * 16, agent=agent)
    service.startService()
    service.listener("delivered", "q1", 1000.0, {"recipient": "a@x", "user": "a@x"})
    assert len(agent.sent) == 1 and box.counts() == {"pending": 1, "failing": 1}
    clock.advance(9)
    assert len(agent.sent) == 1  # first retry after retry_initial
    clock.advance(1)
    assert len(agent.sent) == 2 and box.counts()["failing"] == 1
    clock.advance(19)
    assert len(agent.sent) == 2  # then doubled: 20s
    clock.advance(1)
    assert len(agent.sent) == 3 and box.counts() == {"pending": 0, "failing": 0}
    url, headers = agent.sent[-1]
    assert url == b"http://hook.test/a"
    assert headers.getRawHeaders(b"x-mailgw-event") == [b"message.delivered"]  # type: ignore[attr-defined]
    service.listener("received", "q2", 1000.0, {})  # not a webhook event
    assert len(agent.sent) == 3
    service.stopService()
