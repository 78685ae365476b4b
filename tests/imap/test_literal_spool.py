"""Large APPEND literals are spooled to a temporary file as they arrive (issue 10): the
reader keeps at most one input chunk of them in memory, the store copies them in chunks, and
the files are deleted once the APPEND is answered (or the connection is gone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailgw.imap.literal import SpooledLiteral, open_spool
from mailgw.imap.parser import Command, CommandReader, LiteralFile, NeedContinuation, String
from tests.imap.imap_env import Env


def message(n: int, size: int) -> bytes:
    head = f"From: a@x.test\r\nSubject: big {n}\r\n\r\n".encode()
    line = (b"%d" % n) * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def test_spooled_literal_file(tmp_path: Path) -> None:
    spool = open_spool(str(tmp_path / "tmp"), 10)
    assert (tmp_path / "tmp").is_dir() and os.listdir(tmp_path / "tmp") == []  # unnamed
    spool.write(b"01234")
    with pytest.raises(ValueError):
        spool.finish()  # not all there yet
    spool.write(b"56789")
    with pytest.raises(ValueError):
        spool.write(b"x")  # beyond the announced size
    spool.finish()
    assert len(spool) == 10 and spool
    assert spool.read(4) == b"0123" and spool.read() == b"456789"
    assert spool.getvalue() == b"0123456789"
    spool.close()
    assert spool.closed


def test_unusable_directory_falls_back_to_the_system_temp_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = open_spool(str(blocker / "tmp"), 3)
    spool.write(b"abc")
    spool.finish()
    assert spool.getvalue() == b"abc"
    spool.close()


def spooling_reader(tmp_path: Path, made: list[SpooledLiteral]) -> CommandReader:
    reader = CommandReader(max_line=8192)

    def spool(size: int) -> SpooledLiteral:
        made.append(open_spool(str(tmp_path), size))
        return made[-1]

    reader.spool = spool
    reader.spool_above = 1000
    return reader


def test_reader_spools_append_literals_above_the_threshold(tmp_path: Path) -> None:
    made: list[SpooledLiteral] = []
    reader = spooling_reader(tmp_path, made)
    big, small = message(1, 300_000), message(2, 500)
    events = reader.feed(b"a1 APPEND INBOX (\\Seen) {%d}\r\n" % len(big))
    assert isinstance(events[0], NeedContinuation)
    peak = 0
    for i in range(0, len(big), 65536):  # as the transport delivers it
        assert reader.feed(big[i : i + 65536]) == []
        peak = max(peak, reader.buffered)
    assert peak == 0  # nothing of it is held in memory
    events = reader.feed(b" {%d+}\r\n" % len(small) + small + b"\r\n")
    assert len(events) == 1 and isinstance(events[0], Command)
    first, second = events[0].args[2], events[0].args[3]
    assert isinstance(first, LiteralFile) and first.file.getvalue() == big
    assert isinstance(second, String) and second.value == small  # under the threshold
    assert len(made) == 1


def test_reader_spools_only_append(tmp_path: Path) -> None:
    made: list[SpooledLiteral] = []
    reader = spooling_reader(tmp_path, made)
    text = b"x" * 5000
    events = reader.feed(b"a1 SEARCH TEXT {%d+}\r\n" % len(text) + text + b"\r\n")
    assert isinstance(events[0], Command) and events[0].args[1] == String(text, literal=True)
    assert made == []


def test_reader_close_deletes_a_literal_being_spooled(tmp_path: Path) -> None:
    made: list[SpooledLiteral] = []
    reader = spooling_reader(tmp_path, made)
    reader.feed(b"a1 APPEND INBOX {5000+}\r\n" + b"x" * 100)
    assert len(made) == 1 and not made[0].closed
    reader.close()
    assert made[0].closed
    # a refused continuation also drops it
    reader = spooling_reader(tmp_path, made)
    reader.feed(b"a2 APPEND INBOX {5000}\r\n")
    reader.cancel_literal()
    assert made[1].closed


@pytest.fixture
def spool_env(tmp_path: Path) -> Env:
    return Env(tmp_path, literal_memory_max=1024)


def track(env: Env, monkeypatch: pytest.MonkeyPatch) -> list[SpooledLiteral]:
    made: list[SpooledLiteral] = []
    original = env.factory.spool_literal

    def spool(size: int) -> SpooledLiteral:
        made.append(original(size))
        return made[-1]

    monkeypatch.setattr(env.factory, "spool_literal", spool)
    return made


def test_multiappend_from_spooled_literals(spool_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    made = track(spool_env, monkeypatch)
    client = spool_env.connect(login="alice@example.test")
    bodies = [message(1, 200_000), message(2, 300), message(3, 150_000)]
    data = b"a1 APPEND INBOX"
    for body in bodies:
        data += b" (\\Flagged) {%d+}\r\n" % len(body) + body
    out = client.send(data + b"\r\n")
    assert b"a1 OK [APPENDUID" in out
    assert len(made) == 2 and all(spool.closed for spool in made)  # deleted after the APPEND
    client.cmd("SELECT INBOX")
    for seq, body in enumerate(bodies, 1):
        out = client.cmd(f"FETCH {seq} BODY.PEEK[]")
        assert b"{%d}\r\n" % len(body) + body + b")\r\n" in out


def test_failed_append_deletes_the_spooled_literals(
    spool_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = track(spool_env, monkeypatch)
    client = spool_env.connect(login="alice@example.test")
    body = message(1, 50_000)
    out = client.send(b"a1 APPEND Nowhere {%d+}\r\n" % len(body) + body + b"\r\n")
    assert b"a1 NO [TRYCREATE]" in out
    assert len(made) == 1 and made[0].closed
    # an empty message next to a spooled one: refused, files deleted
    out = client.send(b"a2 APPEND INBOX {%d+}\r\n" % len(body) + body + b" {0+}\r\n\r\n")
    assert b"a2 NO [CANNOT]" in out
    assert len(made) == 2 and made[1].closed


def test_connection_lost_in_a_literal_deletes_it(
    spool_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = track(spool_env, monkeypatch)
    client = spool_env.connect(login="alice@example.test")
    client.send(b"a1 APPEND INBOX {100000+}\r\n" + b"x" * 5000)
    assert len(made) == 1 and not made[0].closed
    client.close()
    assert made[0].closed


def test_no_spooling_before_login(spool_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    made = track(spool_env, monkeypatch)
    client = spool_env.connect()
    client.send(b"a1 APPEND INBOX {2000+}\r\n" + b"x" * 2000 + b"\r\n")
    assert made == []


def test_literals_of_one_command_are_bounded_in_total(tmp_path: Path) -> None:
    made: list[SpooledLiteral] = []
    reader = spooling_reader(tmp_path, made)
    reader.max_command_literals = 10_000
    events = reader.feed(b"a1 APPEND INBOX {6000+}\r\n" + b"x" * 6000 + b" {6000}\r\n")
    assert len(events) == 1 and events[0].code == "TOOBIG"  # type: ignore[union-attr]
    # a new command starts from zero
    events = reader.feed(b"a2 APPEND INBOX {6000+}\r\n" + b"x" * 6000 + b"\r\n")
    assert isinstance(events[0], Command)


def test_multiappend_beyond_the_quota_is_refused_before_reading(
    spool_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool_env.directory.quotas["alice@example.test"] = 100_000
    made = track(spool_env, monkeypatch)
    client = spool_env.connect(login="alice@example.test")
    body = message(1, 60_000)
    out = client.send(b"a1 APPEND INBOX {%d+}\r\n" % len(body) + body + b" {%d}\r\n" % len(body))
    assert b"a1 NO [TOOBIG]" in out
    assert len(made) == 1 and made[0].closed  # the first literal's file is gone too
    assert b"NOOP completed" in client.cmd("NOOP")  # the session goes on


def test_invalid_append_arguments_delete_the_spooled_literals(
    spool_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = track(spool_env, monkeypatch)
    client = spool_env.connect(login="alice@example.test")
    body = message(1, 60_000)
    # a literal, then an argument that is not a message literal
    out = client.send(b"a1 APPEND INBOX {%d+}\r\n" % len(body) + body + b" (\\Seen)\r\n")
    assert b"a1 BAD" in out
    # unbalanced parentheses after a literal
    out = client.send(b"a2 APPEND INBOX {%d+}\r\n" % len(body) + body + b" (\r\n")
    assert b"a2 BAD" in out
    assert len(made) == 2 and all(spool.closed for spool in made)
