"""Queue IDs: unique across processes, sortable by arrival time, safe in file names."""

from __future__ import annotations

import os
import re
import time

# Digits then upper-case letters (Crockford's base32 alphabet): ASCII order equals numeric
# order, so sorting IDs as strings sorts them by time.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11  # 55 bits of microseconds since the epoch: enough until the year 3111
PID_CHARS = 5  # 25 bits: covers Linux's largest pid_max (2**22)
LENGTH = TIME_CHARS + PID_CHARS

QUEUE_ID_RE = re.compile(rf"[{ALPHABET}]{{{LENGTH}}}")


def encode(value: int, width: int) -> str:
    """``value`` in base32 (``ALPHABET``), left-padded with zeros to ``width`` characters."""
    if value < 0 or value >= 32**width:
        raise ValueError(f"{value} does not fit in {width} base32 characters")
    out = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the form of a queue ID (so it is safe as a file name)."""
    return QUEUE_ID_RE.fullmatch(text) is not None


class QueueIdGenerator:
    """Makes queue IDs ``<11 chars microsecond time><5 chars pid>``.

    Within one process each ID's time part is strictly greater than the previous one (it is
    bumped by one microsecond when the clock has not moved or went backwards), so IDs never
    repeat; the pid part keeps IDs of concurrent processes apart.
    """

    def __init__(self, pid: int | None = None) -> None:
        self._pid = encode((os.getpid() if pid is None else pid) % 32**PID_CHARS, PID_CHARS)
        self._last = 0

    def next(self) -> str:
        now = time.time_ns() // 1000
        if now <= self._last:
            now = self._last + 1
        self._last = now
        return encode(now, TIME_CHARS) + self._pid
