"""A full disk is a temporary failure: APPEND answers ``NO [OVERQUOTA] Not enough disk space``
(Dovecot's answer to ENOSPC/EDQUOT), nothing is half stored, the session goes on."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mailgw.store import is_disk_full, maildir
from tests.imap.imap_env import Env

ALICE = "alice@example.test"


def test_is_disk_full() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EIO, "I/O error"))
    assert not is_disk_full(OSError("no errno"))
    assert not is_disk_full(RuntimeError("x")) and not is_disk_full(None)
    full = sqlite3.connect(":memory:")
    full.execute("PRAGMA max_page_count = 1")
    with pytest.raises(sqlite3.OperationalError) as info:
        full.execute("CREATE TABLE t (x TEXT)")
        full.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    assert is_disk_full(info.value)
    assert not is_disk_full(sqlite3.OperationalError("no such table"))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_append_on_a_full_disk_is_overquota(
    env: Env, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real = maildir.write_file
    calls = {"n": 0}

    def full(path: str, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second message of a MULTIAPPEND: the first goes again
            raise OSError(code, "No space left on device", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(maildir, "write_file", full)
    c = env.connect(login=ALICE)
    out = c.cmd("APPEND INBOX {12+}\r\nSubject: x\r\n {12+}\r\nSubject: y\r\n")
    assert out.endswith(b"NO [OVERQUOTA] Not enough disk space\r\n"), out
    assert env.store.open_mailbox(ALICE).messages() == []  # all or none
    assert b"OK [APPENDUID" in c.cmd("APPEND INBOX {12+}\r\nSubject: z\r\n")  # space again
    assert len(env.store.open_mailbox(ALICE).messages()) == 1


def test_index_full_is_overquota_too(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = 13  # type: ignore[attr-defined]

    def index_full(*args: Any) -> Any:
        raise error

    monkeypatch.setattr(env.store, "append_messages", index_full)
    c = env.connect(login=ALICE)
    assert c.cmd("APPEND INBOX {12+}\r\nSubject: x\r\n").endswith(
        b"NO [OVERQUOTA] Not enough disk space\r\n"
    )
    monkeypatch.setattr(env.store, "append_messages", full)  # no error code: a bug
    assert b"NO [SERVERBUG]" in c.cmd("APPEND INBOX {12+}\r\nSubject: x\r\n")
