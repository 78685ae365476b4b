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
