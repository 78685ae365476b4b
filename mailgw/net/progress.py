"""Command-progress deadlines (slowloris): unfinished client input — a command line, an SMTP
DATA phase, an IMAP literal — must be finished in time, whatever bytes keep the idle timer
alive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime


class ProgressWatch:
    """Runs ``on_expired`` when input stays unfinished for too long.

    The session calls ``unfinished(n)`` after receiving ``n`` bytes that leave a command (or a
    message, a literal) incomplete, and ``finished()`` once it is complete (or when the server,
    not the client, is what it waits for). The first ``unfinished`` starts the clock: the
    input must be finished within ``timeout`` seconds, plus one second per ``min_rate`` bytes
    received meanwhile (0: no allowance), so a big message sent at a fair rate passes while a
    client trickling a few bytes never finishes in time. ``timeout`` 0 turns it off.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        on_expired: Callable[[], None],
        min_rate: float = 0.0,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.min_rate = min_rate
        self.on_expired = on_expired
        self.started: float | None = None
        self.received = 0
        self._timer: Any = None

    @property
    def running(self) -> bool:
        return self.started is not None

    def deadline(self) -> float | None:
        """When the unfinished input runs out of time (None: nothing unfinished)."""
        if self.started is None:
            return None
        allowance = self.received / self.min_rate if self.min_rate > 0 else 0.0
        return self.started + self.timeout + allowance

    def unfinished(self, received: int = 0) -> None:
        if self.timeout <= 0:
            return
        if self.started is None:
            self.started = self.clock.seconds()
            self.received = 0
            self._timer = self.clock.callLater(self.timeout, self._check)
        self.received += received

    def finished(self) -> None:
        self.started = None
        self.received = 0
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _check(self) -> None:
        self._timer = None
        deadline = self.deadline()
        if deadline is None:
            return
        left = deadline - self.clock.seconds()
        if left > 0:  # bytes arrived meanwhile: they bought more time
            self._timer = self.clock.callLater(left, self._check)
            return
        self.started = None
        self.on_expired()
