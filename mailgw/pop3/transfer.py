"""Streaming a stored message as a POP3 multi-line response: dot-stuffing, TOP, a pull producer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

CHUNK = 64 * 1024


class DotStuffer:
    """Dot-stuffs a byte stream chunk by chunk (RFC 1939 3) and ends it with ``.CRLF``.

    The bytes are sent as stored; only a ``.`` at the start of a line is doubled, whichever
    chunk the line starts in. A stream not ending in CRLF gets one before the terminator.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[:1] == b".":
            out = b"." + out
        self._at_line_start = data.endswith(b"\n")
        self._tail = (self._tail + data)[-2:]
        return out

    def terminator(self) -> bytes:
        if self._tail in (b"", b"\r\n"):
            return b".\r\n"
        return b"\r\n.\r\n"


class TopLimiter:
    """Cuts a message after its header, the blank line and ``body_lines`` body lines (TOP)."""

    def __init__(self, body_lines: int) -> None:
        self._left = body_lines
        self._in_header = True
        self._line_head = b""  # first two bytes of the current, unfinished line
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` to send; sets ``done`` once the limit is reached."""
        if self.done:
            return b""
        pos = 0
        while pos < len(data):
            if not self._in_header and self._left == 0:
                self.done = True
                return data[:pos]
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line_head = (self._line_head + data[pos : pos + 2])[:2]
                break
            head = (self._line_head + data[pos : min(nl, pos + 2)])[:2]
            self._line_head = b""
            pos = nl + 1
            if self._in_header:
                if head in (b"", b"\r"):  # the empty line ending the header
                    self._in_header = False
            else:
                self._left -= 1
        if not self._in_header and self._left == 0:
            self.done = True
        return data


@implementer(IPullProducer)
class MessageSender:
    """Pull producer writing one message (dot-stuffed, terminated) to a consumer.

    ``start()`` registers it and returns a Deferred firing when the terminator has been
    written, or failing with the read error / ConnectionLost if it could not finish. The file
    is closed in every case. ``on_progress`` is called after each chunk (idle timers).
    """

    def __init__(
        self,
        file: IO[bytes],
        consumer: IConsumer,
        body_lines: int | None = None,
        on_progress: Callable[[], None] | None = None,
        chunk_size: int = CHUNK,
    ) -> None:
        self._file = file
        self._consumer = consumer
        self._stuffer = DotStuffer()
        self._limiter = TopLimiter(body_lines) if body_lines is not None else None
        self._on_progress = on_progress
        self._chunk_size = chunk_size
        self._registered = False
        self._finished = False
        self.bytes_read = 0
        self.deferred: Deferred[int] = Deferred()

    def start(self) -> Deferred[int]:
        self._registered = True
        self._consumer.registerProducer(self, False)
        return self.deferred

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            data = self._file.read(self._chunk_size)
        except Exception:
            self._finish(Failure())
            return
        self.bytes_read += len(data)
        last = not data
        if data and self._limiter is not None:
            data = self._limiter.feed(data)
            last = self._limiter.done
        if data:
            self._consumer.write(self._stuffer.feed(data))
        if last:
            self._consumer.write(self._stuffer.terminator())
            self._finish(None)
        elif self._on_progress is not None:
            self._on_progress()

    def stopProducing(self) -> None:
        """The connection is gone: give up without writing anything more."""
        self._registered = False
        self._finish(Failure(ConnectionLost("connection lost while sending a message")))

    def _finish(self, failure: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        with contextlib.suppress(Exception):  # closing a read-only file: nothing to report
            self._file.close()
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()
        result: Any = failure if failure is not None else self.bytes_read
        if failure is not None:
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)
