"""SEARCH, SORT and THREAD run in slices (issue 10): between slices the reactor serves the
other sessions of the process, and this session's pipelined commands wait their turn."""

from __future__ import annotations

import pytest

from mailgw.imap import session as session_module
from mailgw.imap.commands import search as search_commands
from tests.imap.imap_env import Env


def fill(env: Env, n: int) -> None:
    for i in range(n):
        refs = f"References: <m{i - 1}@x.test>\r\n" if i else ""
        env.deliver(
            f"From: a@x.test\r\nTo: b{i % 3}@x.test\r\nSubject: topic {i % 4}\r\n"
            f"Message-ID: <m{i}@x.test>\r\n{refs}Date: Mon, 1 Jan 2024 10:{i:02d}:00 +0000\r\n"
            f"\r\nbody number {i}\r\n".encode()
        )


@pytest.mark.parametrize(
    "command",
    ["THREAD REFERENCES UTF-8 ALL", "THREAD ORDEREDSUBJECT UTF-8 ALL", "SORT (TO SUBJECT) UTF-8 ALL",
     "SEARCH TEXT number"],
)  # fmt: skip
def test_long_command_lets_other_sessions_run(
    env: Env, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    fill(env, 12)
    reference = env.connect(login="alice@example.test")
    reference.cmd("SELECT INBOX")
    expected = reference.cmd(command)  # in one go: a slice of 2000 steps is plenty

    monkeypatch.setattr(session_module, "SLICE_STEPS", 2)
    a = env.connect(login="alice@example.test")
    b = env.connect(login="bob@example.test")
    a.cmd("SELECT INBOX")
    out = a.send(b"t1 " + command.encode() + b"\r\nt2 NOOP\r\n")
    assert b"t1 " not in out  # not finished: it gave the reactor back
    assert b"NOOP" in b.cmd("NOOP")  # another session is answered meanwhile
    for _ in range(1000):
        if b"t2 OK" in out:
            break
        env.clock.advance(0)
        out += a.take()
    untagged, _, rest = out.partition(b"t1 OK")
    assert untagged == b"".join(expected.splitlines(keepends=True)[:-1])  # as in one go
    assert untagged.startswith((b"* THREAD (", b"* SORT ", b"* SEARCH "))
    assert b"t2 OK" in rest  # the pipelined command ran after it, in order


def test_connection_lost_during_a_sliced_command(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(env, 12)
    monkeypatch.setattr(session_module, "SLICE_STEPS", 1)
    a = env.connect(login="alice@example.test")
    a.cmd("SELECT INBOX")
    a.send(b"t1 THREAD REFERENCES UTF-8 ALL\r\n")
    assert env.clock.getDelayedCalls()  # the next slice is scheduled
    a.close()
    assert not [c for c in env.clock.getDelayedCalls() if c.active() and c.getTime() == 0]
    env.clock.advance(0)
    assert b"t1 " not in a.take()


def test_error_in_a_sliced_command_is_answered(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(env, 3)
    a = env.connect(login="alice@example.test")
    a.cmd("SELECT INBOX")

    def broken(*args: object, **kwargs: object) -> object:
        yield
        raise RuntimeError("boom")

    monkeypatch.setattr(search_commands, "thread_references_steps", broken)
    out = a.send(b"t1 THREAD REFERENCES UTF-8 ALL\r\nt2 NOOP\r\n")
    assert b"t1 NO [SERVERBUG]" in out
    assert b"t2 OK" in out
