"""XCLIENT (Postfix semantics) from trusted proxies only: ADDR, LOGIN, NAME."""

from __future__ import annotations

import ipaddress

import pytest

from mailgw.smtp.protocol import xtext_decode
from tests.smtp.fakes import Harness

NGINX = (ipaddress.ip_network("127.0.0.0/8"),)


def harness() -> Harness:
    h = Harness()
    h.factory.xclient_trusted = NGINX
    return h


def test_trusted_proxy_sets_the_client_address_and_greets_again() -> None:
    h = harness()
    c = h.connect("127.0.0.1")
    ehlo = c.send("EHLO nginx\r\n")
    assert "250-XCLIENT ADDR LOGIN NAME" in ehlo or "250 XCLIENT ADDR LOGIN NAME" in ehlo
    out = c.send("XCLIENT ADDR=198.51.100.7 NAME=client.example LOGIN=[UNAVAILABLE]\r\n")
    assert out == ["220 mx.example.test ESMTP mailgw"]
    assert c.codes("MAIL FROM:<s@remote.test>\r\n") == ["503"]  # HELO forgotten
    assert c.codes("EHLO client.example\r\nMAIL FROM:<s@remote.test>\r\n") == ["250", "250"]
    assert c.codes("RCPT TO:<alice@example.test>\r\nDATA\r\n") == ["250", "354"]
    assert c.codes("Subject: x\r\n\r\nx\r\n.\r\n") == ["250"]
    env, content = h.messages[0]
    assert env.client_address == "198.51.100.7"
    assert b"(client.example [198.51.100.7])" in content.split(b"\r\n\r\n")[0]
    # EHLO after XCLIENT no longer offers it (the client is not the proxy) but the proxy's
    # own address still decides.
    assert c.protocol.session.client_ip == "198.51.100.7"


def test_ipv6_address_form() -> None:
    h = harness()
    c = h.connect("127.0.0.1")
    c.send("EHLO nginx\r\n")
    assert c.codes("XCLIENT ADDR=IPV6:2001:db8::1\r\n") == ["220"]
    assert c.protocol.session.client_ip == "2001:db8::1"


def test_untrusted_peer_is_refused() -> None:
    h = harness()
    c = h.connect("192.0.2.7")
    assert not any("XCLIENT" in line for line in c.send("EHLO x\r\n"))
    assert c.send("XCLIENT ADDR=198.51.100.7\r\n") == ["550 5.7.0 Insufficient authorization"]
    assert c.protocol.session.client_ip == "192.0.2.7"


def test_off_by_default() -> None:
    h = Harness()
    c = h.connect("127.0.0.1")
    c.send("EHLO x\r\n")
    assert c.codes("XCLIENT ADDR=198.51.100.7\r\n") == ["550"]


@pytest.mark.parametrize(
    "line",
    [
        "XCLIENT\r\n",
        "XCLIENT ADDR\r\n",
        "XCLIENT PORT=25\r\n",
        "XCLIENT ADDR=not-an-ip\r\n",
        "XCLIENT NAME=a+zz\r\n",
    ],
)
def test_bad_attributes_get_501(line: str) -> None:
    h = harness()
    c = h.connect("127.0.0.1")
    c.send("EHLO nginx\r\n")
    assert c.codes(line) == ["501"]


def test_not_inside_a_transaction() -> None:
    h = harness()
    c = h.connect("127.0.0.1")
    assert c.codes("EHLO n\r\nMAIL FROM:<s@remote.test>\r\nXCLIENT ADDR=198.51.100.7\r\n") == [
        "250",
        "250",
        "503",
    ]


def test_xtext() -> None:
    assert xtext_decode("a+2Bb+3D") == "a+b="
    with pytest.raises(ValueError):
        xtext_decode("a+2")
