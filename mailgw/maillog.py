"""The mail log: twistd's log without Twisted's internal noise (factory and port start/stop lines
naming Python objects), so that every line left is one a mail administrator reads."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    PredicateResult,
    eventAsText,
    formatTime,
)
from twisted.logger._format import _formatSystem
from twisted.python.compat import ioType
from twisted.python.components import Componentized
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

_NOISY_FORMATS = frozenset(
    {
        "Starting factory {factory!r}",  # twisted.internet.protocol.Factory.doStart
        "Stopping factory {factory!r}",
        # ClientService (txredisapi's reconnecting Redis connections): the gateway state logs
        # "Redis unreachable" once instead of every attempt
        "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
    }
)
_NOISY_LEGACY = re.compile(
    r".+ starting on \S+"  # tcp/udp/unix Port.startListening: "MXFactory starting on 8025"
    r"|\((?:TCP |UDP |UNIX )?Port \S+ Closed\)"  # Port.connectionLost
    r"|(?:Starting|Stopping) protocol <.*>"  # AbstractDatagramProtocol.doStart/doStop
    r"|Discarding dead connection\.|txredisapi: Can't get address from Sentinel: .*",
    re.DOTALL,
)


def is_noise(event: LogEvent) -> bool:
    """Whether ``event`` is one of Twisted's internal start/stop lines (``Starting factory
    <... object at 0x...>``, ``_NotAccepting starting on 8143``, ``(TCP Port 8025 Closed)``)."""
    if event.get("log_format") in _NOISY_FORMATS:
        return True
    message = event.get("message")
    if message and "format" not in event and not event.get("isError"):  # legacy log.msg
        text = " ".join(str(part) for part in message)
        return _NOISY_LEGACY.fullmatch(text) is not None
    return False


class ClassicLineFormatter:
    """Twisted's classic text line (``formatEventAsClassicLogText``: ``TIME [SYSTEM] TEXT``
    with an RFC 3339 time to the second), with the time text computed once per second:
    formatting the time with its local offset is most of the cost of a log line (measured:
    about 80 µs of 120 µs for a one-field line)."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        text = self._fast(event)
        if text is None:
            text = eventAsText(event, formatTime=self._time)
        if not text:
            return None
        return text.replace("\n", "\n\t") + "\n"

    def _fast(self, event: LogEvent) -> str | None:
        """``eventAsText``'s line for a plain event (a text format without Twisted's
        ``{name()}`` call syntax, no failure, not flattened) through ``str.format_map``:
        the same text without ``string.Formatter``'s Python-level parsing, which was most
        of a mail log line's cost. None for any other event, or when formatting fails (the
        general path then writes Twisted's "Unable to format event" text)."""
        fmt = event.get("log_format")
        if type(fmt) is not str or "()" in fmt or "log_failure" in event:
            return None
        if "log_flattened" in event:
            return None
        try:
            text = fmt.format_map(event)
        except Exception:
            return None
        if not text:
            return ""
        return f"{self._time(event.get('log_time'))} [{_formatSystem(event)}] {text}"


