"""SMTP protocol: framing, state machine, PIPELINING, DATA streaming, smuggling, STARTTLS."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailgw.model.reply import R
from mailgw.smtp.protocol import MAX_COMMAND_LINE, Role
from tests.smtp.fakes import Client, Harness

ENVELOPE = "EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"


def start_data(client: Client, envelope: str = ENVELOPE) -> None:
    assert client.codes(envelope) == ["250", "250", "250"]
    assert client.codes("DATA\r\n") == ["354"]


def body_of(content: bytes) -> bytes:
    """The message as the client sent it (without the Received header we added)."""
    assert content.startswith(b"Received: ")
    return content[content.index(b"\r\n", content.index(b"\r\n\tfor") + 2) + 2 :]


def test_full_transaction() -> None:
    h = Harness()
    c = h.connect()
    ehlo = c.send("EHLO client.test\r\n")
    assert ehlo == [
        "250-mx.example.test",
        f"250-SIZE {h.config.max_message_size}",
        "250-8BITMIME",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250 SMTPUTF8",
    ]
    assert c.send("MAIL FROM:<Sender@Remote.test>\r\n") == ["250 2.1.0 Sender OK"]
    assert c.send("RCPT TO:<Alice@Example.TEST>\r\n") == ["250 2.1.5 Recipient OK"]
    assert c.send("DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    body = b"Subject: hi\r\n\r\nline one\r\n..dot line\r\n.\r\n"
    assert c.send(body) == ["250 2.0.0 OK queued as Q0001"]
    assert len(h.messages) == 1
    env, content = h.messages[0]
    assert body_of(content) == b"Subject: hi\r\n\r\nline one\r\n.dot line\r\n"
    assert env.sender == "Sender@remote.test"
    assert env.recipients == ["Alice@example.test"]
    assert env.queue_id == "Q0001"
    assert env.client_address == "192.0.2.7"
    assert env.client_helo == "client.test"
    assert env.protocol == "ESMTP"
    assert env.size == len(content)
    assert env.received_at == h.clock.seconds()
    assert not env.body_8bitmime and not env.smtputf8
    # The session goes on: a second transaction, then QUIT.
    assert c.codes(ENVELOPE.split("\r\n", 1)[1] + "DATA\r\n") == ["250", "250", "354"]
    assert c.codes("x\r\n.\r\nQUIT\r\n") == ["250", "221"]
    assert c.closed
    assert len(h.messages) == 2


def test_transaction_fed_one_byte_at_a_time() -> None:
    h = Harness()
    c = h.connect()
    data = (ENVELOPE + "DATA\r\n.leading\r\n..\r\nend\r\n.\r\nQUIT\r\n").encode()
    out = []
    for i in range(len(data)):
        out += c.codes(data[i : i + 1])
    assert out == ["250", "250", "250", "354", "250", "221"]
    assert body_of(h.messages[0][1]) == b"leading\r\n.\r\nend\r\n"


def test_pipelining_in_one_packet() -> None:
    h = Harness()
    c = h.connect()
    packet = (
        "EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n"
        "RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert c.codes(packet) == ["250", "250", "550", "250", "250", "354"]
    assert c.codes("hello\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n") == ["250", "250", "250", "221"]
    env, _ = h.messages[0]
    assert env.recipients == ["alice@example.test", "bob@example.test"]


class SlowRole(Role):
    """A role whose RCPT and end-of-DATA answers come later (Deferreds)."""

    def __init__(self, spool: object) -> None:
        super().__init__(spool)  # type: ignore[arg-type]
        self.pending: list[defer.Deferred[object]] = []

    def rcpt_to(self, session, recipient):  # type: ignore[no-untyped-def]
        d: defer.Deferred[object] = defer.Deferred()
        self.pending.append(d)
        return d

    def data_end(self, session, incoming, envelope):  # type: ignore[no-untyped-def]
        d: defer.Deferred[object] = defer.Deferred()
        self.pending.append(d)
        return d


def test_pipelining_waits_for_deferred_policy_in_order() -> None:
    h = Harness()
    role = SlowRole(h.spool)
    h.factory.role = role
    c = h.connect()
    packet = (
        "EHLO c\r\nMAIL FROM:<s@r.test>\r\nRCPT TO:<a@example.test>\r\n"
        "RCPT TO:<b@example.test>\r\nDATA\r\n"
    )
    assert c.codes(packet) == ["250", "250"]
    assert c.transport.producerState == "paused"
    assert len(role.pending) == 1
    role.pending[0].callback(R.RECIPIENT_OK)
    assert c.codes(b"") == ["250"]
    assert len(role.pending) == 2
    role.pending[1].callback(R.UNKNOWN_USER)
    # DATA is only now read; the content follows the 354.
    assert c.codes(b"") == ["550", "354"]
    assert c.codes("body\r\n.\r\n") == []
    assert len(role.pending) == 3
    assert c.transport.producerState == "paused"
    role.pending[2].callback(R.OK)
    assert c.codes(b"") == ["250"]
    assert c.transport.producerState == "producing"
    assert h.messages[0][1] == b"body\r\n"  # the base Role adds no header
    assert h.messages[0][0].recipients == ["a@example.test"]


def test_policy_failure_and_exception_give_451_without_traceback() -> None:
    h = Harness()
    role = SlowRole(h.spool)
    h.factory.role = role
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\nRCPT TO:<a@example.test>\r\n") == [
        "250",
        "250",
    ]
    role.pending[0].errback(RuntimeError("directory exploded"))
    out = c.send(b"")
    assert out == ["451 4.3.0 Local error in processing, try again later"]

    def boom(session, recipient):  # type: ignore[no-untyped-def]
        raise ValueError("bug")

    role.rcpt_to = boom  # type: ignore[method-assign]
    assert c.send("RCPT TO:<a@example.test>\r\n") == [
        "451 4.3.0 Local error in processing, try again later"
    ]
    assert not c.closed
    assert c.codes("NOOP\r\n") == ["250"]


def test_deferred_firing_after_disconnect_is_ignored() -> None:
    h = Harness()
    role = SlowRole(h.spool)
    h.factory.role = role
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\nRCPT TO:<a@example.test>\r\n") == [
        "250",
        "250",
    ]
    c.protocol.connectionLost(None)  # type: ignore[arg-type]
    role.pending[0].callback(R.RECIPIENT_OK)
    assert c.send(b"NOOP\r\n") == []


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"]


@pytest.mark.parametrize("ending", SMUGGLING, ids=repr)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-packet", "byte-by-byte"])
def test_smuggling_variants_never_give_a_second_message(ending: bytes, chunked: bool) -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    payload = (
        b"Subject: first\r\n\r\nhello"
        + ending
        + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    if chunked:
        out = []
        for i in range(len(payload)):
            out += c.send(payload[i : i + 1])
    else:
        out = c.send(payload)
    assert out == ["521 5.5.2 Bare <CR> or <LF> received, closing connection"]
    assert c.closed
    assert h.messages == []
    assert h.spool.begun[0].aborted
    # Whatever follows on the dying connection is ignored.
    assert c.send(b"MAIL FROM:<x@y.test>\r\n") == []


@pytest.mark.parametrize(
    "body",
    [b"a\nb\r\n.\r\n", b"a\rb\r\n.\r\n", b"a\r\r\n.\r\n", b"\n.\r\n", b"abc\r"],
    ids=repr,
)
def test_bare_lf_or_cr_in_data_closes(body: bytes) -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    out = c.send(body)
    if body == b"abc\r":  # a CR at the end of a packet may still be a CRLF
        assert out == [] and not c.closed
        out = c.send(b"x\r\n.\r\n")
    assert out == ["521 5.5.2 Bare <CR> or <LF> received, closing connection"]
    assert c.closed and h.messages == []


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n"], ids=repr)
def test_bare_lf_or_cr_in_command_closes(line: bytes) -> None:
    c = Harness().connect()
    assert c.codes(line) == ["521"]
    assert c.closed


def test_overlong_command_line_is_an_error_and_session_continues() -> None:
    h = Harness()
    c = h.connect()
    longest = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(longest) == MAX_COMMAND_LINE
    assert c.codes(longest) == ["250"]
    too_long = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n"
    assert c.send(too_long) == ["500 5.5.6 Line too long"]
    # Arriving in pieces without a line end: answered once, rest discarded up to CRLF.
    assert c.send(b"MAIL FROM:<" + b"y" * 3000) == ["500 5.5.6 Line too long"]
    assert c.send(b"y" * 5000 + b"\r") == []
    assert c.codes(b"\nEHLO c\r\n") == ["250"]
    assert c.protocol._errors == 2


def test_overlong_data_line_stays_in_data_then_554() -> None:
    h = Harness(max_line_length=1000)
    c = h.connect()
    start_data(c)
    payload = (
        b"Subject: x\r\n\r\n"
        + b"A" * 5000
        + b"\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + b"more\r\n.\r\n"
    )
    assert c.send(payload) == ["554 5.6.0 Message has a line longer than 1000 bytes"]
    assert h.messages == [] and h.spool.begun[0].aborted
    # A normal transaction works in the same session.
    assert c.codes("MAIL FROM:<s@r.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    assert c.codes(b"B" * 1000 + b"\r\n.\r\n") == ["250"]
    assert len(h.messages) == 1


def test_overlong_data_line_in_chunks_keeps_memory_bounded() -> None:
    h = Harness(max_line_length=1000)
    c = h.connect()
    start_data(c)
    for _ in range(200):
        assert c.send(b"Z" * 999) == []
        assert len(c.protocol._buf) <= 1001
    # The overlong line ends, then a line that looks like the end of data (it is not:
    # the terminator must follow a CRLF), then the real end.
    assert c.send(b"\r") == []
    assert c.send(b"\n.\r\n") == ["554 5.6.0 Message has a line longer than 1000 bytes"]
    assert c.codes("NOOP\r\n") == ["250"]


def test_declared_size_too_large_and_mail_parameters() -> None:
    h = Harness(max_message_size=1000)
    c = h.connect()
    assert c.codes("EHLO c\r\n") == ["250"]
    assert c.send("MAIL FROM:<s@r.test> SIZE=1001\r\n") == [
        "552 5.3.4 Message size exceeds fixed limit"
    ]
    assert c.codes("MAIL FROM:<s@r.test> SIZE=abc\r\n") == ["501"]
    assert c.codes("MAIL FROM:<s@r.test> BODY=BINARYMIME\r\n") == ["501"]
    assert c.codes("MAIL FROM:<s@r.test> SMTPUTF8=yes\r\n") == ["501"]
    assert c.send("MAIL FROM:<s@r.test> RET=HDRS\r\n") == [
        "555 5.5.4 MAIL/RCPT parameter not recognized or not implemented"
    ]
    assert c.codes("MAIL FROM:<s@r.test> SIZE=1000 BODY=8BITMIME\r\n") == ["250"]
    assert c.codes("RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n") == ["555"]
    assert c.exchange("RCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n") == ["250", "354", "250"]
    assert h.messages[0][0].body_8bitmime


def test_parameters_after_helo_are_not_recognized() -> None:
    c = Harness().connect()
    assert c.send("HELO c\r\n") == ["250 mx.example.test"]
    assert c.codes("MAIL FROM:<s@r.test> BODY=8BITMIME\r\n") == ["555"]
    assert c.codes("MAIL FROM:<s@r.test>\r\nRCPT TO:<alice@example.test>\r\n") == ["250", "250"]


def test_actual_size_over_limit_50mb_with_25mb_limit() -> None:
    h = Harness(max_message_size=25 * 1024 * 1024, keep_content=False)
    c = h.connect()
    start_data(c)
    line = b"x" * 998 + b"\r\n"
    chunk = line * 64  # 64000 bytes
    sent = 0
    while sent < 50 * 1024 * 1024:
        assert c.send(chunk) == []
        assert len(c.protocol._buf) <= h.config.max_line_length + 1
        sent += len(chunk)
    incoming = h.spool.begun[0]
    assert incoming.aborted
    assert incoming.size <= 25 * 1024 * 1024 + 2048
    assert h.spool.largest_write <= len(chunk)
    assert c.send(b".\r\n") == ["552 5.3.4 Message size exceeds fixed limit"]
    assert h.messages == []
    # The server keeps serving: another message in the same session.
    assert c.codes("MAIL FROM:<s@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    assert c.codes("small\r\n.\r\n") == ["250"]
    assert len(h.messages) == 1


def test_nul_byte_rejected_at_end_of_data() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    assert c.send(b"Subject: a\x00b\r\n") == []
    assert c.send(b"more\r\n.\r\n") == ["554 5.6.0 Message contains NUL bytes"]
    assert h.messages == []
    assert c.codes("MAIL FROM:<s@r.test>\r\n") == ["250"]


def test_zero_byte_body() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    assert c.codes(b".\r\n") == ["250"]
    env, content = h.messages[0]
    assert body_of(content) == b""
    assert content.startswith(b"Received: from client.test (unknown [192.0.2.7])\r\n")


def test_malformed_mime_and_8bit_headers_accepted_as_bytes() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    raw = (
        b"Subject: \xe4\xbd\xa0\xe5\xa5\xbd \xff\xfe broken\r\n"
        b"Content-Type: multipart/mixed; boundary=\r\n"
        b"MIME-Version: 1.0\r\n\r\n--nonexistent\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!not base64!!!\r\n--\r\n"
    )
    assert c.codes(raw + b".\r\n") == ["250"]
    env, content = h.messages[0]
    assert body_of(content) == raw
    assert env.body_8bitmime  # 8-bit seen without BODY=8BITMIME: accepted, noted


def test_data_line_starting_with_dot_split_across_packets() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    assert c.send(b"a\r\n.") == []
    assert c.send(b".b\r\n.") == []
    assert c.send(b"\r") == []
    assert c.codes(b"\n") == ["250"]
    assert body_of(h.messages[0][1]) == b"a\r\n.b\r\n"


def test_commit_failure_gives_451_and_session_continues() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    h.spool.fail_commit = True
    assert c.send(b"hello\r\n.\r\n") == ["451 4.3.0 Local error in processing, try again later"]
    assert h.spool.begun[0].aborted
    h.spool.fail_commit = False
    assert c.codes("MAIL FROM:<s@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    assert c.codes(b"again\r\n.\r\n") == ["250"]
    assert len(h.messages) == 1


def test_250_waits_for_the_commit_and_input_pauses_meanwhile() -> None:
    h = Harness()
    h.spool.hold_commits = True
    c = h.connect()
    start_data(c)
    # the end of data and a pipelined command arrive together
    assert c.send(b"hello\r\n.\r\nNOOP\r\n") == []
    assert c.transport.producerState == "paused"
    assert h.messages == []
    h.spool.release()
    assert c.lines() == ["250 2.0.0 OK queued as Q0001", "250 2.0.0 OK"]
    assert c.transport.producerState == "producing"
    assert len(h.messages) == 1


def test_commit_failing_later_gives_451_and_session_continues() -> None:
    h = Harness()
    h.spool.hold_commits = True
    c = h.connect()
    start_data(c)
    assert c.send(b"hello\r\n.\r\n") == []
    h.spool.release(fail=True)
    assert c.lines() == ["451 4.3.0 Local error in processing, try again later"]
    assert h.messages == []
    assert c.codes("NOOP\r\n") == ["250"]


def test_connection_lost_during_commit_does_not_abort_the_message() -> None:
    h = Harness()
    h.spool.hold_commits = True
    c = h.connect()
    start_data(c)
    c.send(b"hello\r\n.\r\n")
    c.protocol.connectionLost()
    assert not h.spool.begun[0].aborted
    h.spool.release()
    assert len(h.messages) == 1  # queued: the client may send it again (a duplicate, no loss)
    assert c.output() == ""


def test_write_error_during_data_gives_451_at_the_end() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    h.spool.fail_write = True
    assert c.send(b"line one\r\n") == []
    assert h.spool.begun[0].aborted
    h.spool.fail_write = False
    assert c.codes(b"line two\r\n.\r\n") == ["451"]
    assert h.messages == []
    assert c.codes("NOOP\r\n") == ["250"]


def test_begin_failure_gives_451() -> None:
    h = Harness()
    c = h.connect()
    h.spool.fail_begin = True
    assert c.codes(ENVELOPE + "DATA\r\n") == ["250", "250", "250", "451"]
    # Not in DATA mode: the next line is a command.
    assert c.codes("NOOP\r\n") == ["250"]


def test_rejection_by_data_end_hook_aborts() -> None:
    h = Harness()
    role = SlowRole(h.spool)
    role.rcpt_to = lambda session, rcpt: R.RECIPIENT_OK  # type: ignore[method-assign,assignment]
    h.factory.role = role
    c = h.connect()
    start_data(c)
    assert c.send(b"virus\r\n.\r\n") == []
    role.pending[0].callback(R.TRANSACTION_FAILED)
    assert c.codes(b"") == ["554"]
    assert h.messages == [] and h.spool.begun[0].aborted


def test_sequence_errors() -> None:
    c = Harness().connect()
    assert c.send("MAIL FROM:<s@r.test>\r\n") == ["503 5.5.1 Send HELO/EHLO first"]
    assert c.codes("EHLO c\r\n") == ["250"]
    assert c.send("RCPT TO:<alice@example.test>\r\n") == ["503 5.5.1 Need MAIL before RCPT"]
    assert c.codes("DATA\r\n") == ["503"]
    assert c.codes("MAIL FROM:<s@r.test>\r\n") == ["250"]
    assert c.send("MAIL FROM:<s@r.test>\r\n") == ["503 5.5.1 Sender already specified"]
    assert c.send("DATA\r\n") == ["503 5.5.1 Need RCPT before DATA"]
    assert c.codes("RSET\r\nRCPT TO:<alice@example.test>\r\n") == ["250", "503"]


def test_syntax_errors() -> None:
    c = Harness(max_errors=50, soft_error_limit=50).connect()
    assert c.codes("EHLO\r\n") == ["501"]
    assert c.codes("EHLO c\r\n") == ["250"]
    assert c.send("MAIL <s@r.test>\r\n") == ["501 5.5.4 Syntax error in parameters or arguments"]
    assert c.send("MAIL FROM:s@r.test\r\n") == ["501 5.1.7 Bad sender address syntax"]
    assert c.codes("MAIL FROM:<s@r.test\r\n") == ["501"]
    assert c.codes("MAIL FROM:<s@r.test>junk\r\n") == ["501"]
    assert c.codes("MAIL FROM:<a b@r.test>\r\n") == ["501"]
    assert c.codes("MAIL FROM: <s@r.test>\r\n") == ["250"]
    assert c.codes("RCPT alice@example.test\r\n") == ["501"]
    assert c.send("RCPT TO:alice@example.test\r\n") == ["501 5.1.3 Bad recipient address syntax"]
    assert c.send("RCPT TO:<>\r\n") == ["501 5.1.3 Bad recipient address syntax"]
    assert c.codes("DATA now\r\nRSET x\r\nQUIT now\r\n") == ["501", "501", "501"]


def test_misc_commands() -> None:
    c = Harness().connect()
    assert c.send("VRFY alice\r\n") == [
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    ]
    assert c.codes("VRFY\r\n") == ["501"]
    assert c.codes("EXPN list\r\n") == ["502"]
    assert c.codes("HELP\r\n") == ["214"]
    assert c.codes("noop whatever\r\n") == ["250"]
    assert c.send("FOO bar\r\n") == ["500 5.5.2 Syntax error, command unrecognized"]
    assert c.codes(b"NOOP \xff\xfe\r\n") == ["500"]
    assert c.send("QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert c.closed


def test_unknown_command_hook_of_role() -> None:
    h = Harness()

    def xclient(session, verb, argument):  # type: ignore[no-untyped-def]
        return R.OK if verb == "XTEST" else None

    h.factory.role.unknown_command = xclient  # type: ignore[method-assign]
    c = h.connect()
    assert c.codes("XTEST 1\r\nXOTHER\r\n") == ["250", "500"]


def test_smtputf8() -> None:
    h = Harness()
    c = h.connect()
    assert c.codes("EHLO c\r\n") == ["250"]
    assert c.send("MAIL FROM:<jöran@r.test>\r\n") == [
        "553 5.6.7 SMTPUTF8 address requires the SMTPUTF8 parameter"
    ]
    assert c.codes("MAIL FROM:<jöran@r.test> SMTPUTF8\r\n") == ["250"]
    assert c.exchange("RCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n") == ["250", "354", "250"]
    env, content = h.messages[0]
    assert env.smtputf8 and env.sender == "jöran@r.test"
    assert env.protocol == "UTF8SMTP"
    assert b"with UTF8SMTP id" in content
    assert c.codes("MAIL FROM:<s@r.test>\r\nRCPT TO:<jöran@example.test>\r\n") == ["250", "553"]


def test_max_errors_closes_session() -> None:
    h = Harness(max_errors=3)
    c = h.connect()
    assert c.codes("FOO\r\nBAR\r\n") == ["500", "500"]
    assert not c.closed
    out = c.send("RCPT TO:<a@b.test>\r\nNOOP\r\n")
    assert out == [
        "503 5.5.1 Need MAIL before RCPT",
        "421 4.7.0 Too many errors, closing connection",
    ]
    assert c.closed


def test_idle_timeout() -> None:
    h = Harness(idle_timeout=60.0)
    c = h.connect()
    h.clock.advance(59)
    assert c.codes("NOOP\r\n") == ["250"]
    h.clock.advance(59)
    assert not c.closed
    h.clock.advance(2)
    assert c.lines() == ["421 4.4.2 Idle timeout, closing connection"]
    assert c.closed
    assert not h.clock.getDelayedCalls()


def test_idle_timeout_during_data_aborts_message() -> None:
    h = Harness(idle_timeout=60.0)
    c = h.connect()
    start_data(c)
    assert c.send(b"partial\r\n") == []
    h.clock.advance(61)
    assert c.codes(b"") == ["421"]
    assert h.spool.begun[0].aborted and h.messages == []


def test_session_timeout() -> None:
    h = Harness(idle_timeout=60.0, session_timeout=100.0)
    c = h.connect()
    for _ in range(3):
        h.clock.advance(30)
        assert c.codes("NOOP\r\n") == ["250"]
    h.clock.advance(11)
    assert c.lines() == ["421 4.4.2 Session time limit exceeded, closing connection"]
    assert c.closed
    c.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert h.factory.counter.total == 0


# -- STARTTLS --------------------------------------------------------------------------------


def test_starttls_not_offered_without_tls_options() -> None:
    c = Harness().connect()
    assert "250-STARTTLS" not in c.send("EHLO c\r\n")
    assert c.send("STARTTLS\r\n") == ["502 5.5.1 Command not implemented"]
    assert c.transport.tls_started == []  # type: ignore[attr-defined]


def test_starttls_discards_pipelined_commands_and_resets_session() -> None:
    options = object()
    h = Harness(tls_options=options)
    c = h.connect()
    ehlo = c.send("EHLO c\r\n")
    assert "250-STARTTLS" in ehlo or "250 STARTTLS" in ehlo
    assert c.send("STARTTLS extra\r\n") == ["501 5.5.4 Syntax error in parameters or arguments"]
    out = c.send("STARTTLS\r\nMAIL FROM:<evil@r.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert out == ["220 2.0.0 Ready to start TLS"]
    assert c.transport.tls_started == [options]  # type: ignore[attr-defined]
    assert c.protocol.session.tls and c.protocol.session.helo is None
    # The injected commands were not executed: EHLO is required again.
    assert c.send("MAIL FROM:<s@r.test>\r\n") == ["503 5.5.1 Send HELO/EHLO first"]
    ehlo = c.send("EHLO c\r\n")
    assert not any("STARTTLS" in line for line in ehlo)
    assert c.send("STARTTLS\r\n") == ["503 5.5.1 TLS already active"]
    assert c.exchange(ENVELOPE + "DATA\r\nx\r\n.\r\n") == ["250", "250", "250", "354", "250"]
    env, content = h.messages[0]
    assert env.protocol == "ESMTPS"
    assert b"with ESMTPS id" in content


def test_starttls_refused_during_transaction() -> None:
    c = Harness(tls_options=object()).connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\n") == ["250", "250"]
    assert c.send("STARTTLS\r\n") == ["503 5.5.1 MAIL transaction in progress"]


def test_starttls_transport_failure_closes() -> None:
    c = Harness(tls_options=object()).connect()

    def broken(options, normal=True):  # type: ignore[no-untyped-def]
        raise RuntimeError("no TLS here")

    c.transport.startTLS = broken  # type: ignore[attr-defined]
    assert c.codes("EHLO c\r\nSTARTTLS\r\n") == ["250", "220"]
    assert c.closed


def test_connection_lost_mid_data_aborts_and_uncounts() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)
    assert c.send(b"partial\r\n") == []
    c.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert h.spool.begun[0].aborted
    assert h.factory.counter.total == 0 and h.factory.counter.per_ip == {}
    assert not h.clock.getDelayedCalls()


class PickyRole(Role):
    """A role refusing at each stage when told to, answering RCPT with fired Deferreds."""

    def __init__(self, spool: object) -> None:
        super().__init__(spool)  # type: ignore[arg-type]
        self.refuse: set[str] = set()
        self.committed: list[str] = []

    def extensions(self, session):  # type: ignore[no-untyped-def]
        return ["XPICKY"]

    def helo(self, session, name):  # type: ignore[no-untyped-def]
        return R.TRANSACTION_FAILED if "helo" in self.refuse else R.OK

    def mail_from(self, session, sender):  # type: ignore[no-untyped-def]
        return R.RELAY_DENIED if "mail" in self.refuse else R.SENDER_OK

    def rcpt_to(self, session, recipient):  # type: ignore[no-untyped-def]
        return defer.succeed(R.RECIPIENT_OK)

    def data_start(self, session):  # type: ignore[no-untyped-def]
        return R.TRANSACTION_FAILED if "data" in self.refuse else R.START_DATA

    def message_committed(self, session, envelope):  # type: ignore[no-untyped-def]
        self.committed.append(envelope.queue_id)
        if "committed" in self.refuse:
            raise RuntimeError("counter broken")


def test_role_refusals_at_each_stage() -> None:
    h = Harness()
    role = PickyRole(h.spool)
    h.factory.role = role
    c = h.connect()
    role.refuse = {"helo"}
    assert c.codes("EHLO c\r\n") == ["554"]
    assert c.protocol.session.helo is None
    role.refuse = {"mail"}
    assert c.send("EHLO c\r\n")[-1] == "250 XPICKY"
    assert c.codes("MAIL FROM:<s@r.test> BODY=8BITMIME\r\n") == ["550"]
    assert not c.protocol.session.has_sender and not c.protocol.session.body_8bitmime
    role.refuse = {"data"}
    packet = "MAIL FROM:<s@r.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    assert c.codes(packet) == ["250", "250", "250", "554"]
    assert h.spool.begun == []
    role.refuse = {"committed"}
    assert c.exchange("DATA\r\nx\r\n.\r\n") == ["354", "250"]
    assert role.committed == ["Q0001"] and len(h.messages) == 1


def test_abort_failure_is_logged_not_raised() -> None:
    h = Harness()
    c = h.connect()
    start_data(c)

    def broken_abort() -> None:
        raise OSError(5, "I/O error")

    h.spool.begun[0].abort = broken_abort  # type: ignore[method-assign]
    assert c.codes(b"\x00\r\n.\r\n") == ["554"]
    assert c.codes("NOOP\r\n") == ["250"]


def test_log_lines_name_session_queue_id_sender_recipients_and_rejections() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()
        c = h.connect()
        assert c.exchange(ENVELOPE + "RCPT TO:<nobody@example.test>\r\nDATA\r\nhi\r\n.\r\n") == [
            "250",
            "250",
            "250",
            "550",
            "354",
            "250",
        ]
        c.protocol.connectionLost()
        other = h.connect()
        other.protocol.connectionLost()
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = [formatEvent(e) for e in events]
    sid = c.protocol.session.session_id
    # one line per accepted message, none for connecting or for leaving after a message
    assert not any(t.startswith((f"{sid} connect", f"{sid} disconnect")) for t in text)
    assert text[-1] == (
        f"{other.protocol.session.session_id} disconnect from 192.0.2.7 without a message"
    )
    assert any(
        t.startswith(f"{sid} Q0001: accepted from=<sender@remote.test> to=<alice@example.test>")
        and "size=" in t
        for t in text
    )
    assert f"{sid} 192.0.2.7 RCPT rejected: 550 5.1.1 Recipient address rejected: user unknown" in (
        text
    )
    assert not any("Unable to format" in t for t in text)


# -- RFC 2920 3.1: content sent before the 354 ----------------------------------------------


def test_content_in_the_same_write_as_data_is_refused_and_the_session_closed() -> None:
    """Postfix (reject_unauth_pipelining) answers ``503 5.5.0`` then ``221 2.7.0`` and
    hangs up; the content is neither a message nor commands."""
    h = Harness()
    c = h.connect()
    assert c.codes(ENVELOPE) == ["250", "250", "250"]
    out = c.send("DATA\r\nSubject: x\r\n\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n.\r\n")
    assert out == [
        "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining",
        "221 2.7.0 Error: improper pipelining, closing connection",
    ]
    assert c.closed
    assert h.messages == [] and h.spool.begun == []  # no message was even begun


def test_content_pipelined_behind_the_whole_envelope_is_refused() -> None:
    c = Harness().connect()
    out = c.codes(ENVELOPE + "DATA\r\nhello\r\n.\r\n")
    assert out == ["250", "250", "250", "503", "221"]
    assert c.closed


def test_content_arriving_while_data_waits_for_the_role_is_refused() -> None:
    h = Harness()
    pending: list[defer.Deferred[object]] = []

    def data_start(session):  # type: ignore[no-untyped-def]
        d: defer.Deferred[object] = defer.Deferred()
        pending.append(d)
        return d

    h.factory.role.data_start = data_start  # type: ignore[method-assign]
    c = h.connect()
    assert c.codes(ENVELOPE + "DATA\r\n") == ["250", "250", "250"]
    c.protocol.dataReceived(b"early\r\n.\r\n")  # the transport was paused; a buffered read
    pending[0].callback(R.START_DATA)
    assert c.codes(b"") == ["503", "221"]
    assert h.messages == []


def test_content_after_the_354_is_a_message() -> None:
    h = Harness()
    c = h.connect()
    assert c.codes(ENVELOPE + "DATA\r\n") == ["250", "250", "250", "354"]
    assert c.codes("hello\r\n.\r\nQUIT\r\n") == ["250", "221"]
    assert body_of(h.messages[0][1]) == b"hello\r\n"


# -- error limits (Postfix smtpd_soft_error_limit / hard_error_limit / error_sleep_time) ----


def test_unknown_recipients_count_as_errors_slow_down_then_close() -> None:
    h = Harness(soft_error_limit=3, max_errors=6, error_delay=2.0)
    c = h.connect()
    guesses = "".join(f"RCPT TO:<guess{i}@example.test>\r\n" for i in range(10))
    out = c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\n" + guesses)
    assert out == ["250", "250", "550", "550", "550"]  # three errors: no delay yet
    assert c.transport.producerState == "paused"
    h.clock.advance(1.9)
    assert c.codes(b"") == []
    h.clock.advance(0.1)
    assert c.codes(b"") == ["550"]  # the 4th guess, two seconds late
    h.clock.advance(2.0)
    assert c.codes(b"") == ["550"]
    assert not c.closed
    h.clock.advance(2.0)
    assert c.send(b"") == ["550 5.1.1 Recipient address rejected: user unknown"]
    assert not c.closed
    h.clock.advance(2.0)  # the 421 is slowed down too (Postfix sleeps before it as well)
    assert c.send(b"") == ["421 4.7.0 Too many errors, closing connection"]
    assert c.closed
    assert not h.clock.getDelayedCalls()


def test_every_reply_is_delayed_past_the_soft_limit_and_relay_refusals_count() -> None:
    h = Harness(soft_error_limit=2, max_errors=20, error_delay=1.0)
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\n") == ["250", "250"]
    assert c.codes("RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<y@elsewhere.test>\r\n") == [
        "550",
        "550",
    ]
    assert c.codes("NOOP\r\n") == []  # a good command is slowed down too
    h.clock.advance(1.0)
    assert c.codes(b"") == ["250"]


def test_a_queued_message_resets_the_error_count() -> None:
    h = Harness(soft_error_limit=2, max_errors=3, error_delay=1.0)
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\nRCPT TO:<nobody@example.test>\r\n") == [
        "250",
        "250",
        "550",
    ]
    assert c.codes("RCPT TO:<alice@example.test>\r\nDATA\r\n") == ["250", "354"]
    assert c.codes("x\r\n.\r\n") == ["250"]
    out = c.codes(
        "MAIL FROM:<s@r.test>\r\nRCPT TO:<n1@example.test>\r\nRCPT TO:<n2@example.test>\r\n"
    )
    assert out == ["250", "550", "550"]  # would have been delayed and closed without the reset
    assert not c.closed


def test_temporary_replies_do_not_count() -> None:
    h = Harness(soft_error_limit=1, max_errors=2, max_recipients=1)
    c = h.connect()
    assert c.codes("EHLO c\r\nMAIL FROM:<s@r.test>\r\nRCPT TO:<alice@example.test>\r\n") == [
        "250",
        "250",
        "250",
    ]
    assert c.codes("RCPT TO:<bob@example.test>\r\n" * 3) == ["452", "452", "452"]
    assert not c.closed
