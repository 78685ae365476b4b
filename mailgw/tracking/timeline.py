"""Per-message timelines read from the tracking database: the JSON of ``mailgw track --json``
and of ``GET /api/v1/tracking``, and the readable text of ``mailgw track``."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from mailgw.tracking import store
from mailgw.tracking.store import Event

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?")
_UNITS = {"s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float) -> float:
    """A point in time: a duration ago (``2h``, ``30m``, ``1d``, ``90`` seconds), an ISO
    date (``2026-12-06``, ``2026-12-06T03:00``, local time unless it names a zone) or a Unix
    time (``@1765000000``). ValueError otherwise."""
    from datetime import datetime

    text = text.strip()
    if text.startswith("@"):
        return float(text[1:])
    m = _AGO.fullmatch(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2) or ""]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"expected a time like 2h (ago), 2026-12-06T03:00 or @UNIXTIME, got {text!r}"
        ) from None


def lookup(
    path: str, query: str, since: float | None = None, until: float | None = None
) -> list[dict[str, Any]]:
    """The timelines of the messages ``query`` names (``store.find_queue_ids``), oldest
    first: each ``{queue_id, message_id, sender, recipients, events}``."""
    if not query.strip():
        raise ValueError("empty query: give a queue ID, a Message-ID or an address")
    conn = store.open_readonly(path)
    if conn is None:
        return []
    try:
        ids = store.find_queue_ids(conn, query, since, until)
        events = store.events_for(conn, ids)
    finally:
        conn.close()
    return group(events)


def group(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Events grouped by queue ID into timelines, ordered by their first event."""
    by_id: dict[str, list[Event]] = {}
    for e in events:
        by_id.setdefault(e.queue_id, []).append(e)
    out = []
    for qid, evs in by_id.items():
        evs.sort(key=lambda e: e.time)
        received = next((e for e in evs if e.kind == "received"), None)
        d = received.detail if received is not None else {}
        out.append(
            {
                "queue_id": qid,
                "message_id": d.get("message_id", ""),
                "sender": d.get("sender", ""),
                "recipients": d.get("recipients", []),
                "first": evs[0].time,
                "last": evs[-1].time,
                "status": status(evs),
                "events": [e.to_json() for e in evs],
            }
        )
    out.sort(key=lambda m: m["first"])
    return out


def status(events: Sequence[Event]) -> str:
    """Where the message is, from its last deciding event."""
    for e in reversed(events):
        if e.kind == "deleted":
            return "deleted"
        if e.kind == "rejected":
            return "rejected"
        if e.kind == "expired":
            return "expired"
        if e.kind == "deferred":
            return "deferred"
        if e.kind in ("delivered", "relayed", "bounced"):
            kinds = {x.kind for x in events}
            done = [k for k in ("delivered", "relayed", "bounced") if k in kinds]
            return "+".join(done)
        if e.kind == "queued":
            return "queued"
    return "received"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _addr(a: str) -> str:
    return f"<{a}>"


def describe(event: dict[str, Any]) -> str:
    """One event as the text after its time and kind."""
    kind = event["kind"]
    g = event.get
    if kind == "received":
        parts = [f"via {g('role', '?')}"]
        if g("client"):
            parts.append(f"from {g('client')}")
        if g("helo"):
            parts.append(f"helo={g('helo')}")
        if g("user"):
            parts.append(f"user={g('user')}")
        if g("tls"):
            parts.append("tls")
        parts.append(f"sender={_addr(g('sender', ''))}")
        rcpts = ",".join(_addr(r) for r in g("recipients", []))
        parts.append(f"to={rcpts}")
        parts.append(f"size={g('size', 0)}")
        if g("message_id"):
            parts.append(f"message-id={g('message_id')}")
        if g("session"):
            parts.append(f"session={g('session')}")
        return " ".join(parts)
    if kind == "policy":
        items = []
        for v in g("verdicts", []):
            what = v.get("verdict", "")
            where = v.get("stage", "")
            if v.get("recipient"):
                where += f" {_addr(v['recipient'])}"
            extra = v.get("reply") or v.get("reason") or ""
            items.append(f"{where} {v.get('check', '')}={what}" + (f" ({extra})" if extra else ""))
        return "; ".join(items) or "no checks"
    if kind == "queued":
        return "for the relay: to=" + ",".join(_addr(r) for r in g("recipients", []))
    if kind == "delivered":
        return (
            f"{_addr(g('recipient', ''))} -> mailbox {g('user', '')}"
            f" folder={g('folder', 'INBOX')} uid={g('uid', '')}"
        )
    if kind == "relayed":
        return (
            f"{_addr(g('recipient', ''))} channel={g('channel', '') or '-'}"
            f" mx={g('mx', '') or '-'} tls={'yes' if g('tls') else 'no'} reply={g('reply', '')}"
        )
    if kind == "attempt":
        return (
            f"{_addr(g('recipient', ''))} channel={g('channel', '') or '-'}"
            f" mx={g('mx', '') or '-'} failed ({g('result', '')}): {g('reply', '')}"
        )
    if kind == "deferred":
        rcpts = ",".join(_addr(r) for r in g("recipients", []))
        nxt = g("next_try")
        return (
            f"{rcpts} channel={g('channel', '') or 'local'} attempt={g('attempts', '')}"
            + (f" next try {_when(float(nxt))}" if nxt else "")
            + f": {g('reason', '')}"
        )
    if kind == "bounced":
        rcpts = ",".join(_addr(r) for r in g("recipients", []))
        dsn = f"DSN {g('dsn')} to {_addr(g('to', ''))}" if g("dsn") else "no DSN (null sender)"
        return f"{rcpts}: {g('reason', '')}; {dsn}"
    if kind == "expired":
        rcpts = ",".join(_addr(r) for r in g("recipients", []))
        return f"{rcpts} given up after {float(g('age', 0)):.0f}s in the queue"
    if kind == "rejected":
        rcpts = ",".join(_addr(r) for r in g("recipients", []))
        who = f" user={g('user')}" if g("user") else ""
        return (
            f"at {g('stage', '')} by {g('check', '') or '-'}: {g('reply', '')}"
            f" (via {g('role', '')} from {g('client', '')}{who}"
            f" sender={_addr(g('sender', ''))} to={rcpts})"
        )
    if kind == "deleted":
        return f"from the {g('state', '')} queue by {g('by', 'admin')}"
    rest = {k: v for k, v in event.items() if k not in ("time", "kind", "queue_id")}
    return " ".join(f"{k}={v}" for k, v in rest.items())


def render(timelines: Sequence[dict[str, Any]]) -> str:
    """The readable text of ``timelines``: a heading per message, then one line per step."""
    blocks = []
    for m in timelines:
        head = f"{m['queue_id']}  {m['status']}"
        if m["message_id"]:
            head += f"  message-id {m['message_id']}"
        if m["sender"] or m["recipients"]:
            head += f"\n  from {_addr(m['sender'])} to " + ", ".join(
                _addr(r) for r in m["recipients"]
            )
        lines = [head]
        for e in m["events"]:
            lines.append(f"  {_when(e['time'])}  {e['kind']:<10} {describe(e)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
