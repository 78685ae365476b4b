"""ProgressWatch: unfinished input must finish within the timeout plus the rate allowance."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailgw.net.progress import ProgressWatch


def make(timeout: float = 60.0, rate: float = 0.0) -> tuple[Clock, ProgressWatch, list[float]]:
    clock = Clock()
    fired: list[float] = []
    watch = ProgressWatch(clock, timeout, lambda: fired.append(clock.seconds()), rate)
    return clock, watch, fired


def test_unfinished_input_expires_from_its_first_byte() -> None:
    clock, watch, fired = make()
    watch.unfinished(1)
    for _ in range(10):
        clock.advance(10.0)
        watch.unfinished(1)  # more bytes do not restart the clock
    assert fired == [60.0]


def test_finished_input_disarms() -> None:
    clock, watch, fired = make()
    watch.unfinished(10)
    clock.advance(59.0)
    watch.finished()
    clock.advance(120.0)
    assert fired == [] and clock.getDelayedCalls() == []
    watch.unfinished(1)  # a new command: a new clock
    clock.advance(60.0)
    assert fired == [179.0 + 60.0]


def test_bytes_buy_time_at_the_minimum_rate() -> None:
    clock, watch, fired = make(timeout=60.0, rate=1000.0)
    watch.unfinished(0)
    for _ in range(100):  # 2,000 B/s for 100 s: 200 s of allowance
        clock.advance(1.0)
        watch.unfinished(2000)
    assert fired == []
    clock.advance(159.0)
    assert fired == []
    clock.advance(1.0)  # 60 + 200 = 260 s after the start
    assert fired == [260.0]


def test_below_the_rate_expires() -> None:
    clock, watch, fired = make(timeout=60.0, rate=1000.0)
    watch.unfinished(0)
    for _ in range(100):
        clock.advance(1.0)
        watch.unfinished(10)  # 10 B/s: one more second per 100 s
        if fired:
            break
    assert fired and fired[0] < 62.0


def test_zero_timeout_is_off() -> None:
    clock, watch, fired = make(timeout=0.0)
    watch.unfinished(1)
    clock.advance(1e6)
    assert fired == [] and clock.getDelayedCalls() == []
