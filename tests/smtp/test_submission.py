"""Submission role: AUTH only over TLS, no relay without AUTH, sender/From ownership, limits,
Message-ID/Date completion, and the webmail ``submit`` with the same checks."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailgw.config.schema import SubmissionConfig
from mailgw.model import Envelope
from mailgw.policy.submission import SubmissionPolicy, header_facts
from mailgw.policy.submit import SubmissionError, submit
from mailgw.smtp.protocol import SMTPServer
from mailgw.smtp.roles.submission import SubmissionFactory
from mailgw.testing.deferreds import fired
from mailgw.testing.fakes import FakeDirectory, TLSStringTransport
from tests.smtp.fakes import Client, FakeSpool, Harness


def directory() -> FakeDirectory:
    return FakeDirectory(
        {"alice@example.test": "secret", "bob@example.test": None},
        aliases={"sales@example.test": ["alice@example.test", "bob@example.test"]},
    )


class Sub:
    def __init__(
        self, implicit_tls: bool = False, can_send_outside: bool = True, **config: Any
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = FakeSpool()
        self.directory = directory()
        self.factory = SubmissionFactory(
            SubmissionConfig(**config),
            "smtp.example.test",
            self.spool,
            self.directory,
            self.clock,
            tls_options=object(),
            implicit_tls=implicit_tls,
            auth_failure_delay=1.0,
            can_send_outside=can_send_outside,
        )

    def connect(self) -> Client:
        addr = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.factory.buildProtocol(addr)
        assert isinstance(protocol, SMTPServer)
        transport = TLSStringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        assert client.lines() == ["220 smtp.example.test ESMTP mailgw"]
        return client

    def tls_client(self) -> Client:
        c = self.connect()
        c.send("EHLO c\r\n")
        assert c.codes("STARTTLS\r\n") == ["220"]
        return c

    def logged_in(self) -> Client:
        c = self.tls_client()
        c.send("EHLO c\r\n")
        token = base64.b64encode(b"\0alice@example.test\0secret").decode()
        assert c.send(f"AUTH PLAIN {token}\r\n") == ["235 2.7.0 Authentication successful"]
        return c


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


MESSAGE = (
    "From: Alice <alice@example.test>\r\nTo: x@far.example\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"
)


def test_auth_is_advertised_only_over_tls() -> None:
    s = Sub()
    c = s.connect()
    ehlo = c.send("EHLO c\r\n")
    assert "250 STARTTLS" in ehlo and not any("AUTH" in line for line in ehlo)
    assert c.send(f"AUTH PLAIN {plain('alice@example.test', 'secret')}\r\n") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert c.send("MAIL FROM:<alice@example.test>\r\n") == [
        "530 5.7.0 Must issue a STARTTLS command first"
    ]
    c.send("STARTTLS\r\n")
    ehlo = c.send("EHLO c\r\n")
    assert "250 AUTH PLAIN LOGIN" in ehlo and not any("STARTTLS" in line for line in ehlo)


def test_implicit_tls_session_offers_auth_without_starttls() -> None:
    c = Sub(implicit_tls=True).connect()
    ehlo = c.send("EHLO c\r\n")
    assert "250 AUTH PLAIN LOGIN" in ehlo and not any("STARTTLS" in line for line in ehlo)


def test_no_auth_no_relay() -> None:
    c = Sub().tls_client()
    c.send("EHLO c\r\n")
    assert c.send("MAIL FROM:<alice@example.test>\r\n") == ["530 5.7.0 Authentication required"]
    assert c.send("RCPT TO:<x@far.example>\r\n") == ["503 5.5.1 Need MAIL before RCPT"]


def test_auth_plain_with_continuation_and_login() -> None:
    s = Sub()
    c = s.tls_client()
    c.send("EHLO c\r\n")
    assert c.send("AUTH PLAIN\r\n") == ["334"]
    assert c.codes(plain("alice@example.test", "secret") + "\r\n") == ["235"]
    assert c.codes("AUTH PLAIN x\r\n") == ["503"]  # already authenticated
    c2 = s.tls_client()
    c2.send("EHLO c\r\n")
    assert c2.send("AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert c2.send(base64.b64encode(b"alice@example.test").decode() + "\r\n") == [
        "334 UGFzc3dvcmQ6"
    ]
    assert c2.codes(base64.b64encode(b"secret").decode() + "\r\n") == ["235"]
    assert c2.protocol.session.authenticated == "alice@example.test"
    c3 = s.tls_client()
    c3.send("EHLO c\r\n")
    assert c3.send("AUTH LOGIN " + base64.b64encode(b"alice@example.test").decode() + "\r\n") == [
        "334 UGFzc3dvcmQ6"
    ]
    assert c3.codes(base64.b64encode(b"secret").decode() + "\r\n") == ["235"]


def test_auth_failures_cancel_and_garbage() -> None:
    s = Sub()
    c = s.tls_client()
    c.send("EHLO c\r\n")
    assert c.send(f"AUTH PLAIN {plain('alice@example.test', 'wrong')}\r\n") == []
    s.clock.advance(1.0)  # the failure delay
    assert c.lines() == ["535 5.7.8 Authentication credentials invalid"]
    assert c.protocol.session.authenticated is None
    assert c.codes("AUTH LOGIN\r\n") == ["334"]
    assert c.send("*\r\n") == ["501 5.0.0 Authentication cancelled"]
    assert c.codes("AUTH PLAIN !!!notbase64\r\n") == ["501"]
    assert c.codes("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode() + "\r\n") == ["501"]
    assert c.codes("AUTH CRAM-MD5\r\n") == ["504"]
    assert c.codes("AUTH\r\n") == ["501"]
    assert c.codes(f"AUTH PLAIN {plain('bob@example.test', 'secret')}\r\n") == []
    s.clock.advance(2.0)  # the second failure from this address: twice the base delay
    assert [line[:3] for line in c.lines()] == ["535"]
    authz = base64.b64encode(b"bob@example.test\0alice@example.test\0secret").decode()
    c.send(f"AUTH PLAIN {authz}\r\n")
    s.clock.advance(1.0)
    assert [line[:3] for line in c.lines()] == ["535"]


def test_auth_before_ehlo_is_a_sequence_error() -> None:
    c = Sub(implicit_tls=True).connect()
    assert c.codes(f"AUTH PLAIN {plain('alice@example.test', 'secret')}\r\n") == ["503"]


def test_mx_role_does_not_offer_or_accept_auth() -> None:
    h = Harness(tls_options=object())
    c = h.connect()
    assert not any("AUTH" in line for line in c.send("EHLO c\r\n"))
    assert c.codes(f"AUTH PLAIN {plain('alice@example.test', 'secret')}\r\n") == ["502"]


def test_send_own_address_and_alias_adds_message_id_and_date() -> None:
    s = Sub()
    c = s.logged_in()
    assert c.codes("MAIL FROM:<alice@example.test>\r\n") == ["250"]
    assert c.codes("RCPT TO:<x@far.example>\r\nRCPT TO:<bob@example.test>\r\n") == ["250", "250"]
    assert c.codes("DATA\r\n") == ["354"]
    assert c.codes(MESSAGE) == ["250"]
    [(envelope, content)] = s.spool.committed
    assert envelope.recipients == ["x@far.example", "bob@example.test"]
    assert envelope.protocol == "ESMTPSA"
    head = content.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Received: from c")
    assert b"\r\nMessage-ID: <" in head and b"@example.test>" in head
    assert b"\r\nDate: " in head
    assert content.endswith(b"\r\n\r\nbody\r\n")
    assert envelope.size == len(content)
    # An alias of the user is allowed too, and existing headers are kept as they are.
    c.send("MAIL FROM:<sales@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    msg = "From: sales@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nx\r\n.\r\n"
    assert c.codes(msg) == ["250"]
    head = s.spool.committed[1][1].split(b"\r\n\r\n", 1)[0]
    assert head.count(b"Message-ID") == 1 and head.count(b"Date:") == 1


@pytest.mark.parametrize(
    ("mail", "data", "reply"),
    [
        ("<bob@example.test>", None, "553 5.7.1 Sender address not owned by authenticated user"),
        ("<>", None, "553 5.7.1 Sender address not owned by authenticated user"),
        ("<alice@evil.example>", None, "553 5.7.1"),
        (
            "<alice@example.test>",
            "From: Bob <bob@example.test>\r\n\r\nx\r\n.\r\n",
            "553 5.7.1 From header address not owned by authenticated user",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test, bob@example.test\r\n\r\nx\r\n.\r\n",
            "553 5.7.1 From header",
        ),
        ("<alice@example.test>", "Subject: no from\r\n\r\nx\r\n.\r\n", "550 5.6.0"),
        # Issue 10: a field name with a blank before the colon is a From for the IMAP
        # ENVELOPE (mailgw.mime) but was ignored by the check.
        (
            "<alice@example.test>",
            "To: carol@x.example\r\nSubject: s\r\nFrom : bob@example.test\r\n"
            "From: alice@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 Message header has a line that is not a header field",
        ),
        # A header-looking line without a colon ended the header for Python's parser.
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nX-Junk\r\nFrom: bob@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 Message header has a line",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nFrom: bob@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 Message has more than one From header",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nfrom: alice@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 Message has more than one From header",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nSender: alice@example.test\r\n"
            "Sender: bob@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 Message has more than one Sender header",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nSender: bob@example.test\r\n\r\nhi\r\n.\r\n",
            "553 5.7.1 Sender header address not owned",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nSender: a@example.test, alice@example.test\r\n"
            "\r\nhi\r\n.\r\n",
            "550 5.7.1 Sender header must hold exactly one address",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test, sales@example.test\r\n\r\nhi\r\n.\r\n",
            "550 5.7.1 From header has several addresses: a Sender header",
        ),
        (
            "<alice@example.test>",
            "From: alice@example.test\r\nReply-To: a@x.example\r\nReply-To: b@x.example\r\n"
            "\r\nhi\r\n.\r\n",
            "550 5.7.1 Message has more than one Reply-To header",
        ),
        ("<alice@example.test>", "From: undisclosed:;\r\n\r\nhi\r\n.\r\n", "550 5.6.0"),
        ("<alice@example.test>", "hello there\r\n\r\nhi\r\n.\r\n", "550 5.7.1"),
    ],
)
def test_spoofing_is_refused(mail: str, data: str | None, reply: str) -> None:
    s = Sub()
    c = s.logged_in()
    lines = c.send(f"MAIL FROM:{mail}\r\n")
    if data is None:
        assert lines[0].startswith(reply)
        return
    c.send("RCPT TO:<x@far.example>\r\nDATA\r\n")
    assert c.send(data)[0].startswith(reply)
    assert s.spool.committed == []


def test_headers_only_message_gets_completed() -> None:
    s = Sub()
    c = s.logged_in()
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    assert c.codes("From: alice@example.test\r\n.\r\n") == ["250"]
    content = s.spool.committed[0][1]
    assert b"\r\nMessage-ID: " in content and content.endswith(b"\r\n\r\n")


def test_recipient_limit_unknown_local_user_and_hourly_limit() -> None:
    s = Sub(max_recipients=2, max_messages_per_hour=2)
    c = s.logged_in()
    c.send("MAIL FROM:<alice@example.test>\r\n")
    assert c.codes("RCPT TO:<nobody@example.test>\r\n") == ["550"]
    assert c.codes("RCPT TO:<a@far.example>\r\nRCPT TO:<b@far.example>\r\n") == ["250", "250"]
    assert c.send("RCPT TO:<c@far.example>\r\n") == ["452 4.5.3 Too many recipients"]
    c.send("DATA\r\n")
    assert c.codes(MESSAGE) == ["250"]
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@far.example>\r\nDATA\r\n")
    assert c.codes(MESSAGE) == ["250"]
    assert c.send("MAIL FROM:<alice@example.test>\r\n")[0].startswith("450 4.7.1")
    s.clock.advance(3601)
    c = s.logged_in()
    assert c.codes("MAIL FROM:<alice@example.test>\r\n") == ["250"]


def test_header_facts_come_from_the_mime_parser() -> None:
    facts = header_facts(
        b"From: =?utf-8?q?A?= <a@x.example>, b@y.example\r\nMessage-ID: <1@x>\r\n"
        b'Sender: "q u"@x.example\r\nReply-To: r@z.example\r\n'
    )
    assert facts.from_fields == [["a@x.example", "b@y.example"]]
    assert facts.sender_fields == [['"q u"@x.example']]
    assert facts.reply_to_fields == 1 and facts.has_message_id and not facts.has_date
    assert facts.malformed == 0
    assert header_facts(b"From: team: a@x.example;\r\n").from_fields == [None]
    assert header_facts(b"From: <>\r\n").from_fields == [None]
    assert header_facts(b"From : a@x.example\r\nSubject: s\r\n").malformed == 1
    assert header_facts(b"From: a@x.example\r\nno colon here\r\nTo: b\r\n").malformed == 1
    assert header_facts(b"From: a@x.example\r\nbad name: x\r\n").malformed == 1
    assert header_facts(b"From: a@x.example\r\n\tfolded: fine\r\n").malformed == 0


def policy() -> SubmissionPolicy:
    clock = Clock()
    clock.advance(1_700_000_000)
    return SubmissionPolicy(directory(), "smtp.example.test", clock, 3, 1)


def test_webmail_submit_applies_the_same_checks() -> None:
    p, spool = policy(), FakeSpool()
    msg = b"From: alice@example.test\nSubject: web\n\nhello\n"
    qid = fired(
        submit(
            p, spool, "alice@example.test", Envelope("alice@example.test", ["x@far.example"]), msg
        )
    )
    assert qid == "Q0001"
    envelope, content = spool.committed[0]
    assert envelope.protocol == "webmail"
    assert b"with webmail id Q0001 (authenticated user alice@example.test)" in content
    assert b"\r\nMessage-ID: " in content and b"\nhello\r\n" in content
    # the hourly limit (1) is now used up
    failure = fired(
        submit(
            p, spool, "alice@example.test", Envelope("alice@example.test", ["x@far.example"]), msg
        )
    )
    assert isinstance(failure.value, SubmissionError) and failure.value.reply.code == 450


@pytest.mark.parametrize(
    ("sender", "recipients", "message", "code"),
    [
        ("bob@example.test", ["x@far.example"], b"From: alice@example.test\n\nx\n", 553),
        ("alice@example.test", [], b"From: alice@example.test\n\nx\n", 503),
        ("alice@example.test", ["a@x.example"] * 4, b"From: alice@example.test\n\nx\n", 452),
        ("alice@example.test", ["not an address"], b"From: alice@example.test\n\nx\n", 501),
        ("alice@example.test", ["x@far.example"], b"From: bob@example.test\n\nx\n", 553),
    ],
)
def test_webmail_submit_refusals(
    sender: str, recipients: list[str], message: bytes, code: int
) -> None:
    spool = FakeSpool()
    failure = fired(
        submit(policy(), spool, "alice@example.test", Envelope(sender, recipients), message)
    )
    assert isinstance(failure.value, SubmissionError)
    assert failure.value.reply.code == code
    assert spool.committed == []


def test_from_after_a_large_header_is_still_checked() -> None:
    """Issue 10: the check read only the first 256 KiB of the header."""
    s = Sub()
    c = s.logged_in()
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    filler = "".join(f"X-Filler-{i}: {'y' * 90}\r\n" for i in range(3000))  # ~300 KiB
    data = f"From: alice@example.test\r\n{filler}From: bob@example.test\r\n\r\nhi\r\n.\r\n"
    assert c.send(data) == ["550 5.7.1 Message has more than one From header"]
    assert s.spool.committed == []


def test_header_over_the_limit_is_refused_whole() -> None:
    s = Sub(max_header_size=4096)
    c = s.logged_in()
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    filler = "".join(f"X-Filler-{i}: {'y' * 90}\r\n" for i in range(60))
    assert c.send(f"From: alice@example.test\r\n{filler}\r\nhi\r\n.\r\n") == [
        "552 5.3.4 Message header size exceeds fixed limit"
    ]
    assert s.spool.committed == []
    # Under the limit the same session goes on.
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    assert c.codes(MESSAGE) == ["250"]


def test_several_from_mailboxes_with_the_users_sender_pass() -> None:
    s = Sub()
    c = s.logged_in()
    c.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n")
    data = (
        "From: alice@example.test, Sales <sales@example.test>\r\n"
        "Sender: alice@example.test\r\nReply-To: list@far.example\r\n\r\nhi\r\n.\r\n"
    )
    assert c.codes(data) == ["250"]


def test_webmail_submit_uses_the_same_header_rules() -> None:
    spool = FakeSpool()
    message = b"To: carol@x.example\nFrom : bob@example.test\nFrom: alice@example.test\n\nhi\n"
    failure = fired(
        submit(
            policy(),
            spool,
            "alice@example.test",
            Envelope("alice@example.test", ["x@far.example"]),
            message,
        )
    )
    assert isinstance(failure.value, SubmissionError)
    assert failure.value.reply.format().startswith("550 5.7.1")
    assert spool.committed == []


def test_remote_recipient_refused_at_rcpt_when_the_node_cannot_send_outside() -> None:
    """Issue 9: it was accepted with 250, then deferred forever as "no such recipient"."""
    s = Sub(can_send_outside=False)
    c = s.logged_in()
    assert c.codes("MAIL FROM:<alice@example.test>\r\n") == ["250"]
    assert c.send("RCPT TO:<x@far.example>\r\n") == [
        "554 5.7.1 Relay access denied: this server does not send mail to other domains"
    ]
    assert c.codes("RCPT TO:<bob@example.test>\r\nDATA\r\n") == ["250", "354"]
    assert c.codes(MESSAGE) == ["250"]
    assert s.spool.committed[0][0].recipients == ["bob@example.test"]


def test_webmail_submit_refuses_remote_recipients_when_the_node_cannot_send_outside() -> None:
    clock = Clock()
    p = SubmissionPolicy(directory(), "smtp.example.test", clock, can_send_outside=False)
    spool = FakeSpool()
    envelope = Envelope("alice@example.test", ["bob@example.test", "x@far.example"])
    failure = fired(
        submit(p, spool, "alice@example.test", envelope, b"From: alice@example.test\n\nx\n")
    )
    assert isinstance(failure.value, SubmissionError)
    assert failure.value.reply.format().startswith("554 5.7.1 Relay access denied")
    assert spool.committed == []
