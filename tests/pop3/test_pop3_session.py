"""POP3 sessions end to end over StringTransport + Clock: login, commands, STLS, limits, errors."""

from __future__ import annotations

import base64

import pytest
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mailgw.interfaces import IDirectory, IMailbox, IMessageStore
from mailgw.pop3.protocol import MAX_BUFFER
from tests.pop3.pop3_fakes import ALICE, BOB, PASSWORDS, Env, Session

M1 = b"From: bob@example.test\r\nSubject: one\r\n\r\nfirst line\r\nsecond line\r\nthird line\r\n"
M2 = b"Subject: two\r\n\r\n.starts with a dot\r\n..two dots\r\nend\r\n"
M3 = b"Subject: three\r\n\r\nno final newline"


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def lines(text: str) -> list[str]:
    assert text.endswith("\r\n")
    return text[:-2].split("\r\n")


@pytest.fixture
def filled(env: Env) -> Env:
    for data in (M1, M2, M3):
        env.store.add(ALICE, data)
    return env


def test_fakes_implement_the_interfaces(env: Env) -> None:
    verifyObject(IMessageStore, env.store)
    verifyObject(IDirectory, env.directory)
    verifyObject(IMailbox, env.store.open_mailbox(ALICE))


def test_greeting_names_the_host_and_offers_no_apop(env: Env) -> None:
    s = env.session()
    assert s.greeting == b"+OK pop.example.test POP3 ready\r\n"
    assert b"<" not in s.greeting


def test_full_session_user_pass(filled: Env) -> None:
    s = filled.session()
    assert s.cmd(f"USER {ALICE}") == "+OK Send your password\r\n"
    sizes = [len(M1), len(M2), len(M3)]
    assert s.cmd("PASS alice secret") == f"+OK Logged in, 3 messages ({sum(sizes)} octets)\r\n"
    assert s.cmd("STAT") == f"+OK 3 {sum(sizes)}\r\n"
    assert lines(s.cmd("LIST")) == [
        f"+OK 3 messages ({sum(sizes)} octets)",
        f"1 {sizes[0]}",
        f"2 {sizes[1]}",
        f"3 {sizes[2]}",
        ".",
    ]
    assert s.cmd("LIST 2") == f"+OK 2 {sizes[1]}\r\n"
    uidl = lines(s.cmd("UIDL"))
    validity = filled.store.open_mailbox(ALICE).uidvalidity
    assert uidl == ["+OK Unique-ID listing follows"] + [
        f"{n} {validity}.{n}" for n in (1, 2, 3)
    ] + ["."]
    assert s.cmd("UIDL 3") == f"+OK 3 {validity}.3\r\n"
    assert s.send(b"RETR 1\r\n") == f"+OK {len(M1)} octets\r\n".encode() + M1 + b".\r\n"
    assert s.cmd("NOOP") == "+OK\r\n"
    assert s.cmd("DELE 1") == "+OK Message 1 deleted\r\n"
    assert s.cmd("STAT") == f"+OK 2 {sizes[1] + sizes[2]}\r\n"
    assert s.cmd("LIST 1") == "-ERR Message 1 already deleted\r\n"
    assert [line.split()[0] for line in lines(s.cmd("UIDL"))[1:-1]] == ["2", "3"]
    assert s.cmd("RSET") == f"+OK 3 messages ({sum(sizes)} octets)\r\n"
    assert s.cmd("DELE 2") == "+OK Message 2 deleted\r\n"
    assert s.cmd("DELE 2") == "-ERR Message 2 already deleted\r\n"
    assert s.cmd("QUIT") == "+OK pop.example.test POP3 server signing off (1 messages deleted)\r\n"
    assert s.closed
    assert filled.store.contents(ALICE) == [M1, M3]
    assert not s.factory.is_locked(ALICE)


def test_quit_without_login_and_without_deletions(filled: Env) -> None:
    s = filled.session()
    assert s.cmd("QUIT") == "+OK pop.example.test POP3 server signing off\r\n"
    assert s.closed
    s = filled.session()
    s.login()
    assert s.cmd("QUIT").startswith("+OK pop.example.test POP3 server signing off (0 messages")
    assert filled.store.contents(ALICE) == [M1, M2, M3]


