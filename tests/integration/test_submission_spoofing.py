"""End to end: authenticated sender spoofing through header parsing differences (issue 10).

alice logs in over real submission (smtplib, STARTTLS + AUTH PLAIN) and tries to make a
message read as from bob. The recipient's view is mailgw's own parser (IMAP ENVELOPE), so
the submission check must decide on that same parse, over the whole header.
"""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgw.testing.server import MailgwServer
from tests.integration.helpers import PASSWORD, mailbox_files, wait_until
from tests.integration.test_smtp_rfc import context, start_node


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, selfsigned: tuple[Path, Path]
) -> Iterator[MailgwServer]:
    server = start_node(tmp_path_factory.mktemp("node"), selfsigned, {})
    yield server
    server.stop()


def send_as_alice(node: MailgwServer, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=15) as smtp:
        smtp.starttls(context=context())
        smtp.login("alice@example.test", PASSWORD)
        smtp.sendmail("alice@example.test", ["bob@example.test"], message)


FILLER = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 90) for i in range(3000))  # ~300 KiB

SPOOFS = {
    # The example: Python's parser skipped "From :", mailgw.mime reads it as From.
    "blank-before-colon": b"To: carol@x.example\r\nSubject: s1\r\nFrom : bob@example.test\r\n"
    b"From: alice@example.test\r\n\r\nhi\r\n",
    # A line without a colon ended the header for Python's parser, not for mailgw.mime.
    "line-without-colon": b"From: alice@example.test\r\nSubject: s2\r\nX-Junk\r\n"
    b"From: bob@example.test\r\n\r\nhi\r\n",
    # The check read only the first 256 KiB of the header.
    "from-after-256k": b"From: alice@example.test\r\nSubject: s3\r\n"
    + FILLER
    + b"From: bob@example.test\r\n\r\nhi\r\n",
    "two-froms": b"From: bob@example.test\r\nFrom: alice@example.test\r\n\r\nhi\r\n",
    "sender-of-someone-else": b"From: alice@example.test\r\nSender: bob@example.test\r\n\r\nhi\r\n",
    "two-senders": b"From: alice@example.test\r\nSender: alice@example.test\r\n"
    b"Sender: bob@example.test\r\n\r\nhi\r\n",
}


@pytest.mark.parametrize("name", sorted(SPOOFS))
def test_spoofing_variant_is_refused(node: MailgwServer, name: str) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        send_as_alice(node, SPOOFS[name])
    code, text = info.value.smtp_code, info.value.smtp_error
    assert (code, text[:6]) in ((550, b"5.7.1 "), (553, b"5.7.1 ")), (code, text)
    node.wait_for_log("refused for alice@example.test: 55")


def test_honest_message_arrives_and_reads_as_from_alice(node: MailgwServer) -> None:
    send_as_alice(
        node,
        b"From: Alice <alice@example.test>\r\nReply-To: team@far.example\r\n"
        b"Subject: honest\r\n\r\nhi\r\n",
    )
    wait_until(lambda: mailbox_files(node, "bob"), what="delivery")
    imap = imaplib.IMAP4("127.0.0.1", node.ports["imap"])
    try:
        imap.login("bob@example.test", "bob password")
        imap.select("INBOX")
        typ, data = imap.fetch("1:*", "(ENVELOPE)")
        assert typ == "OK"
        [envelope] = [d for d in data if isinstance(d, bytes)]  # the refused ones never came
        alice = b'(("Alice" NIL "alice" "example.test"))'
        # Subject, From, Sender (From), Reply-To
        assert b'"honest" ' + alice + b" " + alice + b' ((NIL NIL "team" "far.example"))' in (
            envelope
        )
    finally:
        imap.logout()
