"""CommandLoop: units are handled strictly in order, nothing while the session is busy or
closing, reentrant runs return at once, and reading pauses above the backlog limit only while
busy and resumes once the backlog is at most the limit."""

from __future__ import annotations

from mailgw.net.commandloop import CommandLoop


class Session:
    """Lines off a byte buffer; ``WAIT`` makes the session busy, ``FINISH`` ends the busy
    spell from inside the handler (a Deferred that has already fired)."""

    def __init__(self, limit: int = 10) -> None:
        self.buffer = b""
        self.handled: list[bytes] = []
        self.events: list[str] = []
        self.closing = False
        self.loop: CommandLoop[bytes] = CommandLoop(
            self.take,
            self.handle,
            lambda: len(self.buffer),
            lambda: self.closing,
            lambda: self.events.append("pause"),
            lambda: self.events.append("resume"),
            limit,
        )

    def take(self) -> bytes | None:
        line, nl, rest = self.buffer.partition(b"\n")
        if not nl:
            return None
        self.buffer = rest
        return line

    def handle(self, line: bytes) -> None:
        self.handled.append(line)
        if line == b"WAIT":
            self.loop.busy = True
        elif line == b"FINISH":
            self.loop.busy = True
            self.done()
        elif line == b"QUIT":
            self.closing = True

    def receive(self, data: bytes) -> None:
        self.buffer += data
        self.loop.run()

    def done(self) -> None:
        self.loop.busy = False
        self.loop.run()


def test_in_order_and_partial_lines_wait() -> None:
    s = Session()
    s.receive(b"A\nB\nC")
    assert s.handled == [b"A", b"B"] and s.buffer == b"C"
    s.receive(b"\n")
    assert s.handled == [b"A", b"B", b"C"]
    assert s.events == []


def test_busy_holds_later_input_until_done() -> None:
    s = Session()
    s.receive(b"WAIT\nX\nY\n")
    assert s.handled == [b"WAIT"] and s.buffer == b"X\nY\n"
    s.receive(b"Z\n")
    assert s.handled == [b"WAIT"]
    s.done()
    assert s.handled == [b"WAIT", b"X", b"Y", b"Z"] and not s.loop.busy


def test_done_from_inside_a_handler_goes_on_once() -> None:
    s = Session()
    s.receive(b"FINISH\nA\nFINISH\nB\n")
    assert s.handled == [b"FINISH", b"A", b"FINISH", b"B"]


def test_closing_stops_handling() -> None:
    s = Session()
    s.receive(b"A\nQUIT\nB\n")
    assert s.handled == [b"A", b"QUIT"] and s.buffer == b"B\n"
    s.receive(b"WAIT\n" * 20)
    assert s.handled == [b"A", b"QUIT"] and s.events == []  # no pause once closing


def test_backlog_pauses_reading_while_busy_and_resumes() -> None:
    s = Session(limit=10)
    s.receive(b"WAIT\n12345\n")  # 6 bytes wait: below the limit
    assert s.events == []
    s.receive(b"67890\n")  # 12 bytes
    assert s.events == ["pause"] and s.loop.paused
    s.receive(b"more\n")
    assert s.events == ["pause"]  # paused once
    s.done()
    assert s.events == ["pause", "resume"] and not s.loop.paused
    assert s.handled == [b"WAIT", b"12345", b"67890", b"more"]


def test_resume_when_backlog_falls_to_the_limit_while_still_busy() -> None:
    s = Session(limit=10)
    s.receive(b"WAIT\nWAIT\n0123456789\n")  # 16 bytes behind the first WAIT
    assert s.events == ["pause"]
    s.done()  # the second WAIT runs; 11 bytes still wait: stay paused
    assert s.events == ["pause"] and s.handled == [b"WAIT", b"WAIT"]
    s.buffer = s.buffer[1:]  # 10 bytes: at the limit
    s.loop.run()
    assert s.events == ["pause", "resume"]


def test_an_unfinished_unit_does_not_pause_when_idle() -> None:
    s = Session(limit=10)
    s.receive(b"x" * 50)  # one long unfinished line: the session bounds it, not the loop
    assert s.events == [] and s.handled == []
