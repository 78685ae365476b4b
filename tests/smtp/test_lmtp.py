"""LMTP server (RFC 2033): LHLO, per-recipient replies after DATA, trusted peers only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.internet.task import Clock

from mailgw.interfaces import QuotaExceeded
from mailgw.smtp.lmtp import LMTPFactory, LMTPRole, LMTPServer
from mailgw.smtp.protocol import Limits
from mailgw.testing.fakes import TLSStringTransport, peer_address
from tests.smtp.fakes import Client, FakeSpool, default_directory

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class FakeStore:
    """``deliver`` records (user, bytes); ``fail`` maps a user to the exception it raises."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes]] = []
        self.fail: dict[str, Exception] = {}

    def deliver(self, user: str, content_path: str, prefix: bytes = b"") -> int:
        if user in self.fail:
            raise self.fail[user]
        self.stored.append((user, prefix + Path(content_path).read_bytes()))
        return len(self.stored)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.spool = FakeSpool()
        self.store = FakeStore()
        self.directory = default_directory()
        self.clock = Clock()
        self.role = LMTPRole(
            self.spool, self.store, self.directory, str(tmp_path / "tmp"), max_recipients=3
        )
        self.factory = LMTPFactory(
            self.role, "be1.example.test", Limits(max_message_size=1000), self.clock, LOOPBACK
        )

    def connect(self, ip: str = "127.0.0.5") -> Client:
        addr = peer_address(ip, 40000)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, LMTPServer)
        transport = TLSStringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        return Client(protocol, transport)


ENVELOPE = (
    "LHLO gw1.example.test\r\nMAIL FROM:<s@remote.test>\r\n"
    "RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
)


def test_lhlo_and_one_reply_per_recipient_after_data(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = h.connect()
    assert c.lines() == ["220 be1.example.test LMTP mailgw"]
    assert c.codes(ENVELOPE) == ["250", "250", "250", "250"]
    assert c.codes("DATA\r\n") == ["354"]
    assert c.send("Subject: hi\r\n\r\nbody\r\n.\r\n") == [
        "250 2.1.5 Delivered",
        "250 2.1.5 Delivered",
    ]
    assert [u for u, _ in h.store.stored] == ["alice@example.test", "bob@example.test"]
    content = h.store.stored[0][1]
    assert content.startswith(b"Return-Path: <s@remote.test>\r\nDelivered-To: alice@example.test")
    assert content.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert h.spool.committed == []  # nothing queued on the backend
    assert h.spool.begun[0].aborted  # the temporary copy is gone
    assert not list((tmp_path / "tmp").iterdir())


def test_a_failing_copy_gets_its_own_reply_the_others_250(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.store.fail["bob@example.test"] = QuotaExceeded("full")
    c = h.connect()
    c.lines()
    assert c.codes(ENVELOPE + "DATA\r\n") == ["250", "250", "250", "250", "354"]
    assert c.send("x\r\n.\r\n") == ["250 2.1.5 Delivered", "452 4.2.2 Mailbox full"]
    h.store.fail["alice@example.test"] = OSError(5, "I/O error")
    del h.store.fail["bob@example.test"]
    assert c.codes(ENVELOPE.split("\r\n", 1)[1] + "DATA\r\n") == ["250", "250", "250", "354"]
    assert c.send("x\r\n.\r\n") == [
        "451 4.3.0 Mailbox temporarily unavailable",
        "250 2.1.5 Delivered",
    ]


def test_unknown_recipient_refused_at_rcpt_and_not_counted_after_data(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = h.connect()
    c.lines()
    out = c.codes(
        "LHLO gw\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "DATA\r\n"
    )
    assert out == ["250", "250", "550", "250", "354"]
    assert c.codes("x\r\n.\r\n") == ["250"]  # one reply: one accepted recipient


def test_too_many_recipients(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for i in range(4):
        h.directory.add_user(f"u{i}@example.test")
    c = h.connect()
    c.lines()
    rcpts = "".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(4))
    assert c.codes("LHLO gw\r\nMAIL FROM:<>\r\n" + rcpts) == [
        "250",
        "250",
        "250",
        "250",
        "250",
        "452",
    ]


def test_oversized_message_refused_once_per_recipient(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = h.connect()
    c.lines()
    assert c.codes(ENVELOPE + "DATA\r\n")[-1] == "354"
    assert c.codes(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n") == ["552", "552"]
    assert h.store.stored == []


def test_ehlo_and_helo_are_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = h.connect()
    c.lines()
    assert c.send("EHLO gw\r\n") == ["500 5.5.1 This is LMTP: use LHLO"]
    assert c.codes("HELO gw\r\n") == ["500"]
    assert c.codes("MAIL FROM:<>\r\n") == ["503"]  # no LHLO yet
    assert c.codes("STARTTLS\r\n") == ["500"]


def test_untrusted_peer_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    c = h.connect("192.0.2.1")
    assert c.lines() == ["554 5.7.1 Not allowed to use LMTP here"]
    assert c.closed
