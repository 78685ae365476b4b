"""Queue administration over the spool on disk: list, show, flush, hold, release, delete.

The functions work on the spool directory, from the ``mailgw queue`` command or the admin API,
while the server runs (every change is one rename or one atomic envelope update):

- ``flush``: sets ``next_attempt = 0`` on deferred mail (``retry``: the relay's rescan picks it
  up within ``[relay] scan_interval``; ``deferred``: local delivery's next retry scan).
- ``hold``: parks a queued message in ``hold`` (not while it is ``active``: being sent).
- ``release``: back from ``hold``, due at once: to ``retry`` when every pending recipient is
  outside the local domains (relay mail), else to ``deferred`` (local delivery dispatches it).
- ``delete``: removes envelope and content.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mailgw.spool import CorruptEnvelope, Spool

QUEUE_STATES = ("incoming", "active", "deferred", "outbound", "retry", "hold", "corrupt")


class QueueError(Exception):
    """The queue operation cannot be done (unknown ID, message busy...)."""


def message_row(spool: Spool, queue_id: str, state: str | None = None) -> dict[str, Any]:
    """One queued message as a dict (for ``queue list``/``show`` and the admin API);
    ``state``: where it is expected."""
    return _row(spool, queue_id, state)[0]


def _row(spool: Spool, queue_id: str, state: str | None) -> tuple[dict[str, Any], Any]:
    """``message_row`` and the loaded message (None when its envelope is corrupt)."""
    try:
        m = spool.load(queue_id, state)
    except KeyError:
        raise QueueError(f"{queue_id}: no such queued message") from None
    except CorruptEnvelope as error:
        return {"queue_id": queue_id, "state": "corrupt", "error": str(error)}, None
    e = m.envelope
    try:
        size = m.content_size()
    except OSError:
        size = e.size
    return {
        "queue_id": queue_id,
        "state": m.state,
        "sender": e.sender,
        "recipients": [r for r in e.recipients if r not in e.done],
        "done": list(e.done),
        "size": size,
        "received_at": e.received_at,
        "attempts": e.attempts,
        "next_attempt": e.next_attempt,
        "last_error": e.last_error,
        "protocol": e.protocol,
    }, m


def list_queue(spool: Spool, states: tuple[str, ...] = QUEUE_STATES) -> list[dict[str, Any]]:
    """Every message in ``states``, oldest first."""
    rows = []
    for state in states:
        for queue_id in spool.list(state):
            try:
                rows.append(message_row(spool, queue_id, state))
            except QueueError:
                continue  # gone meanwhile
    return sorted(rows, key=lambda r: r["queue_id"])


def show(spool: Spool, queue_id: str, header_bytes: int = 16 * 1024) -> dict[str, Any]:
    """``message_row`` plus the message's header section."""
    row, m = _row(spool, queue_id, None)
    try:
        with m.open_content() if m is not None else open(spool.content_path(queue_id), "rb") as f:
            head = f.read(header_bytes)
    except OSError:
        head = b""
    end = head.find(b"\r\n\r\n")
    row["headers"] = (head[:end] if end >= 0 else head).decode("utf-8", "replace")
    return row


def _due_now(spool: Spool, queue_id: str) -> None:
    envelope = spool.load(queue_id).envelope
    envelope.next_attempt = 0.0
    spool.update(queue_id, envelope)


def flush(spool: Spool, queue_id: str | None = None) -> list[str]:
    """Make deferred mail (one message or all) due now; returns the IDs flushed."""
    if queue_id is not None:
        state = message_row(spool, queue_id)["state"]
        if state not in ("deferred", "retry"):
            raise QueueError(f"{queue_id}: is {state}, not deferred")
        _due_now(spool, queue_id)
        return [queue_id]
    flushed = []
    for state in ("retry", "deferred"):
        for q in spool.list(state):
            try:
                _due_now(spool, q)
            except (KeyError, ValueError):
                continue
            flushed.append(q)
    return flushed


def hold(spool: Spool, queue_id: str) -> str:
    """Park a message in ``hold``; returns the state it came from."""
    state = message_row(spool, queue_id)["state"]
    if state == "hold":
        raise QueueError(f"{queue_id}: already held")
    if state in ("active", "corrupt"):
        raise QueueError(f"{queue_id}: is {state}, cannot hold it now")
    spool.move(queue_id, "hold", from_state=state)
    return str(state)


def release(spool: Spool, queue_id: str, is_local_domain: Callable[[str], bool]) -> str:
    """Release a held message, due at once; returns the state it went to."""
    row = message_row(spool, queue_id)
    if row["state"] != "hold":
        raise QueueError(f"{queue_id}: is {row['state']}, not held")
    external = all(not is_local_domain(r.rpartition("@")[2].lower()) for r in row["recipients"])
    target = "retry" if external and row["recipients"] else "deferred"
    _due_now(spool, queue_id)
    spool.move(queue_id, target, from_state="hold")
    return target


def delete(spool: Spool, queue_id: str) -> None:
    """Remove a message (any state but ``active``)."""
    state = message_row(spool, queue_id)["state"]
    if state == "active":
        raise QueueError(f"{queue_id}: is being delivered; hold or retry later")
    spool.remove(queue_id, state)


def delete_recorded(spool: Spool, queue_id: str, tracker: Any, by: str) -> str:
    """``delete``, then the ``deleted`` tracking event (``by``: who); returns the state the
    message was in (``mailgw queue delete`` and the admin API)."""
    from mailgw.tracking import Kind

    state = str(message_row(spool, queue_id)["state"])
    delete(spool, queue_id)
    tracker.record(Kind.DELETED, queue_id, state=state, by=by)
    return state


def age_text(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(0, seconds))}s"


def now() -> float:
    return time.time()
