"""The admin API's message tracking route: ``GET /api/v1/tracking?q=QUERY[&since=2h][&until=...]``.

The answer is ``{"query", "since", "until", "messages": [timeline, ...]}`` with the timelines
of ``mailgw.tracking.timeline.lookup`` (the same as ``mailgw track --json``). The route needs
the ``read`` scope (or ``admin``), or no token from an ``[http] allow`` network; a missing
``q`` or a bad ``since``/``until`` is ``400``, tracking not recorded (``[tracking] record =
no``) ``503``; errors are the API's (``mailgw.http.api.router``). The handler runs in the I/O
pool (``blocking``), so the reactor never waits on SQLite. ``tracking_route(path)`` builds it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from mailgw.http.api.router import STR, ApiError, Call, Param, Route, invalid
from mailgw.tracking import timeline

_TIME = {"type": ["number", "null"], "description": "Unix time; null: no bound"}
EVENT = {
    "type": "object",
    "required": ["time", "kind", "queue_id"],
    "properties": {"time": {"type": "number"}, "kind": STR, "queue_id": STR},
    "description": "One step; the other keys depend on the kind (docs/operations.md)",
}
TIMELINE = {
    "type": "object",
    "required": ["queue_id", "message_id", "sender", "recipients", "first", "last", "status"],
    "properties": {
        "queue_id": STR,
        "message_id": STR,
        "sender": STR,
        "recipients": {"type": "array", "items": STR},
        "first": {"type": "number"},
        "last": {"type": "number"},
        "status": STR,
        "events": {"type": "array", "items": EVENT},
    },
}
ANSWER = {
    "type": "object",
    "required": ["query", "since", "until", "messages"],
    "properties": {
        "query": STR,
        "since": _TIME,
        "until": _TIME,
        "messages": {"type": "array", "items": TIMELINE},
    },
}
WHEN = "a duration ago (2h, 30m, 1d), an ISO date (2026-12-06T03:00) or @UNIXTIME"


def tracking_route(path: str | None, clock: Callable[[], float] = time.time) -> Route:
    """The route over the tracking database at ``path`` (None: not recorded, ``503``)."""

    def when(call: Call, name: str, now: float) -> float | None:
        text = call.query.get(name)
        if text is None:
            return None
        try:
            value = timeline.parse_when(text, now)
        except ValueError as e:
            raise invalid(str(e)) from None
        if not math.isfinite(value):
            raise invalid(f"{name}: not a finite time: {text!r}")
        return value

    def track(call: Call) -> dict[str, Any]:
        query = str(call.query.get("q", "")).strip()
        if not query:
            raise invalid("missing q: a queue ID, a Message-ID or an address")
        now = clock()
        since, until = when(call, "since", now), when(call, "until", now)
        if path is None:
            raise ApiError(
                503, "not_recorded", "message tracking is not recorded ([tracking] record = no)"
            )
        messages = timeline.lookup(path, query, since, until)
        return {"query": query, "since": since, "until": until, "messages": messages}

    return Route(
        "GET",
        "/tracking",
        "read",
        track,
        "A message's timeline: every step of the messages a queue ID, Message-ID or address names",
        ANSWER,
        query=(
            Param("q", {"type": "string"}, "a queue ID, a Message-ID or an address", True),
            Param("since", {"type": "string"}, f"only messages seen since then: {WHEN}"),
            Param("until", {"type": "string"}, f"only messages seen until then: {WHEN}"),
        ),
        errors=(503,),
        networks=True,
    )
