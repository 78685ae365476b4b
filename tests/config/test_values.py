"""The shared endpoint parser every ``host:port`` config value and peer address goes through."""

from __future__ import annotations

import pytest

from mailgw.config.values import format_host_port, parse_host_port


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:25", None, ("127.0.0.1", 25)),
        (" mail.example.com:587 ", None, ("mail.example.com", 587)),
        ("[::1]:8024", None, ("::1", 8024)),
        ("redis.local", 6379, ("redis.local", 6379)),
        ("[::1]", 26379, ("::1", 26379)),
        ("10.0.0.1:7000", 6379, ("10.0.0.1", 7000)),
    ],
)
def test_accepted(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        ":25",
        "host:",
        "host:0",
        "host:65536",
        "host:x",
        "::1:25",
        "[::1",
        "[::1]x25",
        "[]:25",
    ],
)
def test_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_host_port(text)


def test_format_round_trips() -> None:
    for text in ("127.0.0.1:25", "[::1]:8024", "mx.example:2525"):
        assert format_host_port(*parse_host_port(text)) == text
