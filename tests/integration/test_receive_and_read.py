"""End to end: swaks/smtplib deliver on the MX port; curl, poplib and fetchmail read it back."""

from __future__ import annotations

import os
import poplib
import smtplib
import ssl
import subprocess
from pathlib import Path

from mailgw.testing.server import REPO, TWISTD, MailgwServer
from tests.integration.helpers import PASSWORD, Session, mailbox_files, wait_until

MESSAGE = (
    b"From: Bob <bob@elsewhere.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= report\r\n"
    b"X-Mixed-CASE-Header: kept as sent\r\n"
    b"Message-ID: <one@elsewhere.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".a line starting with a dot\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
)


def swaks(
    server: MailgwServer, *args: str, data: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "swaks",
        "--server",
        f"127.0.0.1:{server.ports['mx']}",
        "--helo",
        "client.elsewhere.test",
    ]
    if data is not None:
        cmd += ["--data", f"@{data}"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)


def pop3_retrieve_all(
    server: MailgwServer, user: str = "alice@example.test", password: str = PASSWORD
) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    try:
        client.user(user)
        client.pass_(password)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    finally:
        client.quit()


def test_twistd_lists_the_plugin() -> None:
    out = subprocess.run(
        [TWISTD, "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "mailgw" in out.stdout


def test_swaks_message_arrives_byte_for_byte_with_trace_headers(
    server: MailgwServer, tmp_path: Path
) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE[:-2])  # swaks ends the data with CRLF . CRLF itself
    result = swaks(
        server, "--from", "bob@elsewhere.test", "--to", "alice@example.test", data=source
    )
    assert "250 2.0.0 OK queued as" in result.stdout, result.stdout + result.stderr
    files = wait_until(lambda: mailbox_files(server), what="delivery")
    stored = files[0].read_bytes()
    assert stored.endswith(MESSAGE)
    trace = stored[: -len(MESSAGE)]
    lines = trace.split(b"\r\n")
    assert lines[0] == b"Return-Path: <bob@elsewhere.test>"
    assert lines[1] == b"Delivered-To: alice@example.test"
    assert lines[2].startswith(b"Received: from client.elsewhere.test")
    assert b"[127.0.0.1]" in trace and b"by mx.example.test" in trace
    # POP3 (poplib) gives exactly the stored bytes.
    assert pop3_retrieve_all(server) == [stored]
    # curl pop3:// too, and it picks no broken mechanism.
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--user",
            f"alice@example.test:{PASSWORD}",
            f"pop3://127.0.0.1:{server.ports['pop3']}/1",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == stored


def test_fetchmail_retrieves_the_message(server: MailgwServer, tmp_path: Path) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE[:-2])  # swaks ends the data with CRLF . CRLF itself
    assert "250 2.0.0" in swaks(server, "--to", "alice@example.test", data=source).stdout
    wait_until(lambda: mailbox_files(server), what="delivery")
    out_dir = tmp_path / "fetched"
    out_dir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll 127.0.0.1 protocol pop3 port {server.ports['pop3']} auth password\n"
        f'  user "alice@example.test" password "{PASSWORD}" is root here\n'
        f"  keep sslproto '' mda \"/bin/sh -c 'cat > {out_dir}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(
        [
            "fetchmail",
            "-f",
            str(rc),
            "--nodetach",
            "--nosyslog",
            "-v",
            "--pidfile",
            str(tmp_path / "fm.pid"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = list(out_dir.iterdir())
    assert len(fetched) == 1
    body = fetched[0].read_bytes().replace(b"\r\n", b"\n")
    assert body.endswith(MESSAGE.replace(b"\r\n", b"\n"))


def test_uidl_is_stable_across_sessions_and_restart(server: MailgwServer) -> None:
    for n in range(3):
        smtplib.SMTP("127.0.0.1", server.ports["mx"]).sendmail(
            "bob@elsewhere.test", ["alice@example.test"], f"Subject: {n}\r\n\r\nbody {n}\r\n"
        )
    wait_until(lambda: len(mailbox_files(server)) == 3, what="three deliveries")

    def uidl() -> list[bytes]:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
        client.user("alice@example.test")
        client.pass_(PASSWORD)
        listing = client.uidl()[1]
        client.quit()
        return listing

    first = uidl()
    assert len(first) == 3 and len({line.split()[1] for line in first}) == 3
    assert uidl() == first
    server.stop()
    server.start()
    assert uidl() == first


def test_dele_then_quit_removes_only_that_message(server: MailgwServer) -> None:
    for n in range(2):
        smtplib.SMTP("127.0.0.1", server.ports["mx"]).sendmail(
            "bob@elsewhere.test", ["alice@example.test"], f"Subject: {n}\r\n\r\nbody {n}\r\n"
        )
    wait_until(lambda: len(mailbox_files(server)) == 2, what="two deliveries")
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    client.user("alice@example.test")
    client.pass_(PASSWORD)
    # Concurrent deliveries may number the two messages either way: delete the one with body 0.
    first = b"\r\n".join(client.retr(1)[1])
    client.dele(1 if b"body 0" in first else 2)
    client.quit()
    remaining = pop3_retrieve_all(server)
    assert len(remaining) == 1 and b"body 1" in remaining[0]


def test_alias_and_recipient_delimiter(server: MailgwServer) -> None:
    smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"])
    refused = smtp.sendmail(
        "bob@elsewhere.test",
        ["postmaster@example.test", "alice+news@example.test", "bob@example.test"],
        "Subject: fan out\r\n\r\nhi\r\n",
    )
    smtp.quit()
    assert refused == {}
    # Two recipient addresses reach alice: she gets one copy (as Postfix's duplicate filter).
    wait_until(lambda: len(mailbox_files(server)) == 1, what="alice gets one copy")
    wait_until(lambda: len(mailbox_files(server, "bob")) == 1, what="bob gets one")
    delivered_to = sorted(f.read_bytes().split(b"\r\n")[1] for f in mailbox_files(server))
    assert delivered_to == [b"Delivered-To: alice@example.test"]


def test_wrong_password_and_unknown_user_are_refused_alike(server: MailgwServer) -> None:
    for user, password in (("alice@example.test", "wrong"), ("nobody@example.test", "wrong")):
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
        client.user(user)
        try:
            client.pass_(password)
        except poplib.error_proto as e:
            assert b"[AUTH]" in e.args[0]
        else:
            raise AssertionError("login succeeded")
        finally:
            client.close()


def test_cli_password_change_takes_effect(server: MailgwServer) -> None:
    server.cli("user", "passwd", "bob@example.test", "--password", "new bob")
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    client.user("bob@example.test")
    assert client.pass_("new bob").startswith(b"+OK")
    client.quit()


def test_tls_starttls_stls_and_pop3s(tls_server: MailgwServer) -> None:
    server = tls_server
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", server.ports["mx"])
    smtp.ehlo("client.test")
    assert smtp.has_extn("starttls")
    smtp.starttls(context=context)
    smtp.ehlo("client.test")
    assert not smtp.has_extn("starttls")
    smtp.sendmail("bob@elsewhere.test", ["alice@example.test"], "Subject: tls\r\n\r\nover tls\r\n")
    smtp.quit()
    files = wait_until(lambda: mailbox_files(server), what="delivery")
    assert b"with ESMTPS id" in files[0].read_bytes()
    # STLS on the plain port.
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    assert "STLS" in client.capa()
    client.stls(context=context)
    client.user("alice@example.test")
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    client.quit()
    # Implicit TLS on the POP3S port.
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=context, timeout=10)
    client.user("alice@example.test")
    client.pass_(PASSWORD)
    assert client.stat()[0] == 1
    client.quit()
    # swaks with STARTTLS.
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{server.ports['mx']}",
            "--tls",
            "--to",
            "alice@example.test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "250 2.0.0 OK queued as" in result.stdout, result.stdout
    # curl pop3 with --ssl-reqd upgrades with STLS.
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--ssl-reqd",
            "--user",
            f"alice@example.test:{PASSWORD}",
            f"pop3://127.0.0.1:{server.ports['pop3']}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 ")


