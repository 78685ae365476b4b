"""Header FETCH from the parsed-message cache: a mail client's message list (headers,
ENVELOPE, BODYSTRUCTURE) is answered from the kept header block without reading the
message again, byte for byte what the message gives; anything beyond the header reads it."""

from __future__ import annotations

import re

import pytest

from mailgw.store.mailbox import Mailbox
from tests.imap.imap_env import Env

MESSAGE = (
    b"Received: from client.test by mx.example.test; Sun, 6 Dec 2026 08:00:00 +0000\r\n"
    b"From: Sender <s@remote.test>\r\nTo: alice@example.test\r\nSubject: cached header\r\n"
    b"Date: Sun, 6 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@remote.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    b"--b\r\nContent-Type: text/plain; name=a.txt\r\n\r\nattached\r\n--b--\r\n"
)
LIST_ITEMS = (
    "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (Subject From)]"
    " BODY.PEEK[HEADER.FIELDS.NOT (Received)] BODY.PEEK[HEADER]<10.20> ENVELOPE"
    " BODYSTRUCTURE BODY)"
)


def untagged(response: bytes) -> bytes:
    """``response`` without its tagged completion line."""
    return re.sub(rb"(?m)^a\d+ OK [^\r]*\r\n\Z", b"", response)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The UIDs read from the store, in order."""
    seen: list[int] = []
    original = Mailbox.read_message

    def counted(self: Mailbox, uid: int) -> bytes:
        seen.append(uid)
        return original(self, uid)

    monkeypatch.setattr(Mailbox, "read_message", counted)
    return seen


def test_the_message_list_is_answered_from_the_kept_header(env: Env, reads: list[int]) -> None:
    env.deliver(MESSAGE)
    client = env.connect(login="alice@example.test")
    client.cmd("SELECT INBOX")
    cold = client.cmd(f"FETCH 1 {LIST_ITEMS}")
    assert reads == [1] and b" OK " in cold.splitlines()[-1]
    assert b"Subject: cached header" in cold and b"BODYSTRUCTURE ((" in cold
    warm = client.cmd(f"FETCH 1 {LIST_ITEMS}")
    assert untagged(warm) == untagged(cold) and untagged(cold).count(b"\r\n") > 1
    assert reads == [1]  # not read again
    client.cmd("FETCH 1 RFC822.HEADER")  # sets \\Seen: still the header alone
    assert reads == [1]
    text = client.cmd("FETCH 1 BODY.PEEK[TEXT]")
    assert b"attached" in text and reads == [1, 1]
    client.cmd("FETCH 1 BODY.PEEK[2.MIME]")  # a part's header: beyond the top-level one
    assert reads == [1, 1, 1]


def test_cold_and_warm_answers_are_the_same_bytes(tmp_path_factory: pytest.TempPathFactory) -> None:
    answers = []
    for warm_up in (False, True):
        env = Env(tmp_path_factory.mktemp("store"))
        env.deliver(MESSAGE)
        client = env.connect(login="alice@example.test")
        client.cmd("SELECT INBOX")
        if warm_up:
            client.cmd("FETCH 1 BODY.PEEK[HEADER]")  # keeps the header block
        answers.append(untagged(client.cmd(f"FETCH 1 {LIST_ITEMS}")))
    assert answers[0] == answers[1] and b"BODY[HEADER.FIELDS (Subject From)]" in answers[0]
