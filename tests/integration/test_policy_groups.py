"""End to end: the rules' ``group`` match in a real `twistd mailgw` with authenticated
submission (smtplib over STARTTLS): a member of group finance gets the finance rules'
actions (a 550 with the rule's text, a header in the delivered message), a non-member does
not, and `mailgw group adduser|deluser` on the running node changes the outcome of the next
message (membership is read from the directory at check time, no reload)."""

from __future__ import annotations

import email.policy
import smtplib
import ssl
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer, free_port
from tests.integration.helpers import PASSWORD, provision, wait_until

RULES = """\
rule finance-stamp
    match group finance
    action add-header X-Finance: yes
    action continue

rule finance-not-to-carol
    match group finance board
    match recipient carol@example.test
    action reject 550 5.7.1 "Finance may not write to carol"
"""
PASSWORDS = {"alice": PASSWORD, "bob": "bob password"}


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    cert, key = selfsigned
    folder = tmp_path_factory.mktemp("groups-node")
    (folder / "rules.txt").write_text(RULES)
    port = free_port()
    server = MailgwServer(
        folder,
        {
            "tls": {"certificate": str(cert), "private_key": str(key)},
            "submission": {"enabled": "yes", "listen": f"tcp:{port}:interface=127.0.0.1"},
            "policy": {"rules_file": "rules.txt"},
        },
    )
    provision(server)  # alice and bob
    server.cli("user", "add", "carol@example.test", "--password", "carol password")
    server.cli("group", "add", "finance")
    server.cli("group", "adduser", "finance", "alice@example.test")
    server.start()
    server.ports["submission"] = port
    yield server
    server.stop()


def submit(node: MailgwServer, user: str, rcpt: str) -> str:
    """Send a message as ``user`` to ``rcpt``; returns its marker (in the Subject)."""
    marker = uuid.uuid4().hex
    msg = EmailMessage()
    msg["From"] = f"{user}@example.test"
    msg["To"] = rcpt
    msg["Subject"] = f"report {marker}"
    msg.set_content("the figures\n")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as s:
        s.starttls(context=context)
        s.login(f"{user}@example.test", PASSWORDS[user])
        s.sendmail(f"{user}@example.test", [rcpt], msg.as_bytes(policy=email.policy.SMTP))
    return marker


def delivered(node: MailgwServer, user: str, marker: str) -> bytes:
    root = node.data_dir / "mail" / "example.test" / user

    def find() -> bytes | None:
        for sub in ("new", "cur"):
            for path in (root / sub).glob("*") if (root / sub).is_dir() else ():
                data = path.read_bytes()
                if marker.encode() in data:
                    return data
        return None

    found: bytes = wait_until(find, what=f"{marker} in {user}'s INBOX")
    return found


def header_part(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in data else data.split(b"\n\n", 1)[0]


def refused(node: MailgwServer, user: str, rcpt: str) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        submit(node, user, rcpt)
    code, text = e.value.recipients[rcpt]
    return code, text


def test_members_get_the_group_rules_and_others_do_not(node: MailgwServer) -> None:
    stamped = delivered(node, "bob", submit(node, "alice", "bob@example.test"))
    assert b"X-Finance: yes" in header_part(stamped)
    assert refused(node, "alice", "carol@example.test") == (
        550,
        b"5.7.1 Finance may not write to carol",
    )
    plain = delivered(node, "alice", submit(node, "bob", "alice@example.test"))
    assert b"X-Finance" not in header_part(plain)
    delivered(node, "carol", submit(node, "bob", "carol@example.test"))


def test_a_membership_change_counts_for_the_next_message_without_reload(
    node: MailgwServer,
) -> None:
    marker = submit(node, "bob", "alice@example.test")
    assert b"X-Finance" not in header_part(delivered(node, "alice", marker))
    node.cli("group", "adduser", "finance", "bob@example.test")
    marker = submit(node, "bob", "alice@example.test")
    assert b"X-Finance: yes" in header_part(delivered(node, "alice", marker))
    assert refused(node, "bob", "carol@example.test")[0] == 550
    # Into another group the rule names; out of finance: only the reject rule still holds.
    node.cli("group", "add", "board")
    node.cli("group", "adduser", "board", "bob@example.test")
    node.cli("group", "deluser", "finance", "bob@example.test")
    marker = submit(node, "bob", "alice@example.test")
    assert b"X-Finance" not in header_part(delivered(node, "alice", marker))
    assert refused(node, "bob", "carol@example.test")[0] == 550
    node.cli("group", "del", "board")
    delivered(node, "carol", submit(node, "bob", "carol@example.test"))