@implementer(ILogObserver)
class BatchedFileLogObserver:
    """``FileLogObserver`` that writes the lines of one reactor iteration with one
    ``write`` and ``flush``: a busy relay logs a line per delivery, and one write system
    call per line was about a tenth of its reactor thread's time under load. The batch is
    written before the reactor next waits for I/O (``_flush_before_each_poll``; a reactor
    without ``doIteration``, such as a test's memory reactor: ``callLater(0)``; from
    another thread through ``callFromThread``), before a reply sent past the reactor
    (``flush_pending``), at once when it passes ``max_bytes``, and at shutdown. So a line
    reaches the file within one iteration of the reactor, and before any reply the reactor
    sends after it was logged (a client that read the reply finds the line in the log)."""

    def __init__(
        self,
        out_file: IO[Any],
        format_event: Callable[[LogEvent], str | None],
        reactor: Any,
        max_bytes: int = 64 * 1024,
    ) -> None:
        self.out_file = out_file
        self.format_event = format_event
        self.reactor = reactor
        self.max_bytes = max_bytes
        self._encoding = None if ioType(out_file) is str else "utf-8"
        self._lines: list[str] = []
        self._size = 0
        # Re-entrant, and no I/O under ``_lock``: a signal handler (twistd's SIGTERM log
        # line) runs in the main thread, possibly in the middle of a ``flush`` there; with a
        # plain lock it waited for itself forever, and every thread that logged after it.
        self._lock = threading.RLock()
        """Guards ``_lines`` and ``_size`` (held briefly, never while writing)."""
        self._write_lock = threading.RLock()
        """Held while a batch is taken and written, so batches reach the file in order."""
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        self._flushed_before_poll = _flush_before_each_poll(reactor)
        if self._flushed_before_poll:  # a real reactor (not a test's memory one)
            _batched.append(self)

    def __call__(self, event: LogEvent) -> None:
        text = self.format_event(event)
        if not text:
            return
        with self._lock:
            first = not self._lines
            self._lines.append(text)
            self._size += len(text)
            full = self._size >= self.max_bytes
        if full or not self.reactor.running:
            self.flush()
        elif first:
            if not isInIOThread():
                self.reactor.callFromThread(self.flush)
            elif not self._flushed_before_poll:
                self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write and flush what is pending."""
        with self._write_lock:
            with self._lock:
                lines, self._lines, self._size = self._lines, [], 0
            if not lines:
                return
            text = "".join(lines)
            if self._encoding is None:
                self.out_file.write(text)
            else:
                self.out_file.write(text.encode(self._encoding))
            self.out_file.flush()


_batched: list[BatchedFileLogObserver] = []
"""The batched observers of this process (one, the mail log's, in a running server; kept for
the life of the process: a list, not a WeakSet, since it is read before every reply)."""


def flush_pending() -> None:
    """Write the pending lines of every batched observer now, on the reactor thread, before
    a reply that bypasses the reactor's write buffering (``mailgw.net.directwrite``): a line
    logged before a reply reaches the file before the reply reaches the client. Replies sent
    through ``transport.write`` need nothing: the reactor sends them on a later turn, after
    the batch is written. A check of a list when nothing is pending."""
    for observer in _batched:
        if observer._lines:
            observer.flush()


def _flush_before_each_poll(reactor: Any) -> bool:
    """Make ``reactor`` call ``flush_pending`` each time before it waits for I/O (its
    ``doIteration``, once per reactor), so lines logged in a reactor iteration are written
    before the replies of that iteration are sent (the reactor sends buffered writes in
    ``doIteration``). False when the reactor has no ``doIteration``."""
    if getattr(reactor, "_mailgw_flushes_log", False):
        return True
    poll = getattr(reactor, "doIteration", None)
    if poll is None:
        return False

    def flush_then_poll(delay: float | None) -> None:
        flush_pending()
        poll(delay)

    reactor.doIteration = flush_then_poll
    reactor._mailgw_flushes_log = True
    return True


def _predicate(event: LogEvent) -> PredicateResult:
    return PredicateResult.no if is_noise(event) else PredicateResult.maybe


def without_noise(observer: Any) -> ILogObserver:
    """``observer`` (new-style, or a legacy one such as syslog's) minus ``is_noise`` events."""
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return cast(
        ILogObserver, FilteringLogObserver(observer, [cast(ILogFilterPredicate, _predicate)])
    )


def use_mail_log(
    application: object,
    twistd_options: Mapping[str, Any],
    log_format: str = "text",
    reactor: Any = None,
) -> None:
    """Make twistd log ``application`` through ``without_noise``: the log observer twistd
    would make itself from ``twistd_options`` (``--logfile``, ``--syslog``, stdout with
    ``-n``; SIGUSR1 reopens the file), set as the application's ``ILogObserver``, which
    twistd prefers. ``log_format`` ``json``: the same file gets JSON lines
    (``mailgw.logjson``; syslog keeps text). With ``reactor``, a file's lines are written
    once per reactor iteration (``BatchedFileLogObserver``). Nothing changes when
    ``--logger`` names another observer factory, or when the application already has one
    (a .tac file's)."""
    if not isinstance(application, Componentized) or twistd_options.get("logger"):
        return
    if application.getComponent(ILogObserver, None) is not None:
        return
    from twisted.scripts.twistd import _SomeApplicationRunner  # twistd's runner on this OS

    app_logger = _SomeApplicationRunner.loggerFactory(twistd_options)
    observer = app_logger._getLogObserver()
    if isinstance(observer, FileLogObserver):  # twistd's textFileLogObserver
        format_event: Callable[[LogEvent], str | None] = ClassicLineFormatter()  # same lines
        if log_format == "json":
            from mailgw.logjson import json_line

            format_event = json_line
        if reactor is not None:
            observer = BatchedFileLogObserver(observer._outFile, format_event, reactor)
        else:
            observer = FileLogObserver(observer._outFile, format_event)
    application.setComponent(ILogObserver, without_noise(observer))
