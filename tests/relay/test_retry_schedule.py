"""Retry schedule parsing and next-attempt computation."""

from __future__ import annotations

import pytest

from mailgw.relay.retry_schedule import (
    DEFAULT_SCHEDULE,
    RetrySchedule,
    next_attempt,
    parse_duration,
)


def test_parse_duration() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("30s") == 30
    assert parse_duration(" 5m ") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("5d") == 432000
    assert parse_duration("1w") == 604800
    assert parse_duration("0.5m") == 30
    for bad in ("", "5x", "m5", "5m x", "-5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_default_schedule() -> None:
    assert DEFAULT_SCHEDULE.delays == (300, 600, 1800, 3600, 7200, 14400)
    assert DEFAULT_SCHEDULE.max_age == 5 * 86400


def test_last_delay_repeats() -> None:
    s = RetrySchedule.parse("5m, 10m 1h", "5d")
    assert [s.delay(n) for n in range(0, 6)] == [0, 300, 600, 3600, 3600, 3600]


def test_next_attempt_and_give_up() -> None:
    t0 = 1_000_000.0
    assert next_attempt(1, t0, t0 + 10) == t0 + 310
    assert next_attempt(3, t0, t0 + 3000) == t0 + 3000 + 1800
    assert next_attempt(20, t0, t0 + 86400) == t0 + 86400 + 14400
    # Close to the maximum age the last attempt is brought forward to the expiry time...
    assert next_attempt(20, t0, t0 + 5 * 86400 - 60) == t0 + 5 * 86400
    # ...and at or after it the message is given up.
    assert next_attempt(20, t0, t0 + 5 * 86400) is None
    assert next_attempt(1, t0, t0 + 6 * 86400) is None


def test_custom_schedule_for_tests() -> None:
    s = RetrySchedule.parse("1s,2s", "10s")
    assert s.next_attempt(1, 0.0, 0.0) == 1.0
    assert s.next_attempt(5, 0.0, 9.0) == 10.0
    assert s.next_attempt(5, 0.0, 10.0) is None


def test_invalid_schedules() -> None:
    with pytest.raises(ValueError):
        RetrySchedule.parse("", "5d")
    with pytest.raises(ValueError):
        RetrySchedule.parse("0s", "5d")
    with pytest.raises(ValueError):
        RetrySchedule.parse("5m", "0s")
    with pytest.raises(ValueError):
        RetrySchedule.parse("5 minutes", "5d")
