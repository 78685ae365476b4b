"""IMAP session: states, authentication, TLS, limits and the bad-input list of issue 3."""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mailgw.imap.commands import COMMANDS
from tests.imap.imap_env import Env

MSG = b"From: A <a@x.test>\r\nSubject: hello\r\nTo: b@y.test\r\n\r\nbody text\r\n"


def test_greeting_and_capabilities_follow_tls_and_policy(tmp_path: Path) -> None:
    env = Env(tmp_path, allow_plaintext_auth="no")
    c = env.connect()
    assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    caps = c.cmd("CAPABILITY")
    assert b"STARTTLS" in caps and b"LOGINDISABLED" in caps and b"AUTH=PLAIN" not in caps
    assert b"PRIVACYREQUIRED" in c.cmd("LOGIN alice@example.test secret")
    assert b"PRIVACYREQUIRED" in c.cmd("AUTHENTICATE PLAIN")
    out = c.cmd("STARTTLS")
    assert out.endswith(b"OK Begin TLS negotiation now\r\n")
    assert c.transport.tls_started == [env.tls]
    caps = c.cmd("CAPABILITY")
    assert b"AUTH=PLAIN" in caps and b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    assert b"BAD" in c.cmd("STARTTLS")
    c.login()


def test_loopback_policy(tmp_path: Path) -> None:
    env = Env(tmp_path, allow_plaintext_auth="loopback")
    assert b"AUTH=PLAIN" in env.connect("127.0.0.1").greeting
    assert b"LOGINDISABLED" in env.connect("192.0.2.1").greeting


def test_starttls_discards_pipelined_plaintext(env: Env) -> None:
    c = env.connect()
    out = c.send(b"a STARTTLS\r\nb LOGIN alice@example.test secret\r\n")
    assert out == b"a OK Begin TLS negotiation now\r\n"
    assert c.server.state == "not authenticated"
    assert b"b OK" not in c.send(b"")


def test_login_with_synchronising_literals(env: Env) -> None:
    c = env.connect()
    assert c.send(b"a LOGIN {18}\r\n") == b"+ Ready for literal data\r\n"
    assert c.send(b"alice@example.test {6}\r\n") == b"+ Ready for literal data\r\n"
    assert c.send(b"secret\r\n").startswith(b"a OK [CAPABILITY IMAP4rev1")


