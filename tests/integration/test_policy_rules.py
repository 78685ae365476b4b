"""End to end: the security rules (tests/integration/policy_rules.txt) in a real `twistd
mailgw` with MX, authenticated submission (smtplib over STARTTLS, swaks) and the relay to
test MX servers on 127.0.0.x (tests/integration/relay_peers.py): every match type and action,
class and channel routing observed at the peers, the quarantine CLI, MIME bombs, a bad rules
file."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import smtplib
import ssl
import subprocess
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from mailgw.policy.content import cn_id_valid
from mailgw.testing.server import TWISTD, MailgwServer, free_port
from tests.integration.helpers import PASSWORD, provision, wait_until
from tests.integration.relay_world import TARGETS, Peers, relay_overrides

RULES = Path(__file__).with_name("policy_rules.txt")
USERS = {
    "carol": "carol pw",
    "ceo": "ceo pw",
    "archive": "archive pw",
    "old": "old pw",
    "ratey": "ratey pw",
    "mallory": "mallory pw",
}
RR = TARGETS["rr.example"]
DOMESTIC, OVERSEAS, SDN = "127.0.0.4", "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def node(
    peers: Peers, tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    folder = tmp_path_factory.mktemp("policy-node")
    shutil.copy(RULES, folder / "rules.txt")  # relative to the config file's folder
    port = free_port()
    overrides = relay_overrides(peers)
    overrides["route:spam"] = {"message_class": "spam", "channels": "domestic"}
    overrides["tls"] = {"certificate": str(cert), "private_key": str(key)}
    overrides["submission"] = {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"}
    overrides["delivery"] = {"retry_interval": "1s"}
    overrides["policy"] = {"rules_file": "rules.txt"}
    server = MailgwServer(folder, overrides)
    provision(
        server,
        *(("user", "add", f"{u}@example.test", "--password", pw) for u, pw in USERS.items()),
    )
    server.start()
    server.ports["submission"] = port
    yield server
    server.stop()


# -- helpers -----------------------------------------------------------------------------------


def message(subject: str, body: str = "hello\n", **headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = headers.pop("From", "someone@far.example")
    m["To"] = headers.pop("To", "alice@example.test")
    m["Subject"] = subject
    for name, value in headers.items():
        m[name.replace("_", "-")] = value
    m.set_content(body)
    return m


def mx(
    node: MailgwServer,
    msg: EmailMessage | bytes,
    rcpts: list[str] | None = None,
    sender: str = "someone@far.example",
    source: str | None = None,
) -> dict[str, Any]:
    data = msg if isinstance(msg, bytes) else msg.as_bytes(policy=email.policy.SMTP)
    with smtplib.SMTP(
        "127.0.0.1", node.ports["mx"], timeout=30, source_address=(source, 0) if source else None
    ) as s:
        return s.sendmail(sender, rcpts or ["alice@example.test"], data)


def submit(
    node: MailgwServer,
    msg: EmailMessage,
    rcpts: list[str],
    user: str = "alice",
    password: str = PASSWORD,
) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as s:
        s.starttls(context=context)
        s.login(f"{user}@example.test", password)
        del msg["From"]
        msg["From"] = f"{user}@example.test"
        return s.sendmail(f"{user}@example.test", rcpts, msg.as_bytes(policy=email.policy.SMTP))


def folder_files(node: MailgwServer, user: str, folder: str = "INBOX") -> list[Path]:
    root = node.data_dir / "mail" / "example.test" / user
    if folder != "INBOX":
        root = root / f".{folder}"
    return [p for sub in ("new", "cur") if (root / sub).is_dir() for p in (root / sub).iterdir()]


def find(node: MailgwServer, user: str, marker: str, folder: str = "INBOX") -> bytes | None:
    for path in folder_files(node, user, folder):
        data = path.read_bytes()
        if marker.encode() in data:
            return data
    return None


def arrived(node: MailgwServer, user: str, marker: str, folder: str = "INBOX") -> bytes:
    found: bytes = wait_until(
        lambda: find(node, user, marker, folder), what=f"{marker} in {user}'s {folder}"
    )
    return found


def quarantined(node: MailgwServer) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(node.cli("quarantine", "list", "--json").stdout)
    return rows


def quarantine_row(node: MailgwServer, marker: str) -> dict[str, Any] | None:
    for row in quarantined(node):
        content = node.data_dir / "quarantine" / f"{row['id']}.msg"
        if marker.encode() in content.read_bytes():
            return row
    return None


def at_peer(peers: Peers, marker: str) -> list[dict[str, Any]]:
    return [m for m in peers.messages(RR) if marker in m["data"]]


# -- envelope rules (MAIL / RCPT) ---------------------------------------------------------------


@pytest.mark.parametrize("sender", ["spammer@bad.example", "x@evil.example", "bulk-42@any.test"])
def test_sender_exact_domain_and_regex_are_refused_at_mail(node: MailgwServer, sender: str) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        mx(node, message("blocked"), sender=sender)
    assert e.value.smtp_code == 550 and b"5.7.1 Sender blocked by policy" in e.value.smtp_error
    node.wait_for_log("rule blocked-senders hit at mail: reject")


def test_client_network_is_refused(node: MailgwServer) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        mx(node, message("from a blocked network"), source="127.0.0.9")
    assert e.value.smtp_code == 554 and b"Network blocked" in e.value.smtp_error
    node.wait_for_log("client=127.0.0.9")


def test_a_recipient_rule_refuses_only_that_recipient(node: MailgwServer) -> None:
    refused = mx(node, message("carol-and-bob"), ["carol@example.test", "bob@example.test"])
    assert refused == {"carol@example.test": (450, b"4.7.1 carol is away")}
    arrived(node, "bob", "carol-and-bob")
    assert find(node, "carol", "carol-and-bob") is None


def test_recipient_count(node: MailgwServer) -> None:
    rcpts = ["alice@example.test", "bob@example.test", "archive@example.test", "ceo@example.test"]
    refused = mx(node, message("four-recipients"), rcpts)
    assert refused == {"ceo@example.test": (452, b"4.5.3 Too many recipients for policy")}
    for user in ("alice", "bob", "archive"):
        arrived(node, user, "four-recipients")


def test_bcc_archive_with_continue_and_the_later_rules_too(node: MailgwServer) -> None:
    mx(node, message("casino night"), ["ceo@example.test"])
    for user in ("ceo", "archive"):
        data = arrived(node, user, "casino night", "Junk")  # folder created on first use
        assert b"Subject: [SPAM] casino night" in data
        assert b"X-Archived: yes\r\n" in data and b"X-Spam-Flag: YES\r\n" in data
    assert find(node, "ceo", "casino night") is None  # not in INBOX


def test_redirect(node: MailgwServer) -> None:
    mx(node, message("for-the-old-address"), ["old@example.test"])
    data = arrived(node, "bob", "for-the-old-address")
    assert b"Delivered-To: bob@example.test" in data
    assert find(node, "old", "for-the-old-address") is None


def test_accept_and_stop_skips_the_later_rules(node: MailgwServer) -> None:
    m = message("trusted-exe", From="trusted@partner.example")
    m.add_attachment(b"MZ\x90\x00" + b"\x00" * 200, "application", "octet-stream", filename="x.exe")
    mx(node, m, sender="trusted@partner.example")
    arrived(node, "alice", "trusted-exe")


# -- content rules (DATA) -----------------------------------------------------------------------


def data_refusal(node: MailgwServer, m: EmailMessage | bytes, **kw: Any) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPDataError) as e:
        mx(node, m, **kw)
    return e.value.smtp_code, e.value.smtp_error


def test_size(node: MailgwServer) -> None:
    big = message("big", ("y" * 76 + "\n") * 5000)
    assert data_refusal(node, big) == (552, b"5.3.4 Message too big for policy")


def exe_disguised() -> EmailMessage:
    m = message("report attached")
    m.add_attachment(b"MZ\x90\x00\x03" + b"\x00" * 500, "application", "pdf", filename="report.pdf")
    return m


def zip_with(files: dict[str, bytes]) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def test_executables_by_real_type_also_inside_zips(node: MailgwServer) -> None:
    assert data_refusal(node, exe_disguised()) == (
        554,
        b"5.7.1 Executable content is not accepted",
    )
    m = message("zip with elf")
    archive = zip_with({"docs/readme.txt": b"hi", "tools/run": b"\x7fELF\x02\x01\x01" + b"\0" * 64})
    m.add_attachment(archive, "application", "zip", filename="tools.zip")
    assert data_refusal(node, m)[0] == 554


def test_an_encrypted_zip_is_detected(node: MailgwServer, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("the plans\n")
    subprocess.run(["zip", "-q", "-P", "pw", "secret.zip", "secret.txt"], cwd=tmp_path, check=True)
    m = message("encrypted zip")
    m.add_attachment(
        (tmp_path / "secret.zip").read_bytes(), "application", "zip", filename="secret.zip"
    )
    assert data_refusal(node, m) == (554, b"5.7.1 Encrypted archives are not accepted")


def test_attachment_extension_and_name(node: MailgwServer) -> None:
    m = message("script")
    m.add_attachment(b"WScript.Echo 1", "text", "plain", filename="run.JS")
    assert data_refusal(node, m) == (554, b"5.7.1 Attachment type not accepted")
    m = message("invoice-page")
    m.add_attachment(b"<p>pay</p>", "text", "html", filename="Invoice-2026.html")
    mx(node, m)
    row = wait_until(lambda: quarantine_row(node, "invoice-page"), what="quarantined")
    assert row["rule"] == "invoice-pages" and row["reason"] == "suspicious invoice page"
    ok = message("real pdf")
    ok.add_attachment(b"%PDF-1.7\n%...\n", "application", "pdf", filename="real.pdf")
    mx(node, ok)
    arrived(node, "alice", "real pdf")


def test_header_regex_quarantines_and_the_cli_lists_shows_releases_deletes(
    node: MailgwServer,
) -> None:
    mx(node, message("mass-1", X_Mailer="MassMailer 3.0"))
    mx(node, message("mass-2", X_Mailer="massmailer pro"))
    one = wait_until(lambda: quarantine_row(node, "mass-1"), what="mass-1 quarantined")
    two = wait_until(lambda: quarantine_row(node, "mass-2"), what="mass-2 quarantined")
    assert one["direction"] == "inbound" and one["rule"] == "mass-mailer"
    assert one["envelope"]["recipients"] == ["alice@example.test"]
    listing = node.cli("quarantine", "list").stdout
    assert one["id"] in listing and "rule=mass-mailer: mass mailer" in listing
    shown = node.cli("quarantine", "show", one["id"]).stdout
    assert "reason: mass mailer" in shown and "Subject: mass-1" in shown
    assert find(node, "alice", "mass-1") is None  # not delivered
    out = node.cli("quarantine", "release", one["id"]).stdout
    assert "released to the queue (to be delivered)" in out
    arrived(node, "alice", "mass-1")
    node.cli("quarantine", "delete", two["id"])
    assert quarantine_row(node, "mass-2") is None
    gone = node.cli("quarantine", "show", two["id"], check=False)
    assert gone.returncode == 1 and "no such quarantined message" in gone.stderr
    again = node.cli("quarantine", "release", one["id"], check=False)
    assert again.returncode == 1


def test_subject_keywords_tag_and_file_into_junk(node: MailgwServer) -> None:
    mx(node, message("Cheap Pills today"))
    data = arrived(node, "alice", "Cheap Pills today", "Junk")
    assert b"Subject: [SPAM] Cheap Pills today" in data
    assert data.index(b"X-Spam-Flag: YES") < data.index(b"Received: from")


# -- MIME bombs ---------------------------------------------------------------------------------


def many_parts(n: int) -> bytes:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(n))
    return (
        b"From: x@far.example\r\nSubject: many-parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    )


def deep(levels: int) -> bytes:
    head = b"From: x@far.example\r\nSubject: deep-nesting\r\nMIME-Version: 1.0\r\n"
    body = b"innermost\r\n"
    for i in range(levels):
        b = b"L%d" % i
        body = (
            b'Content-Type: multipart/mixed; boundary="'
            + b
            + b'"\r\n\r\n--'
            + b
            + b"\r\n"
            + body
            + b"\r\n--"
            + b
            + b"--\r\n"
        )
    return head + body


def test_mime_bombs_never_crash_and_are_quarantined(node: MailgwServer) -> None:
    mx(node, many_parts(3000))
    mx(node, deep(150))
    for marker in ("many-parts", "deep-nesting"):
        row = wait_until(lambda m=marker: quarantine_row(node, m), what=f"{marker} quarantined")
        assert row["rule"] == "mime-bomb"
    malformed = (
        b"From: x@far.example\r\nSubject: malformed-mime\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="never"\r\n\r\n--never\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename*=bogus''%%%\r\n\r\n!!!not base64***\r\n"
    )
    mx(node, malformed)
    arrived(node, "alice", "malformed-mime")


# -- outbound (submission) ----------------------------------------------------------------------


def test_a_user_rule_refuses_at_mail(node: MailgwServer) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(node, message("mallory"), ["bob@example.test"], "mallory", USERS["mallory"])
    assert e.value.smtp_code == 550 and b"mallory may not send" in e.value.smtp_error


def test_rate_per_user(node: MailgwServer) -> None:
    for i in range(2):
        submit(node, message(f"rate-{i}"), ["bob@example.test"], "ratey", USERS["ratey"])
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(node, message("rate-2"), ["bob@example.test"], "ratey", USERS["ratey"])
    assert e.value.smtp_code == 450 and b"4.7.1 Too many messages" in e.value.smtp_error
    node.wait_for_log("rule rate-limited-user hit at mail: tempfail")


def valid_cn_id() -> str:
    base = "11010519491231002"
    for check in "0123456789X":
        if cn_id_valid(base + check):
            return base + check
    raise AssertionError("no check character")


def test_dlp_identity_card_numbers_are_refused(node: MailgwServer) -> None:
    body = f"my id is {valid_cn_id()} thanks\n"
    with pytest.raises(smtplib.SMTPDataError) as e:
        submit(node, message("id inside", body), ["bob@rr.example"])
    assert e.value.smtp_code == 550 and b"5.7.0 Message holds identity card" in e.value.smtp_error
    # a number with a wrong check character is not one
    wrong = valid_cn_id()[:-1] + ("1" if valid_cn_id()[-1] != "1" else "2")
    submit(node, message("not an id", f"number {wrong}\n"), ["bob@example.test"])
    arrived(node, "bob", "not an id")


def test_dlp_card_numbers_quarantine_then_release_relays(node: MailgwServer, peers: Peers) -> None:
    submit(
        node, message("card-inside", "pay with 4111 1111 1111 1111 please\n"), ["bob@rr.example"]
    )
    row = wait_until(lambda: quarantine_row(node, "card-inside"), what="card-inside quarantined")
    assert row["direction"] == "outbound" and row["rule"] == "dlp-card-numbers"
    assert at_peer(peers, "card-inside") == []
    out = node.cli("quarantine", "release", row["id"]).stdout
    assert "to be relayed" in out
    [m] = wait_until(lambda: at_peer(peers, "card-inside"), what="relayed after release")
    assert m["rcpts"] == ["bob@rr.example"]
    # not a card number: fails the Luhn check
    submit(node, message("luhn-fails", "ref 4111 1111 1111 1112\n"), ["bob@example.test"])
    arrived(node, "bob", "luhn-fails")


def test_external_recipients(node: MailgwServer) -> None:
    with pytest.raises(smtplib.SMTPDataError) as e:
        submit(node, message("[confidential] plans"), ["bob@example.test", "bob@rr.example"])
    assert e.value.smtp_code == 550 and b"stays inside" in e.value.smtp_error
    submit(node, message("[confidential] inside"), ["bob@example.test"])
    arrived(node, "bob", "[confidential] inside")


def test_class_spam_leaves_only_through_the_spam_route(node: MailgwServer, peers: Peers) -> None:
    for i in range(3):
        submit(node, message(f"cheap pills {i}"), ["bob@rr.example"])
    submit(node, message("newsletter", "to stop: unsubscribe here\n"), ["bob@rr.example"])
    submit(node, message("plain-outbound"), ["bob@rr.example"])
    spam = wait_until(
        lambda: len(at_peer(peers, "cheap pills")) >= 3 and at_peer(peers, "cheap pills"),
        what="3 spam messages",
    )
    assert {m["peer"] for m in spam} == {DOMESTIC}
    assert all("Subject: [SPAM] cheap pills" in m["data"] for m in spam)
    [news] = wait_until(lambda: at_peer(peers, "unsubscribe here"), what="newsletter")
    assert news["peer"] == DOMESTIC
    [plain] = wait_until(lambda: at_peer(peers, "plain-outbound"), what="plain")
    assert plain["peer"] in (OVERSEAS, SDN)


def test_route_action_forces_a_channel(node: MailgwServer, peers: Peers) -> None:
    for i in range(4):
        submit(node, message(f"via-sdn {i}"), ["bob@rr.example"])
    msgs = wait_until(
        lambda: len(at_peer(peers, "via-sdn")) >= 4 and at_peer(peers, "via-sdn"), what="4 sent"
    )
    assert {m["peer"] for m in msgs} == {SDN}


def test_swaks_submission_with_an_attachment_by_type(node: MailgwServer, tmp_path: Path) -> None:
    payload = tmp_path / "tool.bin"
    payload.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 100)
    r = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{node.ports['submission']}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.test",
            "--auth-password",
            PASSWORD,
            "--from",
            "alice@example.test",
            "--to",
            "bob@example.test",
            "--attach",
            f"@{payload}",
            "--timeout",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "554 5.7.1 Executable content is not accepted" in r.stdout


# -- a bad rules file ---------------------------------------------------------------------------


def test_a_bad_rules_file_is_refused_whole(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("rule ok\n  match all\n  action accept\nrule broken\n  match size >> 2\n")
    server = MailgwServer(tmp_path / "node", {"policy": {"rules_file": str(bad)}})
    run = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "mailgw", "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=server.env(),
        cwd=server.cwd,
    )
    assert run.returncode != 0
    assert f"policy:rules_file: {bad}:5: size takes an operator" in run.stdout + run.stderr
    check = server.cli("policy", "check", str(bad), check=False)
    assert check.returncode == 1 and f"{bad}:5: size takes an operator" in check.stderr
    good = server.cli("policy", "check", str(RULES))
    assert "rule(s) OK" in good.stdout


def test_policy_check_of_the_shipped_example(node: MailgwServer) -> None:
    from mailgw.testing.server import REPO

    out = node.cli("policy", "check", "-v", str(REPO / "etc" / "rules.example"))
    assert "OK" in out.stdout


def test_hits_are_logged_with_the_queue_id(node: MailgwServer) -> None:
    mx(node, message("logged casino"))
    data = arrived(node, "alice", "logged casino", "Junk")
    queue_id = email.message_from_bytes(data)["Received"].split(" id ")[1].split()[0]
    node.wait_for_log(f"{queue_id}: rule spam-words hit at data")
