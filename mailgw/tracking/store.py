"""The tracking database (SQLite, WAL): batched writes, retention and size pruning, lookups.

Tables: ``events`` (one row per event: time, kind, queue ID, JSON detail) and ``refs`` (what
a message is found by: ``a:`` + address, ``m:`` + Message-ID, with the event's time), both
indexed by time for pruning. Several processes write to the same file (the main process, IMAP
workers, the ``mailgw`` command), each through one connection in one thread: WAL lets readers
and one writer work at once, and the busy timeout makes writers wait for each other instead
of failing. ``synchronous=NORMAL``: a commit is not fsynced (WAL checkpoints are); a crash of
the machine may lose the last events, never corrupt the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from time import monotonic, sleep
from typing import Any

BUSY_TIMEOUT = 10.0
"""Seconds a connection waits for another process's write transaction."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE TABLE IF NOT EXISTS refs (
    key TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refs_key ON refs(key, time);
CREATE INDEX IF NOT EXISTS refs_time ON refs(time);
"""


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded step of a message (see ``mailgw.tracking.events.Kind``)."""

    time: float
    kind: str
    queue_id: str
    detail: dict[str, Any]
    message_id: str = ""
    addresses: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "kind": self.kind, "queue_id": self.queue_id, **self.detail}


def address_key(address: str) -> str:
    return "a:" + address.strip().strip("<>").lower()


# json.dumps(..., separators=(",", ":")) without building an encoder for every event
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def message_id_key(message_id: str) -> str:
    text = message_id.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    return "m:" + text


def connect(path: str) -> sqlite3.Connection:
    """Open (creating it) the database at ``path`` for one thread.

    Several processes may open a new file at once (the main process, IMAP workers, the
    admin command): switching it to WAL needs the file to itself, and SQLite answers
    "database is locked" at once there instead of waiting (its busy handler is not called
    for that lock), so the set-up is tried again for up to ``BUSY_TIMEOUT`` seconds."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    deadline = monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            # A new file only: pages freed by pruning can be given back (incremental_vacuum).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            return conn
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or monotonic() > deadline:
                conn.close()
                raise
            sleep(0.01)


def write(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    """Insert ``events`` in one transaction."""
    rows = []
    refs = []
    for e in events:
        rows.append((e.time, e.kind, e.queue_id, _COMPACT_JSON.encode(e.detail)))
        if e.message_id:
            refs.append((message_id_key(e.message_id), e.queue_id, e.time))
        seen = set()
        for address in e.addresses:
            key = address_key(address)
            if key != "a:" and key not in seen:
                seen.add(key)
                refs.append((key, e.queue_id, e.time))
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO events (time, kind, queue_id, detail) VALUES (?, ?, ?, ?)", rows
        )
        if refs:
            conn.executemany("INSERT INTO refs (key, queue_id, time) VALUES (?, ?, ?)", refs)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def data_size(conn: sqlite3.Connection) -> int:
    """Bytes held by live pages (the file minus its free pages)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def prune(conn: sqlite3.Connection, now: float, retention: float, max_size: int) -> int:
    """Remove events older than ``retention`` seconds, then the oldest tenth again and again
    while the data is above ``max_size`` bytes; give the freed pages back to the file system.
    Returns the number of events removed."""
    removed = _delete_before(conn, now - retention)
    while data_size(conn) > max_size:
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if count == 0:
            break
        row = conn.execute(
            "SELECT time FROM events ORDER BY time LIMIT 1 OFFSET ?", (max(1, count // 10),)
        ).fetchone()
        cutoff = row[0] if row is not None else float("inf")
        gone = _delete_before(conn, cutoff)
        if gone == 0:  # every remaining event has the same time: drop them all
            gone = _delete_before(conn, float("inf"))
        removed += gone
        conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page only
    conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page only
    if removed:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return removed


def _delete_before(conn: sqlite3.Connection, cutoff: float) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        n = conn.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount
        conn.execute("DELETE FROM refs WHERE time < ?", (cutoff,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)


def open_readonly(path: str) -> sqlite3.Connection | None:
    """A connection for lookups, or None when there is no database yet."""
    if not os.path.exists(path):
        return None
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    return conn


def find_queue_ids(
    conn: sqlite3.Connection, query: str, since: float | None = None, until: float | None = None
) -> list[str]:
    """The queue IDs ``query`` names: a queue ID itself, a Message-ID (with or without angle
    brackets) or an address (sender, recipient, mailbox user), seen within [since, until]."""
    low = since if since is not None else float("-inf")
    high = until if until is not None else float("inf")
    query = query.strip()
    found: dict[str, None] = {}
    for (qid,) in conn.execute(
        "SELECT DISTINCT queue_id FROM events WHERE queue_id = ? AND time BETWEEN ? AND ?",
        (query, low, high),
    ):
        found[qid] = None
    keys = [message_id_key(query)]
    if "@" in query:
        keys.append(address_key(query))
    for key in keys:
        for (qid,) in conn.execute(
            "SELECT queue_id FROM refs WHERE key = ? AND time BETWEEN ? AND ? ORDER BY time",
            (key, low, high),
        ):
            found[qid] = None
    return list(found)


def events_for(conn: sqlite3.Connection, queue_ids: Iterable[str]) -> list[Event]:
    """Every event of ``queue_ids``, in time order (then recording order)."""
    out: list[Event] = []
    for qid in queue_ids:
        for time, kind, queue_id, detail in conn.execute(
            "SELECT time, kind, queue_id, detail FROM events WHERE queue_id = ? ORDER BY time, id",
            (qid,),
        ):
            out.append(Event(time, kind, queue_id, json.loads(detail)))
    return out
