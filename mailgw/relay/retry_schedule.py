"""Retry schedule of deferred mail: "5m, 10m, 30m, 1h, 2h, 4h" (the last repeats), max age."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")

DEFAULT_DELAYS = "5m, 10m, 30m, 1h, 2h, 4h"
DEFAULT_MAX_AGE = "5d"


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"5m"``, ``"1h"``, ``"5d"``, ``"1w"``, or ``"1h30m"`` → seconds."""
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    for match in _DURATION_RE.finditer(cleaned):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(cleaned):
        raise ValueError(f"invalid duration {text!r} (use e.g. 30s, 5m, 1h, 5d)")
    return total


@dataclass(frozen=True)
class RetrySchedule:
    """Delays between attempts (after attempt n, wait ``delays[n-1]``; the last one repeats)
    and the maximum time a message may stay queued before it is bounced."""

    delays: tuple[float, ...]
    max_age: float

    def __post_init__(self) -> None:
        if not self.delays or any(d <= 0 for d in self.delays):
            raise ValueError("retry delays must be a non-empty list of positive durations")
        if self.max_age <= 0:
            raise ValueError("maximum age must be positive")

    @classmethod
    def parse(cls, delays: str = DEFAULT_DELAYS, max_age: str = DEFAULT_MAX_AGE) -> RetrySchedule:
        """Parse ``"5m, 10m, 1h"`` and ``"5d"``; ValueError says what is wrong."""
        parts = [p for p in re.split(r"[,\s]+", delays.strip()) if p]
        return cls(tuple(parse_duration(p) for p in parts), parse_duration(max_age))

    def delay(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt (0 attempts: no wait)."""
        if attempts <= 0:
            return 0.0
        return self.delays[min(attempts, len(self.delays)) - 1]

    def next_attempt(self, attempts: int, first_queued: float, now: float) -> float | None:
        """When to try again after ``attempts`` failed attempts; None: give up (bounce).

        A message at or past its maximum age gets no further attempt; otherwise the next one
        is ``now + delay``, brought forward to the expiry time so that the last attempt is
        made at the maximum age rather than skipped.
        """
        expires = first_queued + self.max_age
        if now >= expires:
            return None
        return min(now + self.delay(attempts), expires)


DEFAULT_SCHEDULE = RetrySchedule.parse()


def next_attempt(
    attempts: int, first_queued: float, now: float, schedule: RetrySchedule = DEFAULT_SCHEDULE
) -> float | None:
    """``schedule.next_attempt`` with the default schedule (5m … 4h, max age 5d)."""
    return schedule.next_attempt(attempts, first_queued, now)
