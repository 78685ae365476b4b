"""The outbound SMTP client against a scripted loopback server and Postfix's smtp-sink."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred

from mailgw.model import Reply
from mailgw.net.tls import load_certificate_options
from mailgw.relay.client import (
    CHANNEL_FAILURE,
    MESSAGE_PERMANENT,
    OK,
    RECIPIENT_PERMANENT,
    AuthFailure,
    ClientOptions,
    ConnectFailed,
    ConnectionClosed,
    ConnectionPool,
    ProtocolError,
    SessionRejected,
    SMTPConnection,
    SMTPTimeout,
    Target,
    Timeouts,
    TLSFailure,
    Transaction,
    deliver,
)
from tests.relay.reactorhelper import reactor, sleep, until, within
from tests.relay.smtpserver import Recorder, Script, start_smtp

FAST = Timeouts(
    connect=2,
    greeting=2,
    ehlo=2,
    starttls=2,
    auth=2,
    mail=2,
    rcpt=2,
    data_init=2,
    data_block=2,
    data_end=2,
    rset=2,
    quit=1,
)
OPTS = ClientOptions(helo="relay.test", timeouts=FAST)
BODY = b"Subject: test\n\n.starts with a dot\nbare LF line\r\nCRLF line\rbare CR\n..two dots\nlast"


@pytest_twisted.async_yield_fixture
async def servers() -> AsyncIterator[Callable[..., tuple[Target, Recorder]]]:
    ports: list[Any] = []
    recorders: list[Recorder] = []

    def start(script: Script | None = None, host: str = "127.0.0.1") -> tuple[Target, Recorder]:
        port, rec = start_smtp(reactor, script or Script(), host)
        ports.append(port)
        recorders.append(rec)
        return Target(f"mx{len(ports)}.test", host, port.getHost().port), rec

    yield start
    for rec in recorders:
        for proto in rec.protocols:
            if proto.transport is not None and proto.transport.connected:
                proto.transport.abortConnection()
    for port in ports:
        await within(maybeDeferred(port.stopListening))
    await sleep(0)


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "msg.eml"
    path.write_bytes(BODY)
    return path


def tx(path: Path, *rcpts: str, **kw: Any) -> Transaction:
    return Transaction("sender@example.org", list(rcpts or ["rcpt@dest.test"]), str(path), **kw)


def closed_port() -> int:
    from mailgw.testing.server import free_port

    return free_port()


@pytest_twisted.ensureDeferred
async def test_pipelined_delivery_with_per_recipient_replies(servers, message) -> None:
    target, rec = servers(
        Script(
            greeting="220-mx.test first line\n220 second line",
            rcpt_replies={"gone@dest.test": "550 5.1.1 no such user"},
        )
    )
    result = await within(
        deliver(reactor, tx(message, "a@dest.test", "gone@dest.test"), [target], OPTS)
    )
    assert result.connected and not result.tls and result.error is None
    assert result.reply == Reply(250, "2.0.0", "queued")
    assert result.recipients["a@dest.test"].code == 250
    assert result.recipients["gone@dest.test"] == Reply(550, "5.1.1", "no such user")
    assert result.outcomes(["a@dest.test", "gone@dest.test"]) == {
        "a@dest.test": OK,
        "gone@dest.test": RECIPIENT_PERMANENT,
    }
    assert (result.mx, result.address, result.port) == (target.name, "127.0.0.1", target.port)
    assert result.source_address == "127.0.0.1"
    # MAIL, both RCPTs and DATA arrived in one write (PIPELINING).
    assert any(b"MAIL FROM" in c and b"RCPT TO" in c and b"DATA" in c for c in rec.chunks)
    assert rec.commands[0] == "EHLO relay.test"
    assert rec.commands[1] == f"MAIL FROM:<sender@example.org> SIZE={len(BODY)}"
    await until(lambda: "QUIT" in rec.commands)


@pytest_twisted.ensureDeferred
async def test_data_is_dot_stuffed_and_crlf_only(servers, message) -> None:
    target, rec = servers()
    await within(deliver(reactor, tx(message), [target], OPTS))
    raw = rec.messages[0]
    assert raw == (
        b"Subject: test\r\n\r\n..starts with a dot\r\nbare LF line\r\nCRLF line\r\n"
        b"bare CR\r\n...two dots\r\nlast\r\n"
    )
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")


@pytest_twisted.ensureDeferred
async def test_prefix_is_sent_before_the_file(servers, message) -> None:
    target, rec = servers()
    await within(deliver(reactor, tx(message, prefix=b"Received: by relay\n"), [target], OPTS))
    assert rec.messages[0].startswith(b"Received: by relay\r\nSubject: test\r\n")


@pytest_twisted.ensureDeferred
async def test_a_file_is_sent_from_its_offset(servers, message, tmp_path) -> None:
    """A spool queue file holds its envelope before the message: only the bytes from
    ``offset`` are sent, and SIZE counts only those."""
    target, rec = servers()
    await within(deliver(reactor, tx(message), [target], OPTS))
    queue_file = tmp_path / "queued.msg"
    queue_file.write_bytes(b"MGWQ1 C 2\n{}" + BODY)
    result = await within(deliver(reactor, tx(queue_file, offset=12), [target], OPTS))
    assert result.recipients["rcpt@dest.test"].code == 250
    assert rec.messages[1] == rec.messages[0]
    mails = [c for c in rec.commands if c.startswith("MAIL FROM")]
    assert mails == [f"MAIL FROM:<sender@example.org> SIZE={len(BODY)}"] * 2


@pytest_twisted.ensureDeferred
async def test_in_memory_data_is_sent_like_the_file(servers, message, tmp_path) -> None:
    target, rec = servers()
    await within(deliver(reactor, tx(message, prefix=b"Received: by relay\n"), [target], OPTS))
    # The file is not read when the content is given: a missing path proves it.
    missing = tmp_path / "gone.eml"
    memory = tx(missing, prefix=b"Received: by relay\n", data=BODY)
    assert memory.declared_size == len(BODY) + len(b"Received: by relay\n")
    result = await within(deliver(reactor, memory, [target], OPTS))
    assert result.recipients["rcpt@dest.test"].code == 250
    assert rec.messages[1] == rec.messages[0]
    assert rec.commands[1].endswith(f"SIZE={memory.declared_size}")


@pytest_twisted.ensureDeferred
async def test_without_pipelining_commands_go_one_by_one(servers, message) -> None:
    target, rec = servers(Script(extensions=[], rcpt_replies={"x@dest.test": "550 5.1.1 unknown"}))
    result = await within(deliver(reactor, tx(message, "x@dest.test"), [target], OPTS))
    assert result.reply is None and result.recipients["x@dest.test"].enhanced == "5.1.1"
    assert "DATA" not in rec.commands  # nobody accepted: no DATA
    assert not any(b"MAIL" in c and b"RCPT" in c for c in rec.chunks)
    assert rec.commands[1] == "MAIL FROM:<sender@example.org>"  # no SIZE when not offered


@pytest_twisted.ensureDeferred
async def test_pipelined_all_recipients_refused_sends_no_body(servers, message) -> None:
    target, rec = servers(
        Script(
            rcpt_replies={"x@dest.test": "550 5.1.1 unknown"},
            data_reply="554 5.5.1 no valid recipients",
        )
    )
    result = await within(deliver(reactor, tx(message, "x@dest.test"), [target], OPTS))
    assert result.reply is None and result.recipients["x@dest.test"].code == 550
    assert rec.messages == []


@pytest_twisted.ensureDeferred
async def test_pipelined_354_after_all_refused_gets_an_empty_body(servers, message) -> None:
    target, rec = servers(Script(rcpt_replies={"x@dest.test": "550 5.1.1 unknown"}))
    result = await within(deliver(reactor, tx(message, "x@dest.test"), [target], OPTS))
    assert result.recipients["x@dest.test"].code == 550
    assert rec.messages == [b""]


@pytest_twisted.ensureDeferred
async def test_mail_refused_applies_to_every_recipient(servers, message) -> None:
    for extensions in (["PIPELINING"], []):
        target, rec = servers(Script(extensions=extensions, mail_reply="553 5.7.1 sender rejected"))
        result = await within(deliver(reactor, tx(message, "a@d.test", "b@d.test"), [target], OPTS))
        assert result.reply == Reply(553, "5.7.1", "sender rejected")
        assert set(result.outcomes(["a@d.test", "b@d.test"]).values()) == {CHANNEL_FAILURE}


@pytest_twisted.ensureDeferred
async def test_pipelined_mail_refused_but_354_still_ends_data(servers, message) -> None:
    target, rec = servers(Script(mail_reply="550 5.1.8 bad sender"))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.reply is not None and result.reply.enhanced == "5.1.8"
    assert rec.messages == [b""]


@pytest_twisted.ensureDeferred
async def test_data_refused_and_final_reply_errors(servers, message) -> None:
    target, _ = servers(Script(data_reply="554 5.6.0 content refused"))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.outcome("rcpt@dest.test") == MESSAGE_PERMANENT
    target, _ = servers(Script(extensions=[], data_reply="451 4.3.0 try later"))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.reply == Reply(451, "4.3.0", "try later")
    target, _ = servers(Script(end_reply="552 5.3.4 too big"))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.recipients["rcpt@dest.test"].enhanced == "5.3.4"


@pytest_twisted.ensureDeferred
async def test_helo_fallback_when_ehlo_is_refused(servers, message) -> None:
    target, rec = servers(Script(ehlo_reply="502 5.5.1 what is EHLO"))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.reply is not None and result.reply.code == 250
    assert rec.commands[:2] == ["EHLO relay.test", "HELO relay.test"]
    assert rec.commands[2] == "MAIL FROM:<sender@example.org>"


@pytest_twisted.ensureDeferred
async def test_helo_refused_too_is_a_session_rejection(servers, message) -> None:
    target, _ = servers(Script(ehlo_reply="500 no", helo_reply="554 5.7.1 go away"))
    with pytest.raises(SessionRejected) as info:
        await within(SMTPConnection.connect(reactor, target, OPTS))
    assert info.value.reply == Reply(554, "5.7.1", "go away")


@pytest_twisted.ensureDeferred
async def test_greeting_rejection_fails_over_to_the_next_target(servers, message) -> None:
    bad, _ = servers(Script(greeting="554 5.7.1 your IP is on a blocklist"))
    busy, _ = servers(Script(greeting="421 4.3.2 busy"))
    good, rec = servers()
    result = await within(deliver(reactor, tx(message), [bad, busy, good], OPTS))
    assert result.mx == good.name and result.reply is not None and result.reply.code == 250
    assert len(result.attempts) == 3 and "blocklist" in result.attempts[0]
    only_bad = await within(deliver(reactor, tx(message), [bad], OPTS))
    assert isinstance(only_bad.error, SessionRejected) and only_bad.connected
    assert only_bad.outcome("rcpt@dest.test") == CHANNEL_FAILURE


@pytest_twisted.ensureDeferred
async def test_connection_refused_fails_over_then_reports(servers, message) -> None:
    good, _ = servers()
    dead = Target("dead.test", "127.0.0.1", closed_port())
    result = await within(deliver(reactor, tx(message), [dead, good], OPTS))
    assert result.mx == good.name and "connection refused" in result.attempts[0]
    result = await within(deliver(reactor, tx(message), [dead], OPTS))
    assert isinstance(result.error, ConnectFailed) and not result.connected
    assert result.outcome("rcpt@dest.test") == CHANNEL_FAILURE
    assert "connection refused" in result.describe("rcpt@dest.test")
    assert (await within(deliver(reactor, tx(message), [], OPTS))).error is not None


@pytest_twisted.ensureDeferred
async def test_transient_mail_reply_tries_next_target(servers, message) -> None:
    grey, _ = servers(Script(mail_reply="451 4.7.1 greylisted"))
    good, _ = servers()
    result = await within(deliver(reactor, tx(message), [grey, good], OPTS))
    assert result.mx == good.name and "greylisted" in result.attempts[0]
    last = await within(deliver(reactor, tx(message), [grey], OPTS))
    assert last.reply == Reply(451, "4.7.1", "greylisted")


@pytest_twisted.ensureDeferred
async def test_server_closing_connection_midway_is_reported(servers, message) -> None:
    target, _ = servers(Script(refuse_connection=True))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.error is not None and result.error.stage == "greeting"


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(servers, message) -> None:
    target, _ = servers(Script(greeting=None))
    quick = ClientOptions(helo="relay.test", timeouts=Timeouts(greeting=0.3))
    with pytest.raises(SMTPTimeout, match="greeting"):
        await within(SMTPConnection.connect(reactor, target, quick))
    target, _ = servers(Script(silent_on={"DATA"}, extensions=[]))
    quick = ClientOptions(helo="relay.test", timeouts=Timeouts(data_init=0.3))
    result = await within(deliver(reactor, tx(message), [target], quick))
    assert isinstance(result.error, SMTPTimeout) and result.error.stage == "data"


@pytest_twisted.ensureDeferred
async def test_malformed_replies_are_protocol_errors(servers) -> None:
    for greeting in ("hello there", "220-first\n250 other code", "220 " + "x" * 9000):
        target, _ = servers(Script(greeting=greeting))
        with pytest.raises(ProtocolError):
            await within(SMTPConnection.connect(reactor, target, OPTS))


@pytest_twisted.ensureDeferred
async def test_size_limit_and_smtputf8_are_checked_before_mail(servers, message) -> None:
    target, rec = servers(Script(extensions=["SIZE 10"]))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.reply is not None and result.reply.enhanced == "5.3.4"
    assert result.outcome("rcpt@dest.test") == MESSAGE_PERMANENT
    assert not any(c.startswith("MAIL") for c in rec.commands)
    target, rec = servers(Script(extensions=["SIZE 0"]))
    result = await within(deliver(reactor, tx(message, "用户@dest.test"), [target], OPTS))
    assert result.reply is not None and result.reply.enhanced == "5.6.7"
    assert result.outcome("用户@dest.test") == MESSAGE_PERMANENT


@pytest_twisted.ensureDeferred
async def test_mail_parameters_for_8bit_and_smtputf8(servers, message) -> None:
    target, rec = servers(Script(extensions=["SIZE 0", "8BITMIME", "SMTPUTF8"]))
    await within(
        deliver(
            reactor, tx(message, "用户@dest.test", body_8bitmime=True, size=123), [target], OPTS
        )
    )
    assert rec.commands[1] == "MAIL FROM:<sender@example.org> SIZE=123 BODY=8BITMIME SMTPUTF8"
    assert rec.commands[2] == "RCPT TO:<用户@dest.test>"


@pytest_twisted.ensureDeferred
async def test_opportunistic_starttls(servers, message, selfsigned) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, rec = servers(Script(tls_options=tls))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert result.tls and rec.tls_sessions == 1 and result.reply is not None
    assert rec.commands[:3] == ["EHLO relay.test", "STARTTLS", "EHLO relay.test"]
    assert rec.messages[0].startswith(b"Subject: test\r\n")


@pytest_twisted.ensureDeferred
async def test_verified_tls_with_a_trusted_ca(servers, message, selfsigned) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, _ = servers(Script(tls_options=tls))
    opts = ClientOptions(
        helo="relay.test",
        tls="require",
        tls_verify=True,
        tls_hostname="localhost",
        tls_ca_file=str(selfsigned[0]),
        timeouts=FAST,
    )
    conn = await within(SMTPConnection.connect(reactor, target, opts))
    assert conn.tls
    await within(conn.quit())
    wrong = ClientOptions(
        helo="relay.test",
        tls="require",
        tls_verify=True,
        tls_hostname="other.test",
        tls_ca_file=str(selfsigned[0]),
        timeouts=FAST,
    )
    with pytest.raises(TLSFailure, match="handshake"):
        await within(SMTPConnection.connect(reactor, target, wrong))


@pytest_twisted.ensureDeferred
async def test_tls_none_does_not_start_tls(servers, message, selfsigned) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, rec = servers(Script(tls_options=tls))
    opts = ClientOptions(helo="relay.test", tls="none", timeouts=FAST)
    assert not (await within(deliver(reactor, tx(message), [target], opts))).tls
    assert "STARTTLS" not in rec.commands


@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered_or_refused_fails(servers, message, selfsigned) -> None:
    required = ClientOptions(helo="relay.test", tls="require", timeouts=FAST)
    target, rec = servers()
    result = await within(deliver(reactor, tx(message), [target], required))
    assert isinstance(result.error, TLSFailure) and "not offered" in str(result.error)
    assert result.outcome("rcpt@dest.test") == CHANNEL_FAILURE
    assert not any(c.startswith("MAIL") for c in rec.commands)
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, _ = servers(Script(tls_options=tls, starttls_reply="454 4.7.0 TLS not available"))
    with pytest.raises(TLSFailure, match="refused"):
        await within(SMTPConnection.connect(reactor, target, required))
    # Opportunistic: a refused STARTTLS continues in plain text.
    assert not (await within(deliver(reactor, tx(message), [target], OPTS))).tls


@pytest_twisted.ensureDeferred
async def test_failed_handshake_is_retried_in_plain_text_when_opportunistic(
    servers, message, selfsigned
) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, rec = servers(Script(tls_options=tls, tls_break=True))
    result = await within(deliver(reactor, tx(message), [target], OPTS))
    assert not result.tls and result.reply is not None and result.reply.code == 250
    assert "retry without TLS" in result.attempts[0] and rec.connections == 2
    required = ClientOptions(helo="relay.test", tls="require", timeouts=FAST)
    result = await within(deliver(reactor, tx(message), [target], required))
    assert isinstance(result.error, TLSFailure)


@pytest_twisted.ensureDeferred
async def test_data_after_starttls_reply_is_refused(servers, selfsigned) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    target, _ = servers(Script(tls_options=tls, tls_garbage=b"250 injected\r\n"))
    with pytest.raises(ProtocolError, match="after the STARTTLS"):
        await within(SMTPConnection.connect(reactor, target, OPTS))


@pytest_twisted.ensureDeferred
async def test_auth_plain_and_login_over_tls(servers, message, selfsigned) -> None:
    tls = load_certificate_options(str(selfsigned[0]), str(selfsigned[1]))
    for mechanisms in ("PLAIN LOGIN", "LOGIN"):
        target, rec = servers(
            Script(tls_options=tls, auth=("user", "secret"), auth_mechanisms=mechanisms)
        )
        opts = ClientOptions(helo="relay.test", auth=("user", "secret"), timeouts=FAST)
        conn = await within(SMTPConnection.connect(reactor, target, opts))
        assert conn.authenticated and conn.tls
        await within(conn.quit())
        bad = ClientOptions(helo="relay.test", auth=("user", "wrong"), timeouts=FAST)
        with pytest.raises(AuthFailure, match="535"):
            await within(SMTPConnection.connect(reactor, target, bad))


@pytest_twisted.ensureDeferred
async def test_auth_needs_tls_unless_allowed(servers) -> None:
    target, rec = servers(Script(auth=("user", "secret")))
    opts = ClientOptions(helo="relay.test", auth=("user", "secret"), timeouts=FAST)
    with pytest.raises(AuthFailure, match="without TLS"):
        await within(SMTPConnection.connect(reactor, target, opts))
    assert not any(c.startswith("AUTH") for c in rec.commands)
    plain_ok = ClientOptions(
        helo="relay.test", auth=("user", "secret"), auth_plaintext=True, timeouts=FAST
    )
    conn = await within(SMTPConnection.connect(reactor, target, plain_ok))
    assert conn.authenticated
    await within(conn.quit())
    target, _ = servers(Script(auth=("user", "secret"), auth_mechanisms="CRAM-MD5"))
    with pytest.raises(AuthFailure, match="no supported"):
        await within(SMTPConnection.connect(reactor, target, plain_ok))


@pytest_twisted.ensureDeferred
async def test_source_address_binding(servers, message) -> None:
    target, rec = servers()
    opts = ClientOptions(helo="relay.test", bind_address="127.0.0.2", timeouts=FAST)
    result = await within(deliver(reactor, tx(message), [target], opts))
    assert result.source_address == "127.0.0.2" and rec.peers == ["127.0.0.2"]
    unbindable = ClientOptions(helo="relay.test", bind_address="192.0.2.77", timeouts=FAST)
    result = await within(deliver(reactor, tx(message), [target], unbindable))
    assert isinstance(result.error, ConnectFailed) and "bind" in str(result.error)
    v6 = ClientOptions(helo="relay.test", bind_address="::1", timeouts=FAST)
    assert (await within(deliver(reactor, tx(message), [target], v6))).source_address == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_connection_reuse_for_three_messages(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor, idle_timeout=0.3)
    for i in range(3):
        result = await within(
            deliver(reactor, tx(message, f"r{i}@dest.test"), [target], OPTS, pool, "ch")
        )
        assert result.reply is not None and result.reply.code == 250
        assert result.reused == (i > 0)
    assert rec.connections == 1 and len(rec.messages) == 3
    # Each transaction ended with its final reply: no RSET is needed before the next MAIL.
    assert rec.commands.count("RSET") == 0 and "QUIT" not in rec.commands
    assert pool.count() == 1 and pool.count(("ch", "127.0.0.1", target.port)) == 1
    await until(lambda: "QUIT" in rec.commands)  # idle timeout
    assert pool.count() == 0


@pytest_twisted.ensureDeferred
async def test_pool_drops_sessions_the_server_closed(servers, message) -> None:
    target, rec = servers(Script(close_after_end=True))
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    result = await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert result.reply is not None and result.reply.code == 250 and not result.reused
    assert rec.connections == 2


@pytest_twisted.ensureDeferred
async def test_pool_retries_a_stale_session_once_with_a_fresh_one(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    conn = pool.idle[("ch", "127.0.0.1", target.port)][0][0]
    client, server = conn.protocol.transport, rec.protocols[0].transport
    client.pauseProducing()  # the client reads nothing...
    server.loseConnection()  # ...so when the server side goes away...
    await until(lambda: not server.connected)
    client.resumeProducing()
    assert conn.protocol.alive  # ...the client has not noticed yet
    conn.protocol.unsolicited.clear()
    pool.idle[("ch", "127.0.0.1", target.port)] = [(conn, reactor.callLater(10, lambda: None))]
    result = await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert result.reply is not None and result.reply.code == 250 and not result.reused
    assert rec.connections == 2
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_pool_does_not_keep_sessions_after_421_or_failed_rset(servers, message) -> None:
    target, rec = servers(Script(end_reply="421 4.3.2 shutting down"))
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert pool.count() == 0
    refused = {"rcpt@dest.test": "550 5.1.1 no such user"}
    target, rec = servers(Script(extensions=[], rset_reply="500 what", rcpt_replies=refused))
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert rec.commands[-2:] == ["RSET", "QUIT"]  # a transaction left open: RSET, refused
    assert pool.count() == 0
    target, rec = servers()
    limited = ConnectionPool(reactor, max_reuse=1)
    await within(deliver(reactor, tx(message), [target], OPTS, limited, "ch"))
    assert limited.count() == 0 and "RSET" not in rec.commands


@pytest_twisted.ensureDeferred
async def test_rset_only_after_a_transaction_left_open(servers, message) -> None:
    refused = {"gone@dest.test": "550 5.1.1 no such user"}
    target, rec = servers(Script(extensions=[], rcpt_replies=refused))  # no PIPELINING: no DATA
    pool = ConnectionPool(reactor)
    for rcpt in ("a@dest.test", "gone@dest.test", "b@dest.test", "c@dest.test"):
        await within(deliver(reactor, tx(message, rcpt), [target], OPTS, pool, "ch"))
    verbs = [c.split()[0] for c in rec.commands]
    ok, refused_rcpt = ["MAIL", "RCPT", "DATA"], ["MAIL", "RCPT"]
    assert verbs == ["EHLO", *ok, *refused_rcpt, "RSET", *ok, *ok]
    assert rec.connections == 1 and len(rec.messages) == 3
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_messages_per_session_are_limited(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor, max_reuse=3)
    for i in range(7):
        result = await within(
            deliver(reactor, tx(message, f"r{i}@dest.test"), [target], OPTS, pool, "ch")
        )
        assert result.reply is not None and result.reply.code == 250
    assert [p.mails for p in rec.protocols] == [3, 3, 1]
    assert len(rec.messages) == 7 and rec.commands.count("QUIT") == 2
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_sessions_older_than_the_reuse_time_are_not_reused(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor, max_age=0.2)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert pool.count() == 1
    await sleep(0.3)
    result = await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert result.reply is not None and result.reply.code == 250 and not result.reused
    assert rec.connections == 2 and [p.mails for p in rec.protocols] == [1, 1]
    await until(lambda: "QUIT" in rec.commands)  # the old one was closed when met
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_sessions_are_reused_only_for_the_same_identity(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor)
    other_helo = ClientOptions(helo="other.test", timeouts=FAST)
    for options in (OPTS, other_helo, OPTS, other_helo):
        await within(deliver(reactor, tx(message), [target], options, pool, "ch"))
    assert rec.connections == 2 and [p.mails for p in rec.protocols] == [2, 2]
    assert [c for c in rec.commands if c.startswith("EHLO")] == [
        "EHLO relay.test",
        "EHLO other.test",
    ]
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_server_closing_cached_sessions_loses_and_duplicates_nothing(
    servers, message
) -> None:
    """The server hangs up after every third message of a session; whether the client sees
    that while the session is cached or only when it sends MAIL, each message is delivered
    exactly once, on a fresh session, with no error reported."""
    target, rec = servers(Script(close_after_messages=3))
    pool = ConnectionPool(reactor)
    for i in range(10):
        rcpt = f"r{i}@dest.test"
        if i == 6:  # the client has not read the hang-up yet: found only at MAIL
            conn = pool.idle[("ch", "127.0.0.1", target.port)][0][0]
            conn.protocol.transport.pauseProducing()
            await until(lambda: not rec.protocols[-1].transport.connected)
            conn.protocol.transport.resumeProducing()
        result = await within(deliver(reactor, tx(message, rcpt), [target], OPTS, pool, "ch"))
        assert result.reply is not None and result.reply.code == 250, result.attempts
        assert result.error is None
        if i == 6:  # the stale session failed while MAIL was awaited, then a fresh one took it
            error = conn.protocol._error
            assert isinstance(error, ConnectionClosed) and error.stage == "mail"
            assert not result.reused
    rcpts = [c for c in rec.commands if c.startswith("RCPT")]
    assert sorted(rcpts) == sorted(f"RCPT TO:<r{i}@dest.test>" for i in range(10))
    assert len(rec.messages) == 10 and rec.connections == 4
    assert [p.messages for p in rec.protocols] == [3, 3, 3, 1]
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_421_to_mail_on_a_cached_session_is_retried_on_a_fresh_one(servers, message) -> None:
    target, rec = servers(Script(mail_421_after=2))
    pool = ConnectionPool(reactor)
    for i in range(5):
        result = await within(
            deliver(reactor, tx(message, f"r{i}@dest.test"), [target], OPTS, pool, "ch")
        )
        assert result.reply is not None and result.reply.code == 250, result.attempts
    assert len(rec.messages) == 5 and rec.connections == 3
    assert [p.messages for p in rec.protocols] == [2, 2, 1]
    await within(pool.close_all())


@pytest_twisted.ensureDeferred
async def test_lost_after_the_content_is_not_resent_on_a_fresh_session(servers, message) -> None:
    """A cached session lost after the message went out (no reply to the end of data) may
    have delivered it: the client reports the failure instead of sending it again."""
    target, rec = servers(Script(drop_before_end_reply_after=1))
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message, "first@dest.test"), [target], OPTS, pool, "ch"))
    result = await within(
        deliver(reactor, tx(message, "second@dest.test"), [target], OPTS, pool, "ch")
    )
    assert result.reused and result.error is not None and result.error.stage == "data-end"
    assert result.outcome("second@dest.test") == CHANNEL_FAILURE
    assert rec.connections == 1 and len(rec.messages) == 1 and len(rec.unanswered) == 1


@pytest_twisted.ensureDeferred
async def test_pool_close_all_quits_idle_sessions(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "ch"))
    assert pool.take(("other", "127.0.0.1", 1)) is None
    await within(pool.close_all())
    assert pool.count() == 0
    await until(lambda: "QUIT" in rec.commands)
    await within(pool.close_all())


# -- a real peer ----------------------------------------------------------------------------


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[Target, Path]]:
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(binary):
        pytest.fail("Postfix smtp-sink not installed (.ci/run installs it)")
    from mailgw.testing.server import free_port, wait_for_port

    # smtp-sink drops privileges (to nobody when run as root): pytest's tmp_path is not
    # reachable for it, so dump into a world-writable directory directly under /tmp.
    dumps = Path(tempfile.mkdtemp(prefix="mailgw-sink-"))
    dumps.chmod(0o777)
    port = free_port()
    args = [binary, "-d", f"{dumps}/%M.", f"127.0.0.1:{port}", "100"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(args)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield Target("sink.test", "127.0.0.1", port), dumps
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(dumps, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_delivery_to_postfix_smtp_sink_with_reuse(sink, message) -> None:
    target, dumps = sink
    pool = ConnectionPool(reactor)
    for i in range(3):
        result = await within(
            deliver(reactor, tx(message, f"r{i}@dest.test"), [target], OPTS, pool, "s")
        )
        assert result.reply is not None and result.reply.code == 250, result.attempts
        assert result.reused == (i > 0)
    await within(pool.close_all())
    await until(lambda: len(list(dumps.iterdir())) >= 3, timeout=5)
    dumped = sorted(p.read_bytes() for p in dumps.iterdir())
    assert len(dumped) == 3
    for raw in dumped:
        # smtp-sink removes the dot-stuffing and writes LF line ends.
        assert raw.endswith(
            b"Subject: test\n\n.starts with a dot\nbare LF line\nCRLF line\n"
            b"bare CR\n..two dots\nlast\n\n"
        )
        assert b"X-Helo-Args: relay.test" in raw


@pytest_twisted.ensureDeferred
async def test_421_to_rcpt_ends_the_transaction(servers, message) -> None:
    target, rec = servers(Script(extensions=[], rcpt_replies={"b@d.test": "421 4.3.2 closing"}))
    pool = ConnectionPool(reactor)
    result = await within(
        deliver(reactor, tx(message, "a@d.test", "b@d.test"), [target], OPTS, pool, "c")
    )
    assert result.reply == Reply(421, "4.3.2", "closing")
    assert {r.code for r in result.recipients.values()} == {421}
    assert "DATA" not in rec.commands and pool.count() == 0


@pytest_twisted.ensureDeferred
async def test_unsolicited_reply_makes_an_idle_session_unusable(servers, message) -> None:
    target, rec = servers()
    pool = ConnectionPool(reactor)
    await within(deliver(reactor, tx(message), [target], OPTS, pool, "c"))
    rec.protocols[0].send("421 4.4.2 idle too long")
    key = ("c", "127.0.0.1", target.port)
    await until(lambda: not pool.idle[key][0][0].alive)
    assert pool.take(key) is None


@pytest_twisted.ensureDeferred
async def test_connection_lost_during_data(servers, tmp_path) -> None:
    big = tmp_path / "big.eml"
    big.write_bytes(
        b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 8000
    )
    target, _ = servers(Script(extensions=[], close_on_data=True))
    result = await within(deliver(reactor, tx(big), [target], OPTS))
    assert result.error is not None and result.error.stage in ("data", "data-end")
    assert result.outcome("rcpt@dest.test") == CHANNEL_FAILURE