def test_disconnect_without_quit_deletes_nothing(filled: Env) -> None:
    s = filled.session()
    s.login()
    s.cmd("DELE 1")
    s.lose()
    assert filled.store.contents(ALICE) == [M1, M2, M3]
    assert not s.factory.is_locked(ALICE)


def test_retr_dot_stuffs_and_terminates_a_message_without_crlf(filled: Env) -> None:
    s = filled.session()
    s.login()
    out = s.send(b"RETR 2\r\n")
    assert out == (
        f"+OK {len(M2)} octets\r\n".encode()
        + b"Subject: two\r\n\r\n..starts with a dot\r\n...two dots\r\nend\r\n.\r\n"
    )
    out = s.send(b"RETR 3\r\n")
    assert out == f"+OK {len(M3)} octets\r\n".encode() + M3 + b"\r\n.\r\n"


def test_retr_marks_seen_but_top_does_not(filled: Env) -> None:
    s = filled.session()
    s.login()
    s.send(b"TOP 1 0\r\n")
    assert filled.store.flags(ALICE, 1) == set()
    s.send(b"RETR 1\r\n")
    assert filled.store.flags(ALICE, 1) == {"\\Seen"}


def test_seen_flag_failure_is_logged_not_fatal(filled: Env) -> None:
    s = filled.session()
    s.login()
    filled.store.opened[-1].flag_error = OSError("index is read-only")
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert s.send(b"RETR 1\r\n").endswith(b".\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert s.cmd("NOOP") == "+OK\r\n"
    assert any(e.get("log_failure") is not None and e.get("user") == ALICE for e in events)


def test_top(filled: Env) -> None:
    s = filled.session()
    s.login()
    head = b"From: bob@example.test\r\nSubject: one\r\n\r\n"
    assert s.send(b"TOP 1 0\r\n") == b"+OK Top of message follows\r\n" + head + b".\r\n"
    assert s.send(b"TOP 1 2\r\n") == (
        b"+OK Top of message follows\r\n" + head + b"first line\r\nsecond line\r\n.\r\n"
    )
    assert s.send(b"TOP 1 99\r\n") == b"+OK Top of message follows\r\n" + M1 + b".\r\n"
    assert s.send(b"TOP 2 1\r\n") == (
        b"+OK Top of message follows\r\nSubject: two\r\n\r\n..starts with a dot\r\n.\r\n"
    )
    assert s.send(b"TOP 3 5\r\n") == b"+OK Top of message follows\r\n" + M3 + b"\r\n.\r\n"
    for bad in ("TOP 1", "TOP 1 x", "TOP 1 -1", "TOP 1 2 3"):
        assert s.cmd(bad) == "-ERR Syntax error in arguments\r\n"
    assert s.cmd("TOP 9 1") == "-ERR No such message\r\n"


def test_message_numbers_are_checked(filled: Env) -> None:
    s = filled.session(max_errors=50)
    s.login()
    assert s.cmd("RETR 0") == "-ERR No such message\r\n"
    assert s.cmd("RETR 4") == "-ERR No such message\r\n"
    assert s.cmd("RETR x") == "-ERR Invalid message number\r\n"
    assert s.cmd("RETR ٣") == "-ERR Invalid message number\r\n"  # a non-ASCII digit
    assert s.cmd("RETR 99999999999") == "-ERR Invalid message number\r\n"
    assert s.cmd("DELE -1") == "-ERR Invalid message number\r\n"
    assert s.cmd("RETR") == "-ERR Syntax error in arguments\r\n"
    assert s.cmd("DELE 1 2") == "-ERR Syntax error in arguments\r\n"
    assert s.cmd("LIST 1 2") == "-ERR Syntax error in arguments\r\n"
    assert s.cmd("UIDL 7") == "-ERR No such message\r\n"


def test_empty_maildrop(env: Env) -> None:
    s = env.session()
    assert s.login() == "+OK Logged in, 0 messages (0 octets)\r\n"
    assert s.cmd("STAT") == "+OK 0 0\r\n"
    assert s.cmd("LIST") == "+OK 0 messages (0 octets)\r\n.\r\n"
    assert s.cmd("RETR 1") == "-ERR No such message\r\n"


def test_snapshot_numbering_is_kept_for_the_session(filled: Env) -> None:
    s = filled.session()
    s.login()
    filled.store.add(ALICE, b"Subject: late\r\n\r\nlate\r\n")
    assert s.cmd("STAT").startswith("+OK 3 ")
    filled.store.opened[-1].expunge([2])  # removed behind our back (say, by IMAP)
    assert s.cmd("RETR 2") == "-ERR Message no longer exists\r\n"
    assert s.cmd("DELE 2") == "+OK Message 2 deleted\r\n"
    assert s.cmd("QUIT").startswith("+OK")
    assert filled.store.contents(ALICE) == [M1, M3, b"Subject: late\r\n\r\nlate\r\n"]


def test_uidl_is_stable_across_sessions(filled: Env) -> None:
    factory = filled.factory()
    s = filled.session(factory=factory)
    s.login()
    first = s.cmd("UIDL")
    s.cmd("DELE 1")
    s.cmd("QUIT")
    s = filled.session(factory=factory)
    s.login()
    second = s.cmd("UIDL")
    assert lines(second)[1:] == [
        f"{int(n) - 1} {u}" for n, u in (line.split() for line in lines(first)[2:-1])
    ] + ["."]


# -- authentication ----------------------------------------------------------------------------


def test_auth_plain_with_initial_response(filled: Env) -> None:
    s = filled.session()
    assert s.cmd(f"AUTH PLAIN {plain('', ALICE, PASSWORDS[ALICE])}").startswith("+OK Logged in, 3")


def test_auth_plain_with_continuation(filled: Env) -> None:
    s = filled.session()
    assert s.cmd("auth plain") == "+ \r\n"
    assert s.cmd(plain(ALICE, ALICE, PASSWORDS[ALICE])).startswith("+OK Logged in")


def test_auth_name_is_normalised_as_an_address(filled: Env) -> None:
    s = filled.session()
    assert s.cmd(f"AUTH PLAIN {plain('', 'Alice@EXAMPLE.test', PASSWORDS[ALICE])}").startswith(
        "+OK"
    )
    assert filled.directory.calls == [(ALICE, PASSWORDS[ALICE])]


def test_auth_plain_cancel_and_bad_input(env: Env) -> None:
    s = env.session()
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd("*") == "-ERR Authentication cancelled\r\n"
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd("not base64!") == "-ERR Invalid base64 data\r\n"
    assert s.cmd("AUTH PLAIN dGVzdA") == "-ERR Invalid base64 data\r\n"  # bad padding
    assert s.cmd("AUTH PLAIN " + base64.b64encode(b"no nuls").decode()) == (
        "-ERR Invalid SASL PLAIN response\r\n"
    )
    assert s.cmd("AUTH PLAIN " + base64.b64encode(b"\0\xff\0x").decode()) == (
        "-ERR Invalid SASL PLAIN response\r\n"
    )
    assert s.cmd("AUTH PLAIN =") == "-ERR Invalid SASL PLAIN response\r\n"
    assert s.cmd("AUTH PLAIN a b") == "-ERR Syntax error in arguments\r\n"
    assert s.cmd("AUTH LOGIN") == "-ERR Unsupported authentication mechanism\r\n"
    assert s.cmd("AUTH") == "+OK Supported SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert env.directory.calls == []
    assert s.cmd("NOOP") == "-ERR Command not valid in this state\r\n"


def test_auth_plain_continuation_edges(filled: Env) -> None:
    """The shared SASL exchange keeps POP3's own rules: a continuation is decoded as sent
    (no whitespace allowed), ``=`` is empty only as the initial response, an empty
    authentication identity is a failed login, not a malformed message."""
    s = filled.session()
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd(" " + plain("", ALICE, PASSWORDS[ALICE])) == "-ERR Invalid base64 data\r\n"
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd("=") == "-ERR Invalid base64 data\r\n"
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd(" *") == "-ERR Authentication cancelled\r\n"
    assert s.cmd(f"AUTH PLAIN {plain('', '', 'x')}") == ""
    filled.clock.advance(2.0)
    assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"
    assert s.cmd("AUTH plain") == "+ \r\n"
    assert s.cmd(plain("alice@EXAMPLE.test", ALICE, PASSWORDS[ALICE])).startswith("+OK Logged in")


def test_auth_plain_refuses_another_authzid(filled: Env) -> None:
    s = filled.session()
    assert s.cmd(f"AUTH PLAIN {plain(BOB, ALICE, PASSWORDS[ALICE])}") == ""
    filled.clock.advance(2.0)
    assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"
    assert filled.directory.calls == []


def test_wrong_password_is_answered_after_the_delay_and_pipelining_waits(filled: Env) -> None:
    s = filled.session()
    out = s.send(
        f"USER {ALICE}\r\nPASS wrong\r\nUSER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\nSTAT\r\n".encode()
    )
    assert out == b"+OK Send your password\r\n"
    filled.clock.advance(1.9)
    assert s.take() == b""
    filled.clock.advance(0.1)
    total = len(M1) + len(M2) + len(M3)
    assert s.take().decode() == (
        "-ERR [AUTH] Authentication failed\r\n"
        "+OK Send your password\r\n"
        f"+OK Logged in, 3 messages ({total} octets)\r\n"
        f"+OK 3 {total}\r\n"
    )


def test_unknown_user_and_invalid_name_fail_alike(env: Env) -> None:
    s = env.session()
    for name in ("nobody@example.test", "not an address", "alice"):
        s.cmd(f"USER {name}")
        assert s.cmd("PASS whatever") == ""
        env.clock.advance(2.0)
        assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"
    assert env.directory.calls == [("nobody@example.test", "whatever")]


def test_pass_keeps_spaces_and_needs_user(filled: Env) -> None:
    s = filled.session()
    assert s.cmd("PASS alice secret") == "-ERR Send USER first\r\n"
    assert s.cmd("USER") == "-ERR Missing user name\r\n"
    assert s.login().startswith("+OK Logged in")
    assert filled.directory.calls == [(ALICE, "alice secret")]


def test_directory_error_is_a_temporary_failure(filled: Env) -> None:
    filled.directory.error = RuntimeError("database is locked")
    s = filled.session()
    assert s.login() == "-ERR [SYS/TEMP] Authentication temporarily unavailable\r\n"
    filled.directory.error = None
    assert s.login().startswith("+OK Logged in")


def test_mailbox_open_error_is_a_temporary_failure_and_releases_the_lock(filled: Env) -> None:
    filled.store.open_error = OSError("disk on fire")
    s = filled.session()
    assert s.login() == "-ERR [SYS/TEMP] Unable to open the mailbox, try again later\r\n"
    assert not s.factory.is_locked(ALICE)
    filled.store.open_error = None
    assert s.login().startswith("+OK Logged in")


def test_connection_lost_while_authenticating(filled: Env) -> None:
    filled.directory.hold = True
    s = filled.session()
    s.send(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
    s.lose()
    filled.directory.pending[0].callback(object())
    assert s.take() == b""
    assert not s.factory.is_locked(ALICE)


def test_connection_lost_during_failure_delay(filled: Env) -> None:
    s = filled.session()
    s.send(f"USER {ALICE}\r\nPASS nope\r\n".encode())
    s.take()
    s.lose()
    assert filled.clock.getDelayedCalls() == []


# -- plaintext policy, CAPA and STLS -------------------------------------------------------------


def capa(s: Session) -> list[str]:
    out = lines(s.cmd("CAPA"))
    assert out[0] == "+OK Capability list follows" and out[-1] == "."
    return out[1:-1]


def test_capa_on_loopback_without_tls(env: Env) -> None:
    s = env.session("127.0.0.1")
    assert capa(s) == [
        "TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "SASL PLAIN",
        "IMPLEMENTATION mailgw",
    ]  # fmt: skip
    s.login()
    assert capa(s) == [
        "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION mailgw",
    ]  # fmt: skip


def test_plaintext_refused_on_remote_peer_without_tls(env: Env) -> None:
    env.tls_options = object()
    s = env.session("192.0.2.7")
    assert capa(s) == [
        "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS", "IMPLEMENTATION mailgw",
    ]  # fmt: skip
    refused = "-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n"
    assert s.cmd(f"USER {ALICE}") == refused
    assert s.cmd("PASS x") == "-ERR Send USER first\r\n"
    assert s.cmd(f"AUTH PLAIN {plain('', ALICE, PASSWORDS[ALICE])}") == refused
    assert s.cmd("AUTH") == "+OK Supported SASL mechanisms follow\r\n.\r\n"
    assert env.directory.calls == []


def test_plaintext_policy_from_config(env: Env) -> None:
    s = env.session("192.0.2.7", allow_plaintext_auth="yes")
    assert "USER" in capa(s) and "SASL PLAIN" in capa(s)
    assert s.login().startswith("+OK Logged in")
    s = env.session("127.0.0.1", allow_plaintext_auth="no")
    assert "USER" not in capa(s)
    assert s.cmd(f"USER {ALICE}").startswith("-ERR [AUTH] Plaintext")
    s = env.session("::1", allow_plaintext_auth="loopback")
    assert s.login().startswith("+OK Logged in")


def test_implicit_tls_allows_plaintext_and_offers_no_stls(env: Env) -> None:
    env.tls_options = object()
    env.implicit_tls = True
    s = env.session("192.0.2.7", allow_plaintext_auth="no")
    caps = capa(s)
    assert "STLS" not in caps and "USER" in caps and "SASL PLAIN" in caps
    assert s.cmd("STLS") == "-ERR TLS is already active\r\n"
    assert s.login().startswith("+OK Logged in")


def test_stls_discards_pipelined_plaintext_and_resets_state(env: Env) -> None:
    options = object()
    env.tls_options = options
    s = env.session("192.0.2.7")
    s.cmd("USER mallory@example.test")  # refused, and never remembered anyway
    out = s.send(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert s.transport.tls_started == [options]
    assert s.transport.before_tls == b"+OK Begin TLS negotiation\r\n"
    assert env.directory.calls == []
    # After the handshake: plaintext is allowed, STLS no longer offered, state is fresh.
    caps = capa(s)
    assert "STLS" not in caps and "USER" in caps
    assert s.cmd(f"PASS {PASSWORDS[ALICE]}") == "-ERR Send USER first\r\n"
    assert s.cmd("STLS") == "-ERR TLS is already active\r\n"
    assert s.login().startswith("+OK Logged in")


def test_stls_discards_a_pending_sasl_continuation(env: Env) -> None:
    env.tls_options = object()
    s = env.session("127.0.0.1")
    s.cmd(f"USER {ALICE}")
    assert s.cmd("STLS") == "+OK Begin TLS negotiation\r\n"
    assert s.cmd(f"PASS {PASSWORDS[ALICE]}") == "-ERR Send USER first\r\n"


def test_stls_refused_without_options_and_after_login(env: Env) -> None:
    s = env.session()
    assert s.cmd("STLS") == "-ERR TLS is not available\r\n"
    env.tls_options = object()
    s = env.session("127.0.0.1")
    s.login()
    assert s.cmd("STLS") == "-ERR Command not valid in this state\r\n"
    assert s.transport.tls_started == []


# -- locking, limits, timeouts, errors ------------------------------------------------------------


def test_maildrop_lock(filled: Env) -> None:
    factory = filled.factory()
    first = filled.session(factory=factory)
    first.login()
    second = filled.session(factory=factory)
    assert second.login() == "-ERR [IN-USE] Mailbox is locked by another session\r\n"
    assert filled.session(factory=factory).login(BOB).startswith("+OK Logged in")
    first.cmd("QUIT")
    assert second.login().startswith("+OK Logged in")
    second.lose()
    third = filled.session(factory=factory)
    assert third.login().startswith("+OK Logged in")


def test_connections_per_ip(env: Env) -> None:
    factory = env.factory(max_connections_per_ip=2)
    a = env.session("192.0.2.1", factory=factory)
    b = env.session("192.0.2.1", factory=factory)
    c = env.session("192.0.2.1", factory=factory)
    assert a.greeting.startswith(b"+OK") and b.greeting.startswith(b"+OK")
    assert c.greeting == b"-ERR [SYS/TEMP] Too many connections from your address\r\n"
    assert c.closed
    assert env.session("192.0.2.2", factory=factory).greeting.startswith(b"+OK")
    c.lose()
    assert factory.connections_from("192.0.2.1") == 2
    a.lose()
    assert env.session("192.0.2.1", factory=factory).greeting.startswith(b"+OK")
    b.lose()
    assert factory.connections_from("192.0.2.1") == 1


def test_unknown_and_wrong_state_commands(env: Env) -> None:
    s = env.session()
    assert s.cmd("HELO") == "-ERR Unknown command\r\n"
    assert s.cmd("APOP alice 0123") == "-ERR Unknown command\r\n"
    assert s.cmd("") == "-ERR Unknown command\r\n"
    assert s.cmd("STAT") == "-ERR Command not valid in this state\r\n"
    assert s.cmd("RETR 1") == "-ERR Command not valid in this state\r\n"
    s.login()
    assert s.cmd(f"USER {ALICE}") == "-ERR Command not valid in this state\r\n"
    assert s.cmd("AUTH PLAIN") == "-ERR Command not valid in this state\r\n"
    assert s.send(b"stat\n") == b"+OK 0 0\r\n"  # bare LF and lower case are accepted


def test_too_many_errors_closes(env: Env) -> None:
    s = env.session(max_errors=3)
    s.cmd("BAD1")
    s.cmd("BAD2")
    assert not s.closed
    out = s.send(b"BAD3\r\nNOOP\r\n")
    assert out == b"-ERR Unknown command\r\n-ERR Too many errors, closing connection\r\n"
    assert s.closed


def test_failed_logins_count_as_errors(env: Env) -> None:
    s = env.session(max_errors=2)
    for _ in range(2):
        s.login(ALICE, "wrong")
        env.clock.advance(15.0)  # the failure delay grows with each failure (auth penalty)
    assert s.take().endswith(b"-ERR Too many errors, closing connection\r\n")
    assert s.closed


def test_line_length_limit(env: Env) -> None:
    s = env.session()
    assert s.send(b"NOOP " + b"x" * 1100 + b"\r\nCAPA\r\n").startswith(b"-ERR Line too long\r\n+OK")
    # An overlong line arriving in pieces is refused once and its rest ignored.
    assert s.send(b"USER " + b"a" * 2000) == b"-ERR Line too long\r\n"
    assert s.send(b"b" * 2000) == b""
    assert s.send(b"c\r\nQUIT\r\n") == b"+OK pop.example.test POP3 server signing off\r\n"
    # 1024 octets are fine.
    s = env.session()
    assert s.send(b"USER " + b"a" * 1019 + b"\r\n") == b"+OK Send your password\r\n"


def test_invalid_utf8_command(env: Env) -> None:
    s = env.session()
    assert s.send(b"USER \xff\xfe\r\n") == b"-ERR Command is not valid UTF-8\r\n"


def test_idle_timeout(env: Env) -> None:
    s = env.session(idle_timeout=60.0)
    env.clock.advance(59)
    s.cmd("CAPA")
    env.clock.advance(59)
    assert not s.closed
    env.clock.advance(1)
    assert s.take() == b"-ERR Idle timeout, closing connection\r\n"
    assert s.closed
    s.lose()
    assert env.clock.getDelayedCalls() == []


def test_idle_timeout_while_a_client_stops_reading_aborts(filled: Env) -> None:
    filled.store.add(ALICE, b"x" * 300_000)
    s = filled.session(idle_timeout=60.0)
    s.login()
    s.proto.dataReceived(b"RETR 4\r\n")
    s.transport.producer.resumeProducing()  # one chunk, then the client stalls
    filled.clock.advance(60)
    assert s.transport.disconnected  # aborted, not a graceful close waiting on the producer
    sent = s.take()
    assert b"-ERR" not in sent
    s.lose()
    assert not s.factory.is_locked(ALICE)


def test_read_error_mid_message_aborts(filled: Env) -> None:
    s = filled.session()
    s.login()

    class Broken:
        def read(self, n: int) -> bytes:
            raise OSError("I/O error")

        def close(self) -> None:
            pass

    filled.store.opened[-1].open_message = lambda uid: Broken()  # type: ignore[method-assign]
    out = s.send(b"RETR 1\r\n")
    assert out == f"+OK {len(M1)} octets\r\n".encode()
    assert s.transport.disconnected


def test_internal_error_is_sys_temp_and_logged_with_session_and_user(filled: Env) -> None:
    s = filled.session()
    s.login()
    filled.store.opened[-1].open_error = ValueError("boom")
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert s.cmd("RETR 1") == "-ERR [SYS/TEMP] Internal server error, try again later\r\n"
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert s.cmd("NOOP") == "+OK\r\n"
    logged = [e for e in events if e.get("log_failure") is not None]
    assert logged and logged[0]["session"] == s.proto.session_id and logged[0]["user"] == ALICE


def test_expunge_failure_at_quit(filled: Env) -> None:
    s = filled.session()
    s.login()
    filled.store.opened[-1].expunge_error = OSError("read-only file system")
    s.cmd("DELE 1")
    assert s.cmd("QUIT") == "-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"
    assert s.closed
    assert not s.factory.is_locked(ALICE)


def test_reading_pauses_when_a_client_floods_during_a_long_command(filled: Env) -> None:
    filled.directory.hold = True
    s = filled.session()
    s.send(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
    s.send(b"NOOP\r\n" * (MAX_BUFFER // 6 + 10))
    assert s.transport.producerState == "paused"
    filled.directory.pending[0].callback(object())
    out = s.take()
    assert out.count(b"+OK\r\n") == MAX_BUFFER // 6 + 10
    assert s.transport.producerState == "producing"


def test_five_megabyte_message_is_streamed(env: Env) -> None:
    line = b"." + b"x" * 998 + b"\r\n"  # every line needs stuffing
    body = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line))
    assert len(body) > 5_000_000
    env.store.add(ALICE, body)
    s = env.session()
    s.login()
    writes: list[int] = []
    original = s.transport.write

    def record(data: bytes) -> None:
        writes.append(len(data))
        original(data)

    s.transport.write = record  # type: ignore[method-assign]
    s.proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    assert s.transport.producer is not None  # nothing sent beyond the +OK yet
    assert b"+OK\r\n" not in s.transport.value()  # NOOP waits for the message
    s.pump()
    out = s.take()
    header = f"+OK {len(body)} octets\r\n".encode()
    assert out == header + body.replace(b"\r\n.", b"\r\n..") + b".\r\n+OK\r\n"
    assert len(writes) > 70 and max(writes) <= 70 * 1024


def test_input_after_quit_is_ignored(env: Env) -> None:
    s = env.session()
    assert s.send(b"QUIT\r\nCAPA\r\n") == b"+OK pop.example.test POP3 server signing off\r\n"
    assert s.send(b"CAPA\r\n") == b""


def test_directory_answer_after_disconnect_is_ignored(filled: Env) -> None:
    filled.directory.hold = True
    s = filled.session()
    s.send(f"USER {ALICE}\r\nPASS wrong\r\n".encode())
    s.lose()
    from twisted.cred.error import UnauthorizedLogin

    filled.directory.pending[0].errback(UnauthorizedLogin())
    assert s.take() == b"" and filled.clock.getDelayedCalls() == []


def test_unexpected_error_after_authentication_is_sys_temp(filled: Env) -> None:
    factory = filled.factory()

    def broken_lock(user: str, session: object) -> bool:
        raise RuntimeError("lock table corrupt")

    factory.lock = broken_lock  # type: ignore[method-assign]
    s = filled.session(factory=factory)
    assert s.login() == "-ERR [SYS/TEMP] Internal server error, try again later\r\n"
    assert s.cmd("CAPA").startswith("+OK")


def test_factory_log_prefix(env: Env) -> None:
    assert env.factory().logPrefix() == "POP3"
    env.implicit_tls = True
    assert env.factory().logPrefix() == "POP3S"
