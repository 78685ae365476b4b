"""The webhook outbox: one SQLite row per (event, receiver) until the receiver took it.

``data_dir/webhooks.sqlite``; every method is blocking (run it in the I/O pool) and
thread-safe. A row is added before any attempt, so an event survives a restart; a row leaves
when its receiver answered 2xx, or when it is older than ``max_age`` (``expire``).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

DB_NAME = "webhooks.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    delivery TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_next ON outbox(next_at);
"""


@dataclass(frozen=True)
class Pending:
    """One row to send."""

    id: int
    delivery: str
    url: str
    event: str
    body: bytes
    created: float
    attempts: int


class Outbox:
    """The rows of ``path`` (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, rows: list[tuple[str, str, str, bytes, float]]) -> None:
        """Add (delivery ID, url, event, body, created) rows, due at once, in one commit."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO outbox (delivery, url, event, body, created, next_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(d, u, e, b, c, c) for d, u, e, b, c in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def due(self, now: float, limit: int = 100) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, delivery, url, event, body, created, attempts FROM outbox"
                " WHERE next_at <= ? ORDER BY next_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [Pending(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM outbox").fetchone()
        return None if row[0] is None else float(row[0])

    def sent(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def failed(self, row_id: int, next_at: float, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=? WHERE id=?",
                (next_at, error[:500], row_id),
            )

    def expire(self, before: float) -> list[Pending]:
        """Remove (and return) the rows created before ``before``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, delivery, url, event, body, created, attempts FROM outbox"
                " WHERE created < ?",
                (before,),
            ).fetchall()
            self._db.execute("DELETE FROM outbox WHERE created < ?", (before,))
        return [Pending(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    def counts(self) -> dict[str, int]:
        """``pending`` rows and how many of them have ``failed`` at least once."""
        with self._lock:
            n, failing = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM outbox"
            ).fetchone()
        return {"pending": int(n), "failing": int(failing)}
