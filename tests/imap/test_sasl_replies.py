"""IMAP AUTHENTICATE over the shared SASL exchange (``mailgw.net.sasl``): the exact replies
of each way an exchange can end, and the plaintext policy (LOGINDISABLED, PRIVACYREQUIRED)."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.imap.imap_env import Env


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_authenticate_error_replies(env: Env) -> None:
    c = env.connect()
    assert c.send(b"a AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert c.send(b" * \r\n") == b"a BAD Authentication cancelled\r\n"
    assert c.send(b"b AUTHENTICATE PLAIN !!!\r\n") == b"b BAD Invalid base64 data\r\n"
    assert c.send(b"c AUTHENTICATE PLAIN =\r\n") == b"c BAD Invalid PLAIN response\r\n"
    bad = b64(b"\0alice@example.test\0\xff")
    assert c.send(b"d AUTHENTICATE PLAIN " + bad + b"\r\n") == b"d BAD Invalid PLAIN response\r\n"
    assert c.send(b"e AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert c.send(b"=\r\n") == b"e BAD Invalid base64 data\r\n"
    assert c.send(b"f AUTHENTICATE LOGIN =\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert c.send(b64(b"secret") + b"\r\n") == b""  # an empty name: a failed login
    env.clock.advance(2.0)
    assert c.take() == b"f NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    assert c.send(b"g AUTHENTICATE CRAM-MD5\r\n") == (
        b"g NO [CANNOT] Unsupported authentication mechanism\r\n"
    )
    assert c.server.state == "not authenticated"


def test_authenticate_with_own_authzid_and_padding(env: Env) -> None:
    c = env.connect()
    token = b64(b"ALICE@example.test\0alice@example.test\0secret")
    c.send(b"a AUTHENTICATE PLAIN\r\n")
    assert c.send(b"  " + token + b" \r\n").startswith(b"a OK [CAPABILITY ")
    assert c.server.user == "alice@example.test"


def test_authenticate_needs_tls_unless_allowed(tmp_path: Path) -> None:
    env = Env(tmp_path, allow_plaintext_auth="no")
    c = env.connect()
    assert b"LOGINDISABLED" in c.greeting and b"AUTH=" not in c.greeting
    token = b64(b"\0alice@example.test\0secret")
    assert c.send(b"a AUTHENTICATE PLAIN " + token + b"\r\n") == (
        b"a NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"
    )
    assert c.send(b"b AUTHENTICATE CRAM-MD5\r\n").startswith(b"b NO [CANNOT] ")
