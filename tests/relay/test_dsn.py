"""RFC 3464 DSNs, parsed back with the standard library's email package."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest

from mailgw.model import Envelope
from mailgw.relay.dsn import RecipientStatus, build_dsn, original_headers, should_bounce

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\nTo: bob@dest.test\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nbody line\r\n"
)
T_ARRIVAL = 1_700_000_000.0
T_NOW = T_ARRIVAL + 3600


def envelope(**kw) -> Envelope:
    return Envelope(
        "alice@example.org",
        ["bob@dest.test", "carol@dest.test"],
        queue_id="Q123",
        received_at=T_ARRIVAL,
        **kw,
    )


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_failure_dsn_structure() -> None:
    failed = [
        RecipientStatus(
            "bob@dest.test", "5.1.1", "mx1.dest.test", "550 5.1.1 <bob@dest.test>: user unknown"
        ),
        ("carol@dest.test", "5.0.0", "", ""),
    ]
    data = build_dsn(ORIGINAL, envelope(), failed, "gw.example.org", now=T_NOW)
    assert b"\n" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.org>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"].endswith("@gw.example.org>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode()
    assert "could not" in text and "<bob@dest.test> (remote server mx1.dest.test):" in text
    assert "user unknown" in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example.org"
    assert per_message["X-Mailgw-Queue-ID"] == "Q123"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@dest.test"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.dest.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@dest.test>: user unknown"
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 23:13:20 +0000"
    assert carol["Remote-MTA"] is None and carol["Diagnostic-Code"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload() == ORIGINAL.split(b"\r\n\r\n")[0].decode() + "\r\n"
    assert "body line" not in data.decode()
    assert msg["Content-Transfer-Encoding"] == "7bit"


def test_delay_dsn() -> None:
    data = build_dsn(
        ORIGINAL,
        envelope(),
        [("bob@dest.test", "4.4.1", "mx.dest.test", "connection refused")],
        "gw.example.org",
        kind="delay",
        will_retry_until=T_ARRIVAL + 5 * 86400,
        last_attempt_date=T_NOW,
        now=T_NOW,
    )
    msg = parse(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = msg.get_payload()
    rcpt = status.get_payload()[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.4.1"
    assert rcpt["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert "retried until" in msg.get_payload()[0].get_payload(decode=True).decode()


def test_multiline_diagnostic_is_one_line_and_utf8_addresses() -> None:
    data = build_dsn(
        "X-Note: grüße\r\n".encode() + ORIGINAL,
        envelope(),
        [("用户@dest.test", "5.1.1", "", "550-5.1.1 first\r\n550 5.1.1 second")],
        "gw.example.org",
    )
    msg = parse(data)
    rcpt = msg.get_payload()[1].get_payload()[1]
    assert rcpt["Diagnostic-Code"] == "smtp; 550-5.1.1 first 550 5.1.1 second"
    assert data.count("Final-Recipient: utf-8; 用户@dest.test".encode()) == 1
    assert msg.get_payload()[2]["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_headers_only_and_lf_input() -> None:
    assert original_headers(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"A: 1\r\nB: 2") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"") == b"\r\n"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        build_dsn(ORIGINAL, envelope(), [], "gw")
    with pytest.raises(ValueError):
        build_dsn(ORIGINAL, envelope(), [("a@b", "5.0.0", "", "")], "gw", kind="warning")


def test_never_bounce_a_bounce() -> None:
    assert should_bounce(envelope())
    assert not should_bounce(Envelope("", ["x@y.test"]))
    assert not should_bounce(Envelope("<>", ["x@y.test"]))
