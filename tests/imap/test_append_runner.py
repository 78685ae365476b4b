"""APPEND runs its store writes through the factory's runner (a thread pool in the server):
the session waits for it in order, other sessions go on, and MULTIAPPEND is all or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailgw.testing.fakes import HeldRunner
from tests.imap.imap_env import Env

ALICE = "alice@example.test"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_append_waits_for_the_runner_and_keeps_command_order(env: Env) -> None:
    runner = HeldRunner()
    env.factory.run_blocking = runner
    c = env.connect(login=ALICE)
    other = env.connect(login=ALICE)
    out = c.send(b"a1 APPEND INBOX {12+}\r\nSubject: x\r\n\r\na2 NOOP\r\n")
    assert out == b""  # nothing answered while the write is under way
    assert b"a9 OK" in other.send(b"a9 NOOP\r\n")  # another session is not held up
    assert len(runner.held) == 1
    runner.release()
    out = c.take()
    assert out.index(b"a1 OK [APPENDUID ") < out.index(b"a2 OK"), out
    assert len(env.store.open_mailbox(ALICE).messages()) == 1


def test_append_errors_come_back_from_the_runner(env: Env) -> None:
    runner = HeldRunner()
    env.factory.run_blocking = runner
    c = env.connect(login=ALICE)
    c.send(b"a1 APPEND Nowhere {12+}\r\nSubject: x\r\n\r\n")
    runner.release()
    assert b"a1 NO [TRYCREATE]" in c.take()
    env.directory.quotas[ALICE] = 5
    c.send(b"a2 APPEND INBOX {12+}\r\nSubject: x\r\n\r\n")
    runner.release()
    assert b"a2 NO [OVERQUOTA]" in c.take()
    c.send(b"a3 APPEND INBOX {12+}\r\nSubject: x\r\n\r\n")
    c.close()  # the client went away while the write was under way
    runner.release()
    assert c.take() == b""


def test_unexpected_store_error_is_an_internal_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(env.store, "append_messages", broken)
    c = env.connect(login=ALICE)
    out = c.cmd("APPEND INBOX {12+}\r\nSubject: x\r\n")
    assert b"NO [SERVERBUG]" in out
    assert b"OK" in c.cmd("NOOP")  # the session goes on


def test_multiappend_is_all_or_nothing(env: Env) -> None:
    c = env.connect(login=ALICE)
    env.directory.quotas[ALICE] = 30
    first, second = b"Subject: x\r\n", b"Subject: yyyyyyyyyyyyyyy\r\n"  # 12 + 26 > 30
    out = c.send(
        b"a1 APPEND INBOX {%d+}\r\n%s (\\Seen) {%d+}\r\n%s\r\n"
        % (len(first), first, len(second), second)
    )
    assert b"a1 NO [OVERQUOTA]" in out
    assert env.store.open_mailbox(ALICE).messages() == []
    out = c.send(b"a2 APPEND INBOX {12+}\r\nSubject: x\r\n {0+}\r\n\r\n")
    assert b"a2 NO [CANNOT]" in out  # an empty message: nothing stored either
    assert env.store.open_mailbox(ALICE).messages() == []
