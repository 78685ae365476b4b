"""The mail log filter: Twisted's start/stop noise goes, everything else stays."""

from __future__ import annotations

import io

from twisted.application.service import Application
from twisted.internet.protocol import Factory
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python import log as legacy

from mailgw.maillog import (
    BatchedFileLogObserver,
    ClassicLineFormatter,
    is_noise,
    use_mail_log,
    without_noise,
)


def legacy_event(text: str) -> dict[str, object]:
    return {"message": (text,), "isError": 0, "system": "-", "log_format": "{log_text}"}


def test_noise() -> None:
    assert is_noise({"log_format": "Starting factory {factory!r}", "factory": object()})
    assert is_noise({"log_format": "Stopping factory {factory!r}", "factory": object()})
    assert is_noise(legacy_event("_NotAccepting starting on 8143"))
    assert is_noise(legacy_event("SubmissionFactory (TLS) starting on 8465"))
    assert is_noise(legacy_event("(TCP Port 8025 Closed)"))
    assert is_noise(legacy_event("(UDP Port 40000 Closed)"))
    assert is_noise(legacy_event("Starting protocol <twisted.names.dns.X object at 0x7f>"))


def test_not_noise() -> None:
    assert not is_noise({"log_format": "{role} listening on {address}", "role": "mx"})
    assert not is_noise({"log_format": "{qid} starting on {x}", "qid": "Q", "x": "1"})
    assert not is_noise(legacy_event("Received SIGTERM, shutting down."))
    assert not is_noise(legacy_event("Main loop terminated."))
    assert not is_noise({**legacy_event("X starting on 1"), "isError": 1})


def test_without_noise_filters_real_events() -> None:
    seen: list[str] = []
    publisher = LogPublisher()
    publisher.addObserver(without_noise(lambda e: seen.append(formatEvent(e))))
    logger = Logger(observer=publisher)
    factory = Factory()
    factory._log = logger  # type: ignore[attr-defined]
    logger.info("Starting factory {factory!r}", factory=factory)
    logger.info("mx listening on {address}", address="127.0.0.1:8025")
    logger.emit(LogLevel.warn, "something {what}", what="odd")
    assert seen == ["mx listening on 127.0.0.1:8025", "something odd"]


def test_legacy_observer_is_wrapped() -> None:
    """syslog's observer is a legacy one (an event dict with ``message``): it is adapted."""
    lines: list[str] = []
    observer = without_noise(lambda event: lines.append(legacy.textFromEventDict(event) or ""))
    assert ILogObserver.providedBy(observer)
    Logger(observer=observer).info("mx listening on {address}", address="127.0.0.1:8025")
    Logger(observer=observer).info("Starting factory {factory!r}", factory=Factory())
    assert lines == ["mx listening on 127.0.0.1:8025"]


def test_use_mail_log_sets_the_application_observer(tmp_path) -> None:
    app = Application("mailgw")
    path = tmp_path / "twistd.log"
    use_mail_log(app, {"logfile": str(path), "nodaemon": True, "syslog": False, "logger": None})
    observer = app.getComponent(ILogObserver)
    assert observer is not None
    Logger(observer=observer).info("MXFactory starting on 8025")  # new-style: kept
    observer(legacy_event("MXFactory starting on 8025"))  # Twisted's legacy line: dropped
    Logger(observer=observer).info("mx listening on 127.0.0.1:8025")
    text = path.read_text()
    assert text.count("starting on") == 1 and "mx listening on 127.0.0.1:8025" in text


def test_use_mail_log_leaves_other_choices_alone() -> None:
    app = Application("mailgw")
    use_mail_log(app, {"logger": "some.factory"})
    assert app.getComponent(ILogObserver) is None
    mine = without_noise(io.StringIO().write)
    app.setComponent(ILogObserver, mine)
    use_mail_log(app, {"logfile": "-", "nodaemon": True})
    assert app.getComponent(ILogObserver) is mine
    use_mail_log(object(), {})  # not an application: nothing to do


def test_classic_line_formatter_writes_twisteds_lines() -> None:
    """The cached-time formatter gives the very lines of twistd's text observer, across
    second boundaries, for multi-line texts, events without time and without text."""
    fmt = ClassicLineFormatter()
    events = [
        {"log_format": "{a} {b}", "a": 1, "b": "x", "log_namespace": "mailgw.relay"},
        {"log_format": "two\nlines", "log_system": "mx,3,127.0.0.1"},
        {"log_format": "no time", "log_level": LogLevel.warn},
        {"log_format": "", "log_time": 1.0},
        {"message": ("legacy",), "log_format": "{log_text}", "log_text": "legacy"},
        {"log_format": "{q}: {r!r} {n:>5} {d[k]}", "q": "Q1", "r": "x", "n": 7, "d": {"k": 2}},
        {"log_format": "{missing} key", "log_namespace": "mailgw.smtp"},
        {"log_format": "{f()} called", "f": lambda: "was"},
        {"log_format": "{0} positional", "log_system": 5},
        {"log_format": "{a}", "a": "", "log_level": LogLevel.error},
    ]
    start = 1_765_000_000.0
    for i in range(12):
        for event in events:
            event = dict(event)
            if event.get("log_format") != "no time":
                event["log_time"] = start + i * 0.45
            assert fmt(event) == formatEventAsClassicLogText(event), event


