"""The one log line per listener: role and bound address."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mailgw.net.listen import ListenerService, address_text


def test_address_text() -> None:
    assert address_text(IPv4Address("TCP", "127.0.0.1", 8025)) == "127.0.0.1:8025"
    assert address_text(IPv6Address("TCP", "::1", 8993)) == "[::1]:8993"
    assert address_text(UNIXAddress(b"/run/mailgw/lmtp")) == "/run/mailgw/lmtp"


def test_one_line_per_listener() -> None:
    reactor = MemoryReactor()
    with capturedLogs() as events:
        for key, description in (
            ("listen", "tcp:8143:interface=127.0.0.1"),
            ("listen_tls", "haproxy:tcp:8993:interface=127.0.0.1"),
        ):
            ListenerService(
                reactor, description, Factory(), f"/e/mailgw.ini:imap:{key}"
            ).startService()
    lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]
    # MemoryReactor's ports answer getHost() with 0.0.0.0 whatever the interface.
    assert lines == [
        "imap listening on 0.0.0.0:8143",
        "imap TLS listening on 0.0.0.0:8993, PROXY header required",
    ]
