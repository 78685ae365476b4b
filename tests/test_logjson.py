"""JSON log lines (``[log] format = json``): one object per event with the known fields, and
IMAP worker lines relayed as fields by the main process."""

from __future__ import annotations

import io
import json

from twisted.logger import FileLogObserver, Logger, LogLevel, LogPublisher, formatEvent
from twisted.python.failure import Failure

from mailgw.logjson import json_line, relayed_fields


def logged(emit: object) -> list[dict[str, object]]:
    out = io.StringIO()
    publisher = LogPublisher(FileLogObserver(out, json_line))
    log = Logger(namespace="mailgw.test", observer=publisher)
    emit(log)  # type: ignore[operator]
    lines = out.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_fields_under_their_names_and_aliases() -> None:
    [obj] = logged(
        lambda log: log.info(
            "{sid} {qid}: accepted from={sender} peer={peer} message-id={msgid}",
            sid="S1",
            qid="Q1",
            sender="<a@x>",
            peer="192.0.2.1",
            msgid="<m@x>",
            user="alice",
            event="received",
        )
    )
    assert obj["level"] == "info" and obj["system"] == "mailgw.test"
    assert obj["text"] == "S1 Q1: accepted from=<a@x> peer=192.0.2.1 message-id=<m@x>"
    assert obj["time"].endswith("Z") and "T" in obj["time"]
    for key, value in (
        ("session", "S1"),
        ("queue_id", "Q1"),
        ("client", "192.0.2.1"),
        ("message_id", "<m@x>"),
        ("user", "alice"),
        ("event", "received"),
    ):
        assert obj[key] == value


def test_unknown_fields_are_left_out_and_empty_ones_too() -> None:
    [obj] = logged(lambda log: log.warn("x {a}", a=1, user="", queue_id="-"))
    assert set(obj) == {"time", "level", "system", "text"} and obj["level"] == "warn"


def test_a_multiline_failure_is_still_one_line() -> None:
    def emit(log: Logger) -> None:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.failure("{queue_id} delivery failed", Failure(), queue_id="Q9")

    [obj] = logged(emit)
    assert obj["level"] == "critical" and obj["queue_id"] == "Q9"
    assert "ValueError: bad\nthing" in str(obj["traceback"])


def test_worker_lines_are_relayed_as_fields() -> None:
    [obj] = logged(lambda log: log.info("imap {session} login {user}", session="I1", user="bob"))
    relayed = relayed_fields(json.dumps(obj))
    assert relayed is not None
    assert relayed["level"] is LogLevel.info
    assert relayed["line"] == "[mailgw.test] imap I1 login bob"
    assert relayed["fields"] == {"session": "I1", "user": "bob"}
    assert relayed_fields("[IMAP] plain text line") is None
    assert relayed_fields("{not json") is None
    assert relayed_fields('{"no": "text"}') is None


def test_the_pool_re_emits_a_worker_line_with_its_fields() -> None:
    from mailgw.imap.worker_pool import WorkerPool

    seen: list[dict[str, object]] = []
    publisher = LogPublisher(seen.append)
    import mailgw.imap.worker_pool as wp

    original = wp.log
    wp.log = Logger(namespace="mailgw.imap.worker_pool", observer=publisher)
    try:
        worker = type("W", (), {"index": 2, "pid": 4242})()
        line = json.dumps({"level": "warn", "system": "IMAP", "text": "hi", "user": "bob"})
        WorkerPool.log_line(None, worker, line.encode())  # type: ignore[arg-type]
    finally:
        wp.log = original
    [event] = seen
    assert formatEvent(event) == "imap worker 2 (pid 4242): [IMAP] hi"
    assert event["user"] == "bob" and event["log_level"] is LogLevel.warn
