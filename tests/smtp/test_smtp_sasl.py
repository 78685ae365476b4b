"""SMTP AUTH over the shared SASL exchange (``mailgw.net.sasl``), at the protocol level with a
role that accepts AUTH at any time: the exact replies of each way an exchange can end, and
what reaches the role's ``authenticate``. Socket-free (StringTransport, Clock)."""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailgw.model.reply import R, Reply
from mailgw.smtp.protocol import Limits, Role, Session, SMTPServer
from tests.smtp.fakes import Client, FakeSpool, TLSStringTransport

CANCELLED = "501 5.0.0 Authentication cancelled"
UNDECODABLE = "501 5.5.2 Cannot decode authentication response"


class AuthRole(Role):
    """Goes ahead with every AUTH and records the credentials it is asked to check."""

    def __init__(self) -> None:
        super().__init__(FakeSpool())
        self.checked: list[tuple[str, str, str]] = []

    def auth_start(self, session: Session, mechanism: str) -> Reply | None:
        return None

    def authenticate(self, session: Session, authzid: str, user: str, password: str) -> Reply:
        self.checked.append((authzid, user, password))
        return R.AUTH_OK


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def connect() -> tuple[Client, AuthRole]:
    role = AuthRole()
    server = SMTPServer(role, "smtp.example.test", Limits(error_delay=0), Clock())
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    transport = TLSStringTransport(peerAddress=addr)
    server.makeConnection(transport)
    client = Client(server, transport)
    assert client.lines() == ["220 smtp.example.test ESMTP mailgw"]
    client.send("EHLO c\r\n")
    return client, role


def test_plain_and_login_reach_the_role() -> None:
    c, role = connect()
    assert c.send("AUTH PLAIN " + b64(b"bob@x.test\0joe@x.test\0pw") + "\r\n") == [
        "235 2.7.0 Authentication successful"
    ]
    assert c.send("AUTH plain\r\n") == ["334"]
    assert c.codes("  " + b64(b"\0joe@x.test\0pw") + " \r\n") == ["235"]
    assert c.send("AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert c.send(b64("jöe@x.test".encode()) + "\r\n") == ["334 UGFzc3dvcmQ6"]
    assert c.codes(b64(b"pw2") + "\r\n") == ["235"]
    assert role.checked == [
        ("bob@x.test", "joe@x.test", "pw"),
        ("", "joe@x.test", "pw"),
        ("", "jöe@x.test", "pw2"),
    ]


def test_cancel_and_undecodable_responses() -> None:
    c, role = connect()
    assert c.send("AUTH PLAIN *\r\n") == [CANCELLED]
    assert c.send("AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert c.send(" * \r\n") == [CANCELLED]
    assert c.send("AUTH PLAIN =\r\n") == [UNDECODABLE]  # empty: not a PLAIN message
    assert c.send("AUTH LOGIN =\r\n") == [UNDECODABLE]  # LOGIN never took "="
    assert c.send("AUTH PLAIN\r\n") == ["334"]
    assert c.send("=\r\n") == [UNDECODABLE]
    assert c.send("AUTH PLAIN " + b64(b"joe@x.test\0pw") + "\r\n") == [UNDECODABLE]
    assert c.send("AUTH PLAIN " + b64(b"\0\0pw") + "\r\n") == [UNDECODABLE]  # no authcid
    assert c.send("AUTH PLAIN " + b64(b"\0joe\0\xff") + "\r\n") == [UNDECODABLE]
    assert c.send("AUTH LOGIN " + b64(b"\xff") + "\r\n") == [UNDECODABLE]  # before the password
    assert c.send("AUTH LOGIN " + b64(b"joe") + "\r\n") == ["334 UGFzc3dvcmQ6"]
    assert c.send(b64(b"\xff") + "\r\n") == [UNDECODABLE]
    assert c.send("AUTH LOGIN ab cd\r\n") == [UNDECODABLE]
    assert c.send("AUTH CRAM-MD5\r\n") == ["504 5.5.4 Unrecognized authentication type"]
    assert role.checked == []
