"""Error paths of the IMAP session that the command tests do not reach: each answers with the
right status and code, and the session goes on."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from tests.imap.imap_env import Env

ALICE = "alice@example.test"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _last(out: bytes) -> bytes:
    return out.splitlines()[-1]


def test_check_is_a_noop_that_reports_updates(env: Env) -> None:
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    env.deliver(b"Subject: new\r\n\r\nx\r\n")
    out = c.cmd("CHECK")
    assert b"* 1 EXISTS" in out and b"OK" in _last(out)


def test_starttls_without_tls_configured(env: Env) -> None:
    env.factory.tls_options = None
    c = env.connect()
    assert b"NO [UNAVAILABLE]" in c.cmd("STARTTLS")
    assert b"OK" in _last(c.cmd("NOOP"))


def test_login_with_invalid_utf8_fails_like_a_wrong_password(env: Env) -> None:
    c = env.connect()
    c.send(b'a1 LOGIN "alice@example.test" {2+}\r\n\xff\xfe\r\n')
    assert c.take() == b""  # the answer waits for the failure delay
    env.clock.advance(env.factory.auth_failure_delay)
    assert b"a1 NO [AUTHENTICATIONFAILED]" in c.take()


def test_authenticate_plain_malformed_and_empty_initial_response(env: Env) -> None:
    c = env.connect()
    bad = base64.b64encode(b"only-one-part").decode()
    assert b"BAD" in c.cmd(f"AUTHENTICATE PLAIN {bad}")
    # "=" is an empty initial response (RFC 4959): no NUL-separated parts either.
    assert b"BAD" in c.cmd("AUTHENTICATE PLAIN =")
    assert b"OK" in _last(c.cmd("NOOP"))


def test_create_delete_rename_errors(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    c = env.connect(login=ALICE)
    assert b"NO [CANNOT] Cannot create mailbox" in c.cmd('CREATE "bad%name"')
    assert b"OK" in _last(c.cmd("CREATE Box"))
    c.cmd("SELECT Box")
    assert b"OK" in _last(c.cmd("DELETE Box"))  # the selected mailbox: unselected first
    assert b"BAD" in c.cmd("FETCH 1 FLAGS")  # no longer in the selected state
    assert b"OK" in _last(c.cmd("CREATE Src"))

    def vanished(*args: Any) -> None:
        raise MailboxNotFound("Src")

    monkeypatch.setattr(env.store, "rename_mailbox", vanished)
    assert b"NO [NONEXISTENT]" in c.cmd("RENAME Src Dst")  # deleted by another session
    monkeypatch.setattr(env.store, "delete_mailbox", vanished)
    assert b"NO [NONEXISTENT]" in c.cmd("DELETE Src")


def test_subscribe_and_quota_errors(env: Env) -> None:
    c = env.connect(login=ALICE)
    assert b"NO [NONEXISTENT]" in c.cmd("SUBSCRIBE Nowhere")
    assert b"OK" in _last(c.cmd("UNSUBSCRIBE Nowhere"))  # removing is always fine
    assert b"NO [NONEXISTENT]" in c.cmd("GETQUOTAROOT Nowhere")
    assert b"NO [NONEXISTENT]" in c.cmd('GETQUOTA "other"')
    env.directory.quotas[ALICE] = None
    out = c.cmd('GETQUOTA ""')
    assert b'* QUOTA "" ()' in out and b"OK" in _last(out)


def test_expunge_and_store_errors(env: Env) -> None:
    env.deliver(b"Subject: one\r\n\r\nx\r\n")
    c = env.connect(login=ALICE)
    c.cmd("EXAMINE INBOX")
    assert b"NO [READ-ONLY]" in c.cmd("EXPUNGE")
    c.cmd("SELECT INBOX")
    assert b"BAD" in c.cmd("STORE 1 +FLAGS (\\Recent)")  # \Recent cannot be stored (parser)
    assert b"OK" in _last(c.cmd("NOOP"))


def test_move_over_quota(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.deliver(b"Subject: one\r\n\r\nx\r\n")
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")

    def full(*args: Any) -> Any:
        raise QuotaExceeded("full")

    monkeypatch.setattr(type(c.server.selected.mailbox), "move_to", full)
    assert b"NO [OVERQUOTA]" in c.cmd("MOVE 1 Archive")
    assert b"* 1 FETCH" in c.cmd("FETCH 1 FLAGS")  # nothing moved


def test_fetch_failing_midway_is_an_internal_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.deliver(b"Subject: one\r\n\r\nx\r\n")
    env.deliver(b"Subject: two\r\n\r\ny\r\n")
    c = env.connect(login=ALICE)
    c.cmd("SELECT INBOX")
    mailbox_type = type(c.server.selected.mailbox)
    real = mailbox_type.open_message

    def broken(self: Any, uid: int) -> Any:
        if uid == 2:
            raise OSError("disk error")
        return real(self, uid)

    monkeypatch.setattr(mailbox_type, "open_message", broken)
    out = c.cmd("FETCH 1:2 BODY.PEEK[]")
    assert b"* 1 FETCH" in out and b"NO [SERVERBUG]" in _last(out)
    assert b"OK" in _last(c.cmd("NOOP"))