def test_use_mail_log_text_lines_have_the_time_and_system(tmp_path) -> None:
    app = Application("mailgw")
    path = tmp_path / "twistd.log"
    use_mail_log(app, {"logfile": str(path), "nodaemon": True, "syslog": False, "logger": None})
    observer = app.getComponent(ILogObserver)
    Logger(namespace="mailgw.relay", observer=observer).info("{line}", line="Q1 result=ok")
    [line] = path.read_text().splitlines()
    expected = formatEventAsClassicLogText(
        {"log_format": "Q1 result=ok", "log_namespace": "mailgw.relay", "log_level": LogLevel.info}
    )
    assert line.endswith(expected.split(" ", 1)[1].rstrip("\n"))
    assert line[:4].isdigit() and line[10] == "T"


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_batched_observer_writes_one_iterations_lines_at_once() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    reactor.running = True
    out = CountingFile()
    observer = BatchedFileLogObserver(out, lambda e: e["log_format"] + "\n", reactor, 100)
    for i in range(3):
        observer({"log_format": f"line {i}"})
    assert out.getvalue() == "" and len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)  # the end of the reactor iteration
    assert out.getvalue() == "line 0\nline 1\nline 2\n" and out.writes == 1
    observer({"log_format": "x" * 120})  # past max_bytes: at once
    assert out.getvalue().endswith("x" * 120 + "\n") and out.writes == 2
    observer({"log_format": "last"})
    for trigger, args, kwargs in reactor.triggers["after"]["shutdown"]:
        trigger(*args, **kwargs)
    assert out.getvalue().endswith("last\n") and out.writes == 3
    reactor.advance(0)  # the pending call finds nothing left
    assert out.writes == 3
    reactor.running = False
    observer({"log_format": "not running"})  # before start / after stop: at once
    assert out.getvalue().endswith("not running\n") and out.writes == 4


def test_a_line_logged_while_a_batch_is_written_does_not_deadlock() -> None:
    """twistd's SIGTERM handler logs from the main thread, possibly in the middle of a
    ``flush`` there: the observer is entered again by the same thread (it once waited for
    itself forever, and so did every pool thread that logged afterwards). A line from
    another thread meanwhile is not kept waiting for the write either."""
    import threading

    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    reactor.running = True
    reactor.callFromThread = lambda f, *a, **kw: reactor.callLater(0, f, *a, **kw)  # type: ignore[attr-defined]
    observer: BatchedFileLogObserver

    class InterruptedFile(CountingFile):
        def write(self, text: str) -> int:
            if text == "first\n":  # the "signal" arrives during this write
                observer({"log_format": "from the signal handler"})
                other = threading.Thread(target=observer, args=({"log_format": "other"},))
                other.start()
                other.join(10)
                assert not other.is_alive(), "the other thread's line waits for the write"
            return super().write(text)

    out = InterruptedFile()
    observer = BatchedFileLogObserver(out, lambda e: e["log_format"] + "\n", reactor, 100)
    observer({"log_format": "first"})
    flusher = threading.Thread(target=observer.flush, daemon=True)
    flusher.start()
    flusher.join(10)
    assert not flusher.is_alive(), "the observer waited for itself"
    reactor.advance(0)  # the reactor's turn: the lines logged meanwhile are written
    assert out.getvalue().splitlines() == ["first", "from the signal handler", "other"]


def test_batched_lines_are_written_before_the_reactor_waits_for_io() -> None:
    from twisted.internet.testing import MemoryReactorClock

    out = CountingFile()

    class PollingReactor(MemoryReactorClock):
        """A memory reactor with a ``doIteration`` that notes what the log file held."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def doIteration(self, delay: float | None) -> None:
            self.seen.append(out.getvalue())

    reactor = PollingReactor()
    reactor.running = True
    observer = BatchedFileLogObserver(out, lambda e: e["log_format"] + "\n", reactor)
    observer({"log_format": "queued"})
    observer({"log_format": "delivered"})
    assert out.getvalue() == "" and not reactor.getDelayedCalls()  # no callLater needed
    reactor.doIteration(0)
    assert reactor.seen == ["queued\ndelivered\n"] and out.writes == 1
    other = CountingFile()
    BatchedFileLogObserver(other, lambda e: e["log_format"] + "\n", reactor)  # hooked once
    reactor.doIteration(0)
    assert len(reactor.seen) == 2 and out.writes == 1 and other.writes == 0
