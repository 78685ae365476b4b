"""SMTP against slow and hoarding clients: command-progress timeout, DATA minimum rate, and
Postfix-style stress (short idle timeout, one junk command, idle sessions closed at the cap)."""

from __future__ import annotations

from tests.smtp.fakes import Harness

ENVELOPE = "EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"


def test_partial_command_line_must_complete_in_time() -> None:
    h = Harness(command_timeout=60.0, idle_timeout=300.0)
    c = h.connect()
    replies = []
    for _ in range(10):  # one byte every 10 s keeps the idle timer alive...
        replies += c.send(b"N")
        h.clock.advance(10.0)
    # ...but the line was begun 100 s ago: closed at 60 s
    replies += c.lines()
    assert replies == ["421 4.4.2 Command not completed in time, closing connection"]
    assert c.closed


def test_complete_commands_are_not_timed_out() -> None:
    h = Harness(command_timeout=60.0, idle_timeout=300.0)
    c = h.connect()
    for _ in range(10):
        assert c.codes("NOOP\r\n") == ["250"]
        h.clock.advance(50.0)
    assert not c.closed


def test_data_below_the_minimum_rate_gets_421() -> None:
    h = Harness(command_timeout=60.0, min_data_rate=1000, idle_timeout=300.0)
    c = h.connect()
    c.send(ENVELOPE)
    c.lines()
    assert c.codes("DATA\r\n") == ["354"]
    for _ in range(30):  # 100 bytes every 10 s: 10 B/s, far below 1000 B/s
        c.send(b"x" * 98 + b"\r\n")
        h.clock.advance(10.0)
        if c.closed:
            break
    assert "421 4.4.2 Message data arriving too slowly, closing connection" in c.lines()
    assert c.closed and h.messages == []


def test_data_at_a_fair_rate_passes_even_past_the_base_timeout() -> None:
    h = Harness(command_timeout=60.0, min_data_rate=1000, idle_timeout=300.0)
    c = h.connect()
    c.send(ENVELOPE)
    c.lines()
    assert c.codes("DATA\r\n") == ["354"]
    line = b"y" * 1998 + b"\r\n"
    for _ in range(60):  # 2,000 bytes a second for 120 s: above the minimum rate
        c.send(line)
        h.clock.advance(1.0)
    assert not c.closed
    assert c.codes(".\r\n")[-1] == "250"
    assert len(h.messages) == 1


def test_under_stress_idle_timeout_is_short_and_one_junk_command_is_allowed() -> None:
    h = Harness(max_connections=5, idle_timeout=300.0, stress_idle_timeout=10.0)
    clients = [h.connect(ip=f"192.0.2.{n}") for n in range(4)]  # 4 of 5: stressed (80%)
    c = clients[0]
    assert c.codes("NOOP\r\n") == ["250"]
    assert c.send("NOOP\r\n") == ["421 4.7.0 Too many errors, closing connection"]
    assert c.closed
    d = clients[1]
    assert d.codes("EHLO d\r\n")[-1] == "250"
    h.clock.advance(10.0)
    assert d.lines() == ["421 4.4.2 Idle timeout, closing connection"] and d.closed


def test_not_stressed_keeps_the_normal_limits() -> None:
    h = Harness(max_connections=50, idle_timeout=300.0, stress_idle_timeout=10.0)
    c = h.connect()
    for _ in range(5):
        assert c.codes("NOOP\r\n") == ["250"]
    h.clock.advance(200.0)
    assert not c.closed


def test_at_the_cap_idle_sessions_make_room_for_a_newcomer() -> None:
    h = Harness(max_connections=4, max_connections_per_ip=2, stress_idle_timeout=10.0)
    hoarders = [h.connect(ip=f"192.0.2.{n // 2}") for n in range(4)]
    busy = hoarders[0]
    h.clock.advance(30.0)
    busy.send(b"EHLO bu")  # a command in progress: not idle
    # The last one came in under stress: its idle timeout was the short one.
    assert hoarders[3].lines() == ["421 4.4.2 Idle timeout, closing connection"]
    hoarders[3].protocol.connectionLost()
    assert h.factory.counter.total == 3
    newcomer = h.connect(ip="198.51.100.9")  # one slot left: no sweep needed
    refused_then_admitted = h.connect(ip="198.51.100.10", greet=False)
    assert refused_then_admitted.lines() == ["220 mx.example.test ESMTP mailgw"]
    assert not busy.closed and not newcomer.closed
    for c in hoarders[1:3]:  # idle for 30 s (before the stress began): closed for the newcomer
        assert c.closed
        assert c.lines() == ["421 4.7.0 Server busy, idle session closed; try again later"]
    assert h.factory.counter.total == 3  # the busy hoarder and the two newcomers
    for c in hoarders[1:3]:  # their connectionLost comes later and releases nothing twice
        c.protocol.connectionLost()
    assert h.factory.counter.total == 3


def test_at_the_cap_without_idle_sessions_the_newcomer_is_refused() -> None:
    h = Harness(max_connections=2, stress_idle_timeout=10.0)
    first, second = h.connect(ip="192.0.2.1"), h.connect(ip="192.0.2.2")
    h.clock.advance(5.0)  # idle, but not for stress_idle_timeout yet
    refused = h.connect(ip="198.51.100.9", greet=False)
    assert refused.lines() == ["421 4.7.0 Too many connections, try again later"]
    assert not first.closed and not second.closed
