"""POP3 against slow and idle clients: the login timeout (Dovecot closes sessions with no login
in time), the command-progress timeout (slowloris), the total cap, the growing auth delay."""

from __future__ import annotations

from tests.pop3.pop3_fakes import ALICE, Env


def test_no_login_in_time_closes(env: Env) -> None:
    s = env.session(login_timeout=180.0, idle_timeout=600.0)
    s.take()
    for _ in range(5):  # busy, but never logging in
        s.cmd("CAPA")
        env.clock.advance(35.0)
    assert not s.closed
    env.clock.advance(5.0)
    assert s.take() == b"-ERR Disconnected for inactivity: no login in time\r\n"
    assert s.closed


def test_a_logged_in_session_is_not_hit_by_the_login_timeout(env: Env) -> None:
    s = env.session(login_timeout=180.0, idle_timeout=600.0)
    assert s.login().startswith("+OK")
    env.clock.advance(300.0)
    assert not s.closed


def test_partial_command_line_must_complete_in_time(env: Env) -> None:
    s = env.session(command_timeout=60.0, idle_timeout=600.0, login_timeout=0.0)
    s.take()
    for _ in range(5):
        s.send(b"C")  # each byte resets the idle timer
        env.clock.advance(10.0)
    assert not s.closed
    env.clock.advance(10.0)
    assert s.take() == b"-ERR Command not completed in time, closing connection\r\n"
    assert s.closed


def test_total_cap_refuses_with_its_own_text(env: Env) -> None:
    factory = env.factory(max_connections=2)
    a = env.session("192.0.2.1", factory=factory)
    b = env.session("192.0.2.2", factory=factory)
    c = env.session("192.0.2.3", factory=factory)
    assert not a.closed and not b.closed
    assert c.greeting == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert c.closed


def test_failure_delay_grows_per_address(env: Env) -> None:
    s = env.session()
    s.take()
    waits = []
    for _ in range(3):
        s.send(f"USER {ALICE}\r\nPASS wrong\r\n".encode())
        s.take()
        waited = 0.0
        while not s.take():
            env.clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
    assert waits == [2.0, 4.0, 8.0]
