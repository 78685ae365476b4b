"""IMAP against slow and idle clients: the login timeout, the command-progress timeout (a
line or a literal trickled in), literals sent at a fair rate, and the growing auth delay."""

from __future__ import annotations

from pathlib import Path

from tests.imap.imap_env import Env


def test_no_login_in_time_closes(tmp_path: Path) -> None:
    env = Env(tmp_path, login_timeout=180.0)
    c = env.connect()
    for _ in range(5):
        c.cmd("CAPABILITY")
        env.clock.advance(35.0)
    assert not c.transport.disconnecting
    env.clock.advance(5.0)
    assert c.take() == b"* BYE Disconnected for inactivity: no login in time\r\n"
    assert c.transport.disconnecting


def test_logged_in_sessions_are_not_hit_by_the_login_timeout(tmp_path: Path) -> None:
    env = Env(tmp_path, login_timeout=180.0)
    c = env.connect(login="alice@example.test")
    env.clock.advance(600.0)
    assert not c.transport.disconnecting


def test_partial_line_must_complete_in_time(tmp_path: Path) -> None:
    env = Env(tmp_path, command_timeout=60.0, login_timeout=0.0)
    c = env.connect()
    for _ in range(5):
        assert c.send(b"a") == b""
        env.clock.advance(10.0)
    assert not c.transport.disconnecting
    env.clock.advance(11.0)  # 60 s, and the allowance of 5 bytes at the minimum rate
    assert c.take() == b"* BYE Command not completed in time\r\n"
    assert c.transport.disconnecting


def test_literal_trickled_in_is_closed_and_a_fair_one_passes(tmp_path: Path) -> None:
    env = Env(tmp_path, command_timeout=60.0, min_data_rate=1000, login_timeout=0.0)
    slow = env.connect(login="alice@example.test")
    assert slow.send(b"s1 APPEND INBOX {100000}\r\n").startswith(b"+ ")
    out = b""
    for _ in range(20):
        if not slow.transport.disconnecting:
            out += slow.send(b"x" * 10)
        env.clock.advance(5.0)
    assert out + slow.take() == b"* BYE Command not completed in time\r\n"
    fair = env.connect(login="alice@example.test")
    assert fair.send(b"f1 APPEND INBOX {200000}\r\n").startswith(b"+ ")
    for _ in range(100):  # 2,000 bytes a second: 100 s, past the 60 s base
        fair.send(b"y" * 2000)
        env.clock.advance(1.0)
    assert not fair.transport.disconnecting
    assert b"f1 OK" in fair.send(b"\r\n")


def test_failure_delay_grows(tmp_path: Path) -> None:
    env = Env(tmp_path)
    c = env.connect()
    waits = []
    for n in range(3):
        c.send(b"l%d LOGIN alice@example.test wrong\r\n" % n)
        waited = 0.0
        while b"NO [AUTHENTICATIONFAILED]" not in c.take():
            env.clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
    assert waits == [2.0, 4.0, 8.0]
