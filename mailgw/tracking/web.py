"""``TrackingResource``: ``GET /api/v1/tracking?q=QUERY[&since=2h][&until=...]`` as JSON.

The answer is ``{"query", "since", "until", "messages": [timeline, ...]}`` with the timelines
of ``mailgw.tracking.timeline.lookup`` (the same as ``mailgw track --json``). A missing ``q``
or a bad time is ``400`` with ``{"error": ...}``; other methods ``405``. The lookup runs in a
thread (``run``) so the reactor never waits on SQLite. Access control is the mounting
resource's job (the HTTP role's admin guard).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.python.failure import Failure
from twisted.web import resource, server

from mailgw.tracking import timeline

Lookup = Callable[[str, float | None, float | None], list[dict[str, Any]]]


class TrackingResource(resource.Resource):
    """See the module docstring. ``path``: the tracking database; ``reactor``: whose thread
    pool runs the lookups (``run``, replaceable, defaults to ``deferToThreadPool``)."""

    isLeaf = True

    def __init__(self, path: str, reactor: Any, clock: Callable[[], float] = time.time) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted: untyped
        self.path = path
        self.reactor = reactor
        self.clock = clock

    def _lookup(self, query: str, since: float | None, until: float | None) -> Any:
        return timeline.lookup(self.path, query, since, until)

    def render(self, request: Any) -> bytes | int:  # twisted.web's Request: untyped
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _json(request, 405, {"error": "only GET"})
        result: bytes | int = super().render(request)  # type: ignore[no-untyped-call]
        return result

    def render_GET(self, request: Any) -> bytes | int:
        args = request.args or {}

        def arg(name: bytes) -> str | None:
            values = args.get(name)
            return values[0].decode("utf-8", "replace") if values else None

        query = (arg(b"q") or "").strip()
        now = self.clock()
        try:
            if not query:
                raise ValueError("missing q: a queue ID, a Message-ID or an address")
            since_text, until_text = arg(b"since"), arg(b"until")
            since = timeline.parse_when(since_text, now) if since_text else None
            until = timeline.parse_when(until_text, now) if until_text else None
        except ValueError as e:
            return _json(request, 400, {"error": str(e)})
        pool = self.reactor.getThreadPool()
        d = threads.deferToThreadPool(self.reactor, pool, self._lookup, query, since, until)

        def done(messages: list[dict[str, Any]]) -> None:
            body = {"query": query, "since": since, "until": until, "messages": messages}
            _finish(request, 200, body)

        def failed(failure: Failure) -> None:
            _finish(request, 500, {"error": f"tracking lookup failed: {failure.getErrorMessage()}"})

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


def _json(request: Any, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"


def _finish(request: Any, code: int, body: dict[str, Any]) -> None:
    if getattr(request, "_disconnected", False):
        return
    request.write(_json(request, code, body))
    request.finish()
