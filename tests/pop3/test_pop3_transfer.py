"""Dot-stuffing, TOP cutting and the message pull producer, chunk boundaries included."""

from __future__ import annotations

import io

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport

from mailgw.pop3.transfer import DotStuffer, MessageSender, TopLimiter


def stuff(data: bytes, chunk: int) -> bytes:
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return out + stuffer.terminator()


CASES = [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b"no newline", b"no newline\r\n.\r\n"),
    (b"ends in dot\r\n.", b"ends in dot\r\n..\r\n.\r\n"),
    (b"bare lf\n.x\n", b"bare lf\n..x\n\r\n.\r\n"),
    (b"a.b\r\nx. y\r\n", b"a.b\r\nx. y\r\n.\r\n"),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_dot_stuffing_at_any_chunk_boundary(data: bytes, expected: bytes, chunk: int) -> None:
    assert stuff(data, chunk) == expected


def top(data: bytes, lines: int, chunk: int) -> bytes:
    limiter = TopLimiter(lines)
    out = b""
    for i in range(0, len(data), chunk):
        out += limiter.feed(data[i : i + chunk])
        if limiter.done:
            break
    return out


MESSAGE = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_top_limits_at_any_chunk_boundary(chunk: int) -> None:
    assert top(MESSAGE, 0, chunk) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top(MESSAGE, 1, chunk) == b"A: 1\r\nB: 2\r\n\r\nl1\r\n"
    assert top(MESSAGE, 3, chunk) == MESSAGE
    assert top(MESSAGE, 10, chunk) == MESSAGE
    assert top(b"A: 1\nB: 2\n\nl1\nl2\n", 1, chunk) == b"A: 1\nB: 2\n\nl1\n"
    assert top(b"A: 1\r\nB: 2\r\n", 0, chunk) == b"A: 1\r\nB: 2\r\n"  # no body at all
    assert top(b"A: 1\r\n\r\n\r\n\r\nx\r\n", 2, chunk) == b"A: 1\r\n\r\n\r\n\r\n"


def test_top_limiter_stops_returning_data_once_done() -> None:
    limiter = TopLimiter(0)
    assert limiter.feed(b"A: 1\r\n\r\nbody\r\n") == b"A: 1\r\n\r\n"
    assert limiter.done
    assert limiter.feed(b"more\r\n") == b""


def drive(transport: StringTransport) -> None:
    while transport.producer is not None:
        transport.producer.resumeProducing()


def test_sender_streams_in_chunks_and_fires_with_bytes_read() -> None:
    data = b"line\r\n.dot\r\n" * 1000
    transport = StringTransport()
    progress: list[int] = []
    sender = MessageSender(
        io.BytesIO(data), transport, chunk_size=1000, on_progress=lambda: progress.append(1)
    )
    results: list[int] = []
    sender.start().addCallback(results.append)
    assert transport.producer is sender and transport.streaming is False
    drive(transport)
    assert transport.value() == data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert results == [len(data)]
    assert len(progress) == len(data) // 1000


def test_sender_top_reads_no_further_than_needed() -> None:
    data = b"A: 1\r\n\r\n" + b"x" * 100_000
    source = io.BytesIO(data)
    transport = StringTransport()
    MessageSender(source, transport, body_lines=0, chunk_size=10).start()
    drive(transport)
    assert transport.value() == b"A: 1\r\n\r\n.\r\n"
    assert source.closed


def test_sender_stopped_by_lost_connection() -> None:
    source = io.BytesIO(b"x" * 100)
    transport = StringTransport()
    sender = MessageSender(source, transport, chunk_size=10)
    failures: list[object] = []
    sender.start().addErrback(lambda f: failures.append(f.check(ConnectionLost)))
    sender.resumeProducing()
    sender.stopProducing()
    assert failures == [ConnectionLost] and source.closed
    sender.resumeProducing()  # late calls are ignored
    sender.stopProducing()
    assert transport.value() == b"x" * 10