def test_smtputf8_recipient_and_idn_domain(server: MailgwServer) -> None:
    server.cli("domain", "add", "bücher.test")
    server.cli("user", "add", "josé@bücher.test", "--password", "pw of josé")
    session = Session(server.ports["mx"])
    assert b"SMTPUTF8" in session.command(b"EHLO client.test")
    # Without SMTPUTF8 a UTF-8 address is refused; with it, accepted (domain as U- or A-label).
    assert session.command(b"MAIL FROM:<bob@elsewhere.test>").startswith(b"250")
    assert session.command("RCPT TO:<josé@bücher.test>".encode()).startswith(b"553 5.6.7")
    session.command(b"RSET")
    assert session.command("MAIL FROM:<rené@elsewhere.test> SMTPUTF8".encode()).startswith(b"250")
    assert session.command("RCPT TO:<josé@bücher.test>".encode()).startswith(b"250")
    assert session.command("RCPT TO:<josé@xn--bcher-kva.test>".encode()).startswith(b"250")
    assert session.command(b"DATA").startswith(b"354")
    session.send("Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode())
    assert session.reply().startswith(b"250")
    session.command(b"QUIT")
    files = wait_until(lambda: mailbox_files(server, "josé", "xn--bcher-kva.test"), what="delivery")
    stored = files[0].read_bytes()
    assert "Return-Path: <rené@elsewhere.test>".encode() in stored
    assert b"with UTF8SMTP id" in stored
    assert len(files) == 1  # both recipient spellings are the same user: one copy
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    pop.user("josé@bücher.test")
    pop.pass_("pw of josé")
    assert pop.stat()[0] == 1
    pop.quit()
