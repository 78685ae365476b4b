"""End to end against the real server: smuggling, injection, relay tricks, huge and odd input."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mailgw.testing.server import REPO, TWISTD, MailgwServer, free_port
from tests.integration.helpers import Session, mailbox_files, wait_until


def envelope(session: Session) -> None:
    assert session.command(b"EHLO client.test").startswith(b"250")
    assert session.command(b"MAIL FROM:<bob@elsewhere.test>").startswith(b"250")
    assert session.command(b"RCPT TO:<alice@example.test>").startswith(b"250")
    assert session.command(b"DATA").startswith(b"354")


SMUGGLING_ENDINGS = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=[repr(e) for e in SMUGGLING_ENDINGS])
def test_smuggling_never_yields_a_second_message(server: MailgwServer, ending: bytes) -> None:
    session = Session(server.ports["mx"])
    envelope(session)
    smuggled = (
        b"Subject: outer\r\n\r\nouter body"
        + ending
        + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    session.send(smuggled + b"QUIT\r\n")
    reply = session.reply()
    assert reply.startswith(b"521 5.5.2"), reply
    assert session.closed()
    session.close()
    # The connection is closed and nothing was accepted: no message at all, certainly not two.
    time.sleep(0.5)
    assert mailbox_files(server, "bob") == []
    assert mailbox_files(server) == []


def test_overlong_line_in_data_stays_in_data(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"mx": {"max_line_length": "1000"}})
    session = Session(server.ports["mx"])
    envelope(session)
    session.send(
        b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n.\r\n"
    )
    assert session.reply().startswith(b"554 5.6.0")
    # Same session still works, in command mode, with a fresh transaction.
    envelope(session)
    session.send(b"Subject: fine\r\n\r\nshort\r\n.\r\n")
    assert session.reply().startswith(b"250 2.0.0")
    session.command(b"QUIT")
    files = wait_until(lambda: mailbox_files(server), what="delivery")
    assert len(files) == 1 and b"Subject: fine" in files[0].read_bytes()


def test_starttls_discards_pipelined_plaintext(tls_server: MailgwServer) -> None:
    session = Session(tls_server.ports["mx"])
    assert session.command(b"EHLO client.test").startswith(b"250")
    session.send(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert session.reply().startswith(b"220")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(session.sock, server_hostname="localhost")
    session.sock = tls
    # The injected MAIL was not executed and EHLO state was reset: RCPT is out of sequence.
    reply = session.command(b"RCPT TO:<alice@example.test>")
    assert reply.startswith(b"503"), reply
    assert session.command(b"MAIL FROM:<bob@elsewhere.test>").startswith(b"503")  # EHLO first
    assert session.command(b"EHLO client.test").startswith(b"250")
    assert session.command(b"QUIT").startswith(b"221")


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("<user%elsewhere.test@example.test>", b"550 5.1.1"),
        ('<"user@elsewhere.test"@example.test>', b"550 5.1.1"),
        ("<user@elsewhere.test@example.test>", b"501 5.1.3"),
        ("<@example.test:user@elsewhere.test>", b"550 5.7.1"),
        ("<elsewhere.test!user@example.test>", b"550 5.1.1"),
        ('<"user@elsewhere.test">', b"501 5.1.3"),
        ("<user@elsewhere.test>", b"550 5.7.1"),
        ("<nobody@example.test>", b"550 5.1.1"),
    ],
)
def test_open_relay_tricks_are_refused(server: MailgwServer, rcpt: str, code: bytes) -> None:
    session = Session(server.ports["mx"])
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<bob@elsewhere.test>")
    reply = session.command(b"RCPT TO:" + rcpt.encode())
    assert reply.startswith(code), reply
    session.command(b"QUIT")


def test_relay_refused_with_swaks(server: MailgwServer) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.ports['mx']}", "--to", "someone@elsewhere.test"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "550 5.7.1" in result.stdout
    assert result.returncode != 0


def test_odd_messages_are_accepted_as_bytes(server: MailgwServer) -> None:
    bodies = [
        b"",  # 0-byte body
        b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n--never-closed\r\nhalf',
        b"Subject: \xff\xfe raw 8-bit \xe4\xb8\xad\xe6\x96\x87\r\nFrom: \xc3\xa9@x\r\n\r\nbody\r\n",
        b'Content-Type: text/plain; charset="\r\n\r\n=?bad?=',
    ]
    for body in bodies:
        session = Session(server.ports["mx"])
        envelope(session)
        session.send(body + (b"\r\n" if body and not body.endswith(b"\r\n") else b"") + b".\r\n")
        assert session.reply().startswith(b"250 2.0.0")
        session.command(b"QUIT")
        session.close()
    wait_until(lambda: len(mailbox_files(server)) == len(bodies), what="all delivered")


def test_nul_byte_is_refused_and_server_keeps_serving(server: MailgwServer) -> None:
    session = Session(server.ports["mx"])
    envelope(session)
    session.send(b"Subject: nul\r\n\r\na\x00b\r\n.\r\n")
    assert session.reply().startswith(b"554 5.6.0")
    envelope(session)
    session.send(b"Subject: ok\r\n\r\nok\r\n.\r\n")
    assert session.reply().startswith(b"250")
    session.close()


def test_50mb_message_over_25mb_limit(server: MailgwServer) -> None:
    session = Session(server.ports["mx"])
    ehlo = session.command(b"EHLO client.test")
    assert b"SIZE 26214400" in ehlo
    # Declared size over the limit is refused at MAIL.
    assert session.command(b"MAIL FROM:<bob@elsewhere.test> SIZE=52428800").startswith(b"552 5.3.4")
    # Undeclared: the whole 50 MB is read and refused at the end; the session goes on.
    session.command(b"MAIL FROM:<bob@elsewhere.test>")
    session.command(b"RCPT TO:<alice@example.test>")
    assert session.command(b"DATA").startswith(b"354")
    line = b"y" * 998 + b"\r\n"
    chunk = line * 1024  # ~1 MB
    other = Session(server.ports["mx"])  # another client is served meanwhile
    for i in range(50):
        session.send(chunk)
        if i == 25:
            assert other.command(b"NOOP").startswith(b"250")
    session.send(b".\r\n")
    assert session.reply().startswith(b"552 5.3.4")
    assert session.command(b"RSET").startswith(b"250")
    other.close()
    session.close()
    assert mailbox_files(server) == []


def test_pipelined_transaction(server: MailgwServer) -> None:
    session = Session(server.ports["mx"])
    assert b"PIPELINING" in session.command(b"EHLO client.test")
    session.send(
        b"MAIL FROM:<bob@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\nDATA\r\n"
    )
    replies = [session.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"354"]
    session.send(b"Subject: p\r\n\r\npipelined\r\n.\r\nQUIT\r\n")
    assert session.reply().startswith(b"250")
    assert session.reply().startswith(b"221")
    wait_until(lambda: mailbox_files(server), what="delivery")


def test_proxy_protocol_listener(server_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server = server_factory({"mx": {"listen": f"haproxy:tcp:{port}:interface=127.0.0.1"}})
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(100)  # no greeting before the PROXY header
    sock.settimeout(10)
    sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n")
    session = Session.__new__(Session)
    session.sock, session.buffer = sock, b""
    assert session.reply().startswith(b"220")
    envelope(session)
    session.send(b"Subject: proxied\r\n\r\nvia haproxy\r\n.\r\n")
    assert session.reply().startswith(b"250")
    files = wait_until(lambda: mailbox_files(server), what="delivery")
    assert b"[203.0.113.9]" in files[0].read_bytes()


def test_quota_defers_then_delivers_when_raised(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"delivery": {"retry_interval": "1s"}})
    server.cli("user", "quota", "bob@example.test", "1K")
    smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"])
    smtp.sendmail(
        "x@elsewhere.test", ["bob@example.test"], "Subject: big\r\n\r\n" + "z" * 4000 + "\r\n"
    )
    smtp.quit()
    wait_until(lambda: list((server.data_dir / "spool" / "deferred").iterdir()), what="deferred")
    assert mailbox_files(server, "bob") == []
    server.cli("user", "quota", "bob@example.test", "1M")
    wait_until(lambda: mailbox_files(server, "bob"), what="delivery after quota raised")
    assert not list((server.data_dir / "spool" / "deferred").iterdir())


def test_kill_9_while_sending_loses_no_acknowledged_message(server: MailgwServer) -> None:
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=5)
                while not stop.is_set():
                    token = f"w{worker}-m{n}"
                    smtp.sendmail(
                        "bob@elsewhere.test",
                        ["alice@example.test"],
                        f"Subject: {token}\r\nX-Token: {token}\r\n\r\n{'q' * 3000}\r\n",
                    )
                    with lock:
                        acknowledged.append(token)
                    n += 1
            except (OSError, smtplib.SMTPException):
                return

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 200, timeout=60, what="200 acknowledged messages")
    server.kill9()
    stop.set()
    for t in threads:
        t.join(10)
    acked = set(acknowledged)
    server.start()

    def delivered() -> set[str]:
        tokens = set()
        for f in mailbox_files(server):
            for line in f.read_bytes().split(b"\r\n"):
                if line.startswith(b"X-Token: "):
                    tokens.add(line[9:].decode())
                    break
        return tokens

    wait_until(
        lambda: acked <= delivered(), timeout=60, what="every acknowledged message delivered"
    )


def run_twistd(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "--pidfile=", "-n", "mailgw", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_bad_config_stops_startup_with_file_section_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.ini"
    config.write_text(f"[server]\ndata_dir = {tmp_path}/data\n[mx]\nmax_recipients = many\n")
    result = run_twistd(config)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{config}:mx:max_recipients: expected a whole number" in output
    assert "Traceback" not in output


def test_port_in_use_stops_startup(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "busy.ini"
    config.write_text(
        f"[server]\ndata_dir = {tmp_path}/data\n[mx]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        f"[pop3]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
    )
    try:
        result = run_twistd(config)
    finally:
        busy.close()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{config}:mx:listen: cannot listen on tcp:{port}" in output, output
    assert "Traceback" not in output
