"""The input loop of a session whose commands run strictly in order, one at a time (POP3 with
RFC 2449 PIPELINING; the IMAP session has the same loop over its command reader).

A session buffers what it receives and calls :meth:`CommandLoop.run`: complete units (a
command line, a parsed IMAP event) are taken off the buffer and handled one by one until one
makes the session *busy* — an asynchronous command: a password check, a message being
streamed — or the session is closing. Meanwhile later input stays buffered; once more than
``limit`` bytes wait, reading pauses (``pauseProducing``) until the backlog is worked off, so a
client pipelining without reading cannot make the server buffer without bound. The session
ends a busy spell by clearing ``busy`` and calling ``run`` again.

SMTP has its own loop (``smtp/protocol.py``): it stops reading at once while a policy hook
runs, switches to the DATA reader mid-buffer and holds lines back past its soft error limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CommandLoop(Generic[T]):
    """``take()`` returns the next complete unit off the session's buffer, or None when more
    input is needed; ``handle(unit)`` runs it (and sets ``busy`` when it answers later);
    ``pending()`` is the number of bytes buffered; ``closing()`` says the session is going
    away (nothing more is handled, reading is left alone); ``pause`` and ``resume`` stop and
    restart reading from the transport."""

    def __init__(
        self,
        take: Callable[[], T | None],
        handle: Callable[[T], None],
        pending: Callable[[], int],
        closing: Callable[[], bool],
        pause: Callable[[], None],
        resume: Callable[[], None],
        limit: int,
    ) -> None:
        self._take = take
        self._handle = handle
        self._pending = pending
        self._closing = closing
        self._pause = pause
        self._resume = resume
        self.limit = limit
        self.busy = False
        self.paused = False
        self._running = False

    def run(self) -> None:
        """Handle what is buffered, in order, until the session is busy or input runs out;
        then pause or resume reading. Reentrant calls (a handler that ends up here) return at
        once: the outer call goes on."""
        if self._running:
            return
        self._running = True
        try:
            while not self.busy and not self._closing():
                unit = self._take()
                if unit is None:
                    break
                self._handle(unit)
        finally:
            self._running = False
        self._throttle()

    def _throttle(self) -> None:
        if self._closing():
            return
        # Not busy, the loop took every complete unit: what is left is one unfinished unit,
        # which the session bounds itself (line length, literal size).
        backlog = self._pending() if self.busy else 0
        if not self.paused and backlog > self.limit:
            self.paused = True
            self._pause()
        elif self.paused and backlog <= self.limit:
            self.paused = False
            self._resume()