def test_authenticate_plain_sasl_ir_and_continuation(env: Env) -> None:
    token = base64.b64encode(b"\0alice@example.test\0secret")
    c = env.connect()
    assert b"a1 OK" in c.cmd(b"AUTHENTICATE PLAIN " + token)
    c2 = env.connect()
    assert c2.send(b"x AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert b"x OK" in c2.send(token + b"\r\n")
    c3 = env.connect()
    c3.send(b"y AUTHENTICATE PLAIN\r\n")
    assert b"y BAD" in c3.send(b"*\r\n")
    assert b"BAD" in c3.cmd("AUTHENTICATE PLAIN !!!")
    assert b"CANNOT" in c3.cmd("AUTHENTICATE CRAM-MD5")


def test_failed_login_is_delayed(env: Env) -> None:
    c = env.connect()
    assert c.send(b"a LOGIN alice@example.test wrong\r\nb NOOP\r\n") == b""
    env.clock.advance(1.9)
    assert c.take() == b""
    env.clock.advance(0.2)
    assert (
        c.take() == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\nb OK NOOP completed\r\n"
    )
    c.send(b"c LOGIN not-an-address x\r\n")
    env.clock.advance(2.1)
    assert b"c NO [AUTHENTICATIONFAILED]" in c.take()
    token = base64.b64encode(b"bob@example.test\0alice@example.test\0secret")
    c.send(b"d AUTHENTICATE PLAIN " + token + b"\r\n")
    env.clock.advance(2.1)
    assert b"d NO [AUTHENTICATIONFAILED]" in c.take()


def test_directory_failure_is_no_not_traceback(env: Env) -> None:
    env.directory.error = RuntimeError("directory down")
    c = env.connect()
    out = c.cmd("LOGIN alice@example.test secret")
    assert b"NO [UNAVAILABLE]" in out and b"Traceback" not in out


def test_per_ip_and_per_user_limits(tmp_path: Path) -> None:
    env = Env(tmp_path, max_connections_per_ip=2, max_connections_per_user=1)
    a = env.connect(login="alice@example.test")
    b = env.connect()
    third = env.connect()
    assert third.greeting.startswith(b"* BYE")
    assert third.transport.disconnecting
    assert b"NO [LIMIT]" in b.cmd("LOGIN alice@example.test secret")
    a.close()
    b.login()
    assert env.connect("10.0.0.1").greeting.startswith(b"* OK")


def test_idle_timeout_and_idle_command_exemption(tmp_path: Path) -> None:
    env = Env(tmp_path, idle_timeout=1800.0, idle_command_timeout=3000.0)
    c = env.connect(login="alice@example.test")
    c.cmd("SELECT INBOX")
    c.send(b"i IDLE\r\n")
    env.clock.advance(2000)
    assert not c.transport.disconnecting
    c.send(b"DONE\r\n")
    env.clock.advance(1801)
    assert c.take().startswith(b"* BYE")
    assert c.transport.disconnecting


def test_state_rules_and_unknown_commands(env: Env) -> None:
    c = env.connect()
    assert b"BAD" in c.cmd("SELECT INBOX")
    assert b"BAD Unknown command" in c.cmd("FROB")
    c.login()
    assert b"BAD" in c.cmd("FETCH 1 FLAGS")
    assert b"BAD" in c.cmd("LOGIN a b")
    assert b"* ID (" in c.cmd("ID NIL")
    assert b'NAMESPACE (("" "/"))' in c.cmd("NAMESPACE")
    out = c.cmd("LOGOUT")
    assert out.startswith(b"* BYE") and c.transport.disconnecting


def test_too_many_errors_close(tmp_path: Path) -> None:
    env = Env(tmp_path, max_errors=3)
    c = env.connect()
    out = c.send(b"a FROB\r\nb FROB\r\nc FROB\r\n")
    assert out.endswith(b"* BYE Too many invalid commands\r\n")


# -- bad input (issue 3) ----------------------------------------------------------------------


def test_line_over_limit_is_bad_and_session_survives(tmp_path: Path) -> None:
    env = Env(tmp_path, max_line_length=1000)
    c = env.connect()
    out = c.send(b"a NOOP " + b"x" * 5000 + b"\r\n")
    assert b"BAD" in out and b"too long" in out
    assert c.cmd("NOOP").endswith(b"OK NOOP completed\r\n")


def test_literal_over_limit_refused_before_reading(tmp_path: Path) -> None:
    env = Env(tmp_path, max_literal_size=1000)
    c = env.connect(login="alice@example.test")
    out = c.send(b"a APPEND INBOX {5000}\r\n")
    assert out == b"a NO [TOOBIG] Literal of 5000 octets is too large\r\n"
    # a non-synchronising one is discarded as it arrives
    out = c.send(b"b APPEND INBOX {2000+}\r\n" + b"x" * 2000 + b"\r\nc NOOP\r\n")
    assert b"b NO [TOOBIG]" in out and b"c OK NOOP" in out
    # before login the limit is tiny
    c2 = env.connect()
    assert b"NO [TOOBIG]" in c2.send(b"a LOGIN {100000}\r\n")


def test_negative_and_non_numeric_literal_sizes(env: Env) -> None:
    c = env.connect()
    assert b"a BAD" in c.send(b"a LOGIN {-5}\r\n")
    assert b"b BAD" in c.send(b"b LOGIN {abc}\r\n")
    assert b"c BAD" in c.send(b"c LOGIN {99999999999999999999999}\r\n")
    assert c.cmd("NOOP").endswith(b"OK NOOP completed\r\n")


def test_deep_nesting_before_login_is_bounded(env: Env) -> None:
    c = env.connect()
    out = c.send(b"a LOGIN " + b"(" * 10000 + b"\r\n")
    assert b"a BAD" in out
    assert c.server.reader.buffered < 100
    assert c.cmd("NOOP").endswith(b"OK NOOP completed\r\n")


def test_list_patterns_with_regex_metacharacters(env: Env) -> None:
    c = env.connect(login="alice@example.test")
    started = time.monotonic()
    for pattern in (".*+?()[]{}|\\\\", "(a+)+$", "*%*%*%*%*%*%*%*%*%*%*%*%*%*%x"):
        out = c.cmd(b'LIST "" "' + pattern.encode() + b'"')
        assert out.endswith(b"OK LIST completed\r\n") and b"* LIST" not in out
    assert time.monotonic() - started < 2


def test_invalid_sequence_sets(env: Env) -> None:
    env.deliver(MSG)
    c = env.connect(login="alice@example.test")
    c.cmd("SELECT INBOX")
    for bad in ("0", "4294967296", "1:0", "1,,2", "a"):
        assert b"BAD" in c.cmd(f"FETCH {bad} FLAGS"), bad
    assert b"BAD Message sequence number out of range" in c.cmd("FETCH 7 FLAGS")
    assert b"* 1 FETCH" in c.cmd("FETCH *:* FLAGS")
    assert c.cmd("UID FETCH 4294967295 FLAGS").endswith(b"OK FETCH completed\r\n")


def test_hostile_structures_answer_in_bounded_time(env: Env) -> None:
    nested = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(100)
    )
    env.deliver(b"Subject: deep\r\n" + nested + b"Content-Type: text/plain\r\n\r\nleaf\r\n")
    many = b"".join(b"To: u%d@example.test\r\n" % i for i in range(10000))
    env.deliver(b"From: a@x.test\r\n" + many + b"Subject: many\r\n\r\nbody\r\n")
    c = env.connect(login="alice@example.test")
    c.cmd("SELECT INBOX")
    started = time.monotonic()
    out = c.cmd("FETCH 1:2 (BODYSTRUCTURE ENVELOPE)")
    assert time.monotonic() - started < 5
    assert out.count(b" FETCH (") == 2 and out.endswith(b"OK FETCH completed\r\n")


def test_internal_error_is_no_serverbug(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    c = env.connect(login="alice@example.test")

    def boom(*args: object) -> None:
        raise RuntimeError("kaputt")

    monkeypatch.setitem(COMMANDS, "LIST", replace(COMMANDS["LIST"], handler=boom))
    out = c.cmd('LIST "" *')
    assert b"NO [SERVERBUG]" in out and b"kaputt" not in out
    assert c.cmd("NOOP").endswith(b"OK NOOP completed\r\n")
