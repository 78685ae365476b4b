"""Pure parts of the SMTP client: DATA encoding, reply parsing, failure classification."""

from __future__ import annotations

import random

import pytest

from mailgw.model import Reply
from mailgw.relay.client import (
    CHANNEL_FAILURE,
    MESSAGE_PERMANENT,
    OK,
    RECIPIENT_PERMANENT,
    Classifier,
    ClientOptions,
    ConnectFailed,
    DataEncoder,
    DeliveryResult,
    classify,
    parse_ehlo,
    parse_reply,
)


def encode(chunks: list[bytes]) -> bytes:
    enc = DataEncoder()
    return b"".join(enc.encode(c) for c in chunks) + enc.finish()


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b".x\n.\n..\n", b"..x\r\n..\r\n...\r\n.\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"no dot . here\n", b"no dot . here\r\n.\r\n"),
    ],
)
def test_data_encoder(raw: bytes, wire: bytes) -> None:
    assert encode([raw]) == wire


def test_data_encoder_is_independent_of_chunk_boundaries() -> None:
    raw = b"Subject: x\r\n\r\n.a\r\n\r\n.\n\r.b\rc\n..\r\nend\r"
    whole = encode([raw])
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 8)))
        chunks = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert encode(chunks) == whole
    assert all(len(c) == 1 for c in [raw[i : i + 1] for i in range(len(raw))])
    assert encode([raw[i : i + 1] for i in range(len(raw))]) == whole
    assert b"\n" not in whole.replace(b"\r\n", b"") and b"\r" not in whole.replace(b"\r\n", b"")


def test_parse_reply_strips_enhanced_codes_per_line() -> None:
    assert parse_reply(["250-2.0.0 first", "250 2.0.0 second"]) == Reply(
        250, "2.0.0", "first\nsecond"
    )
    assert parse_reply(["550 5.1.1"]) == Reply(550, "5.1.1", "")
    assert parse_reply(["220"]) == Reply(220, "", "")
    assert parse_reply(["250 4.0.0 mismatched class"]) == Reply(250, "", "4.0.0 mismatched class")
    assert parse_reply(["250 ok 2.0.0"]).enhanced == ""


def test_parse_ehlo() -> None:
    reply = parse_reply(["250-mx hello", "250-size 1000", "250-AUTH PLAIN LOGIN", "250 "])
    assert parse_ehlo(reply) == {"SIZE": "1000", "AUTH": "PLAIN LOGIN"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(250, "2.0.0", "ok"), OK),
        (Reply(421, "4.3.2", "busy"), CHANNEL_FAILURE),
        (Reply(451, "", "try later"), CHANNEL_FAILURE),
        (Reply(550, "5.1.1", "user unknown"), RECIPIENT_PERMANENT),
        (Reply(552, "5.2.2", "mailbox full"), RECIPIENT_PERMANENT),
        (Reply(552, "5.2.3", "message too long for mailbox"), MESSAGE_PERMANENT),
        (Reply(550, "", "no such user"), RECIPIENT_PERMANENT),
        (Reply(554, "5.6.0", "bad content"), MESSAGE_PERMANENT),
        (Reply(552, "5.3.4", "too big"), MESSAGE_PERMANENT),
        (Reply(552, "", "too much mail data"), MESSAGE_PERMANENT),
        (Reply(550, "5.7.1", "rejected"), CHANNEL_FAILURE),
        (
            Reply(554, "", "Service unavailable; Client host [192.0.2.1] blocked using zen"),
            CHANNEL_FAILURE,
        ),
        (Reply(550, "5.1.1", "your IP 192.0.2.1 is listed at Spamhaus"), CHANNEL_FAILURE),
        (Reply(500, "5.5.2", "syntax"), MESSAGE_PERMANENT),
    ],
)
def test_classify_replies(reply: Reply, expected: str) -> None:
    assert classify(reply) == expected


def test_classify_errors_and_custom_patterns() -> None:
    assert classify(ConnectFailed("refused", "connect")) == CHANNEL_FAILURE
    assert classify(None) == CHANNEL_FAILURE
    custom = Classifier([r"denied by gateway"])
    assert custom(Reply(550, "5.0.0", "Denied by gateway X")) == CHANNEL_FAILURE
    assert custom(Reply(550, "5.1.1", "your IP is listed")) == RECIPIENT_PERMANENT
    assert classify(Reply(550, "5.0.0", "denied by gateway"), [r"by gateway"]) == CHANNEL_FAILURE


def test_delivery_result_description() -> None:
    assert DeliveryResult().describe() == "no attempt"
    result = DeliveryResult(reply=Reply(451, "4.3.0", "later\nreally"))
    assert result.describe("x@y") == "451-4.3.0 later 451 4.3.0 really"
    assert result.outcome("x@y") == CHANNEL_FAILURE


def test_client_options_validate_tls_mode() -> None:
    with pytest.raises(ValueError, match="tls"):
        ClientOptions(helo="x", tls="maybe")
