"""Counters of messages per window for the ``rate`` match of the rules: ``IRateCounter``.

``hit(key, window)`` counts one event for ``key`` now and answers how many events ``key``
had in the last ``window`` seconds, this one included (an int, or a Deferred firing with one:
a shared implementation on Redis answers later). ``MemoryRateCounter`` is the embedded one
(one process): a sliding window of timestamps per key, at most ``cap`` kept per key (the
count saturates there), keys idle for longer than their window forgotten as they are met.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer


class IRateCounter(Interface):
    """Events per key in a sliding window (see the module docstring)."""

    def hit(key: str, window: float) -> int | Deferred[int]:
        """Count one event for ``key`` now; the number of its events in the last
        ``window`` seconds, this one included."""


@implementer(IRateCounter)
class MemoryRateCounter:
    """The embedded ``IRateCounter`` (see the module docstring); ``clock`` has
    ``seconds()`` (the reactor; default: the system time)."""

    def __init__(self, clock: Any = None, cap: int = 100_000, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.cap = cap
        self.max_keys = max_keys
        self._events: dict[str, tuple[float, deque[float]]] = {}

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def hit(self, key: str, window: float) -> int:
        now = self._now()
        entry = self._events.get(key)
        if entry is None:
            if len(self._events) >= self.max_keys:
                self._sweep(now)
            entry = self._events[key] = (window, deque())
        events = entry[1]
        horizon = now - window
        while events and events[0] <= horizon:
            events.popleft()
        events.append(now)
        if len(events) > self.cap:
            events.popleft()
        return len(events)

    def _sweep(self, now: float) -> None:
        """Forget keys without an event in their window (then the oldest half if still
        full: a flood of distinct keys costs memory up to ``max_keys`` only)."""
        stale = [k for k, (w, ev) in self._events.items() if not ev or ev[-1] <= now - w]
        for k in stale:
            del self._events[k]
        if len(self._events) >= self.max_keys:
            oldest = sorted(self._events, key=lambda k: self._events[k][1][-1])
            for k in oldest[: len(oldest) // 2]:
                del self._events[k]


@implementer(IRateCounter)
class StateRateCounter:
    """``IRateCounter`` on the gateway state (``IGatewayState.hit``): with the Redis state,
    a ``rate`` rule counts the messages of every gateway together. Keys are ``rate:KEY``."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def hit(self, key: str, window: float) -> Deferred[int]:
        d: Deferred[int] = self.state.hit("rate:" + key, window)
        return d
