"""MX role: recipient policy (no open relay), limits, Received header, connection limits."""

from __future__ import annotations

import email.utils

import pytest

from mailgw.model import Envelope
from mailgw.smtp.roles.mx import limits_from_config
from mailgw.smtp.trace import received_header, with_protocol
from tests.smtp.fakes import Harness

MAIL = "EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n"


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("<user%ext.test@example.test>", "550 5.1.1"),
        ("<ext.test!user@example.test>", "550 5.1.1"),
        ('<"alice@ext.test"@example.test>', "550 5.1.1"),
        ("<alice@ext.test@example.test>", "501 5.1.3"),
        ("<@example.test:alice@ext.test>", "550 5.7.1"),
        ("<@example.test,@other.test:alice@ext.test>", "550 5.7.1"),
        ('<"alice@ext.test">', "501 5.1.3"),
        ("<alice@ext.test>", "550 5.7.1"),
        ("<alice@[192.0.2.1]>", "550 5.7.1"),
        ("<alice>", "501 5.1.3"),
        ("<alice@example.test.>", "501 5.1.3"),
    ],
)
def test_open_relay_forms_are_refused(rcpt: str, reply: str) -> None:
    h = Harness()
    c = h.connect()
    assert c.codes(MAIL) == ["250", "250"]
    out = c.send(f"RCPT TO:{rcpt}\r\n")
    assert len(out) == 1 and out[0].startswith(reply), out
    assert c.codes("DATA\r\n") == ["503"]
    # Local parts are looked up exactly as given: no % / ! / quoted-@ routing.
    assert all(
        k.endswith("@example.test") or k.endswith("@other.test") for k in h.directory.lookups
    )


def test_source_route_to_local_user_is_accepted_as_the_user() -> None:
    h = Harness()
    c = h.connect()
    assert c.exchange(MAIL + "RCPT TO:<@relay.test:alice@example.test>\r\nDATA\r\nx\r\n.\r\n") == [
        "250",
        "250",
        "250",
        "354",
        "250",
    ]
    assert h.messages[0][0].recipients == ["alice@example.test"]


def test_recipient_lookup_is_case_insensitive_and_keeps_canonical_form() -> None:
    h = Harness()
    c = h.connect()
    assert c.codes(MAIL + "RCPT TO:<ALICE@EXAMPLE.TEST>\r\nRCPT TO:<carol@Other.Test>\r\n") == [
        "250",
        "250",
        "250",
        "250",
    ]
    assert h.directory.lookups == ["alice@example.test", "carol@other.test"]
    assert c.exchange("DATA\r\nx\r\n.\r\n") == ["354", "250"]
    assert h.messages[0][0].recipients == ["ALICE@example.test", "carol@other.test"]


def test_duplicate_recipient_is_kept_once() -> None:
    h = Harness()
    c = h.connect()
    rcpt = "RCPT TO:<alice@example.test>\r\n"
    assert c.exchange(MAIL + rcpt + rcpt + "DATA\r\nx\r\n.\r\n") == ["250"] * 4 + ["354", "250"]
    assert h.messages[0][0].recipients == ["alice@example.test"]


def test_null_sender_is_allowed() -> None:
    h = Harness()
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n") == [
        "250",
        "250",
        "250",
        "354",
    ]
    assert c.codes("bounce\r\n.\r\n") == ["250"]
    assert h.messages[0][0].sender == ""


def test_max_recipients() -> None:
    h = Harness(max_recipients=2)
    c = h.connect()
    out = c.send(
        MAIL
        + "RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        + "RCPT TO:<carol@other.test>\r\n"
    )
    assert out[-1] == "452 4.5.3 Too many recipients"
    assert c.exchange("DATA\r\nx\r\n.\r\n") == ["354", "250"]
    assert h.messages[0][0].recipients == ["alice@example.test", "bob@example.test"]
    # The limit is per message: the next transaction starts from zero.
    assert c.codes("MAIL FROM:<>\r\nRCPT TO:<carol@other.test>\r\n") == ["250", "250"]


