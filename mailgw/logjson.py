"""The mail log as JSON lines (``[log] format = json``): one object per event, for jq and
log shippers.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``system``, ``text`` (the
classic line's text) and, when the log call knows them, ``queue_id``, ``message_id``,
``session``, ``client``, ``user``, ``event``, taken from the event's fields (log calls may
name them ``qid``, ``msgid``, ``sid``, ``peer`` as the text lines do). A failure adds
``traceback``. IMAP worker processes write the same lines to their stderr; the main process
re-emits their fields (``relayed_fields``), so the main log stays one object per line.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.logger import LogEvent, LogLevel, formatEvent

FIELDS: dict[str, tuple[str, ...]] = {
    "queue_id": ("queue_id", "qid"),
    "message_id": ("message_id", "msgid"),
    "session": ("session", "sid", "session_id"),
    "client": ("client", "peer", "client_ip"),
    "user": ("user",),
    "event": ("event",),
}
"""Output key -> the event fields it is read from, first found wins."""

_EMPTY = ("", "-", None)


def fields_of(event: LogEvent) -> dict[str, str]:
    """The known fields (``FIELDS``) the event carries."""
    out: dict[str, str] = {}
    for key, names in FIELDS.items():
        for name in names:
            value = event.get(name)
            if value not in _EMPTY and not isinstance(value, bool | dict | list):
                out[key] = str(value)
                break
    return out


def level_name(event: LogEvent) -> str:
    name = getattr(event.get("log_level"), "name", None)  # a LogLevel constant
    if isinstance(name, str):
        return name
    return "error" if event.get("isError") else "info"


def to_object(event: LogEvent) -> dict[str, Any] | None:
    """The JSON object of ``event``; None for an event without text."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if not text and failure is None:
        return None
    when = event.get("log_time")
    if not isinstance(when, int | float):
        when = datetime.now(UTC).timestamp()
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    system = event.get("log_system") or event.get("log_namespace") or "-"
    out: dict[str, Any] = {
        "time": stamp.replace("+00:00", "Z"),
        "level": level_name(event),
        "system": str(system),
        "text": text,
    }
    out.update(fields_of(event))
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    return out


def json_line(event: LogEvent) -> str | None:
    """``event`` as one line of JSON (newline included); None for an event without text."""
    obj = to_object(event)
    if obj is None:
        return None
    return json.dumps(obj, ensure_ascii=False, default=str) + "\n"


def relayed_fields(line: str) -> dict[str, Any] | None:
    """A worker's JSON log line as ``{level, line, fields}`` to re-emit in the main process
    (``line`` is the classic ``[system] text``); None when it is not such a line."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return None
    level = LogLevel.levelWithName(obj["level"]) if obj.get("level") in _LEVELS else LogLevel.info
    text = f"[{obj.get('system', '-')}] {obj['text']}"
    if isinstance(obj.get("traceback"), str):
        text += "\n" + obj["traceback"]
    fields = {k: str(obj[k]) for k in FIELDS if obj.get(k) not in _EMPTY}
    return {"level": level, "line": text, "fields": fields}


_LEVELS = {level.name for level in LogLevel.iterconstants()}