def test_received_header_single_recipient() -> None:
    h = Harness()
    c = h.connect()
    assert c.exchange(
        "EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    ) == ["250", "250", "250", "354", "250"]
    content = h.messages[0][1]
    date = email.utils.formatdate(h.clock.seconds(), localtime=True)
    assert content == (
        b"Received: from client.test (unknown [192.0.2.7])\r\n"
        b"\tby mx.example.test (mailgw) with ESMTP id Q0001\r\n"
        b"\tfor <alice@example.test>; " + date.encode() + b"\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    assert email.utils.parsedate_to_datetime(date).timestamp() == h.clock.seconds()


def test_received_header_several_recipients_ipv6_and_helo() -> None:
    h = Harness()
    c = h.connect(ip="2001:db8::5")
    assert c.exchange(
        "HELO bad(name);x\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\nDATA\r\n.\r\n"
    ) == ["250", "250", "250", "250", "354", "250"]
    env, content = h.messages[0]
    header = content.decode().split("\r\n")
    assert header[0] == "Received: from bad?name??x (unknown [IPv6:2001:db8::5])"
    assert header[1] == "\tby mx.example.test (mailgw) with SMTP id Q0001;"
    assert header[2].startswith("\t") and "for" not in header[2]
    assert env.protocol == "SMTP" and env.client_address == "2001:db8::5"


def test_with_protocol_keywords() -> None:
    assert with_protocol(False, False, False, False) == "SMTP"
    assert with_protocol(True, False, False, False) == "ESMTP"
    assert with_protocol(True, True, False, False) == "ESMTPS"
    assert with_protocol(True, True, True, False) == "ESMTPSA"
    assert with_protocol(True, False, True, False) == "ESMTPA"
    assert with_protocol(True, True, False, True) == "UTF8SMTPS"
    assert with_protocol(True, True, True, True) == "UTF8SMTPSA"


def test_received_header_without_client_ip() -> None:
    header = received_header(
        helo="",
        client_ip="",
        hostname="h",
        protocol="ESMTP",
        queue_id="Q",
        recipients=[],
        when=0.0,
    )
    assert header.startswith(b"Received: from unknown (unknown unknown)\r\n")


def test_per_ip_connection_limit() -> None:
    h = Harness(max_connections_per_ip=2)
    a = h.connect()
    h.connect()
    refused = h.connect(greet=False)
    assert refused.lines() == ["421 4.7.0 Too many connections from your address, try again later"]
    assert refused.closed
    assert h.factory.counter.per_ip == {"192.0.2.7": 2}
    refused.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert h.factory.counter.per_ip == {"192.0.2.7": 2}  # the refused one was never counted
    other = h.connect(ip="192.0.2.8")
    assert other.codes("NOOP\r\n") == ["250"]
    a.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert h.factory.counter.per_ip == {"192.0.2.7": 1, "192.0.2.8": 1}
    h.connect()  # a slot is free again


def test_total_connection_limit() -> None:
    h = Harness(max_connections=2)
    h.connect(ip="192.0.2.1")
    h.connect(ip="192.0.2.2")
    refused = h.connect(ip="192.0.2.3", greet=False)
    assert refused.lines() == ["421 4.7.0 Too many connections, try again later"]
    assert refused.closed
    assert refused.codes("NOOP\r\n") == []
    assert h.factory.counter.total == 2


def test_limits_from_config() -> None:
    h = Harness(max_line_length=77, idle_timeout=5.0)
    limits = limits_from_config(h.config)
    assert limits.max_line_length == 77 and limits.idle_timeout == 5.0
    assert limits.max_message_size == h.config.max_message_size
    assert h.factory.limits == limits


def test_envelope_round_trips_through_json() -> None:
    h = Harness()
    c = h.connect()
    c.exchange(MAIL + "RCPT TO:<alice@example.test>\r\nDATA\r\n\xe4\r\n.\r\n")
    env = h.messages[0][0]
    assert Envelope.from_json(env.to_json()) == env
    assert env.body_8bitmime


def test_bare_postmaster_is_postmaster_of_the_hosts_own_domain() -> None:
    h = Harness()  # host name mx.example.test: example.test is local
    h.directory.aliases["postmaster@example.test"] = ["alice@example.test"]
    c = h.connect()
    assert c.exchange(MAIL + "RCPT TO:<Postmaster>\r\nDATA\r\nx\r\n.\r\n") == [
        "250",
        "250",
        "250",
        "354",
        "250",
    ]
    assert h.messages[0][0].recipients == ["postmaster@example.test"]


def test_bare_postmaster_of_a_host_outside_the_local_domains_is_the_first_domains() -> None:
    h = Harness()
    h.factory.role.hostname = "gw.provider.example"  # type: ignore[attr-defined]
    h.directory.aliases["postmaster@example.test"] = ["alice@example.test"]
    c = h.connect()
    assert c.codes(MAIL + "RCPT TO:<POSTMASTER>\r\n") == ["250", "250", "250"]
    assert c.protocol.session.recipients[0].key == "postmaster@example.test"


def test_bare_postmaster_unknown_when_nobody_gets_it() -> None:
    h = Harness()
    c = h.connect()
    assert c.send(MAIL + "RCPT TO:<postmaster>\r\n")[-1].startswith("550 5.1.1")
    h.directory.domains.clear()
    assert c.send("RCPT TO:<postmaster>\r\n") == [
        "550 5.1.1 Recipient address rejected: user unknown"
    ]
