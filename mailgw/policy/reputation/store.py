"""Where reputation records live: ``IReputationStore``, in memory and in SQLite.

The store keeps each subject's ``Record`` (``standing.py``) and, for a while, which subjects
a queued message counts for (``link``): a bounce, a delivery or a spam report names a queue
ID, and the store says whose reputation it moves. Every method answers at once or with a
Deferred (a store shared through Redis answers later), like ``IRateCounter``.

- ``MemoryReputationStore``: one process, nothing kept across restarts (tests, tools).
- ``SQLiteReputationStore``: ``data_dir/reputation.sqlite`` (WAL), blocking calls: the server
  wraps it in ``ThreadedReputationStore`` (each call in the I/O thread pool, a Deferred
  answer); the ``mailgw`` command uses it directly (``report``, ``reputation``), so what an
  administrator changes is what the server reads next.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from mailgw.policy.reputation.standing import Limits, Record, advance, apply_event

DB_NAME = "reputation.sqlite"
LINK_TTL = 30 * 86400.0
"""How long a queue ID stays linked to its subjects (a late bounce, a spam report)."""
RECORD_TTL = 90 * 86400.0
"""A record without an event for this long and without an override is forgotten (its
points have decayed away; the SQLite store prunes while it links)."""


class IReputationStore(Interface):
    """Reputation records by subject (see the module docstring). Each method answers with
    its value or a Deferred firing with it."""

    def event(subject: str, event: dict[str, float], now: float) -> Record | Deferred[Record]:
        """Apply ``event`` (``standing.apply_event``) to ``subject``'s record at ``now``
        (creating it); the record afterwards."""

    def get(subject: str, now: float) -> Record | Deferred[Record]:
        """``subject``'s record brought to ``now`` (a fresh one when unknown)."""

    def set_override(subject: str, override: str) -> None | Deferred[None]:
        """Set ``allow``, ``block`` or '' (none) for ``subject``."""

    def reset(subject: str) -> None | Deferred[None]:
        """Forget ``subject``'s record (its override too)."""

    def subjects() -> list[str] | Deferred[list[str]]:
        """Every subject with a record, sorted."""

    def link(queue_id: str, subjects: list[str], now: float) -> None | Deferred[None]:
        """Remember that ``queue_id`` counts for ``subjects`` (for ``LINK_TTL``)."""

    def linked(queue_id: str) -> list[str] | Deferred[list[str]]:
        """The subjects ``queue_id`` counts for ([] when unknown or expired)."""


@implementer(IReputationStore)
class MemoryReputationStore:
    """The in-memory ``IReputationStore`` (one process; see the module docstring)."""

    def __init__(self, limits: Limits | None = None, max_links: int = 100_000) -> None:
        self.limits = limits or Limits()
        self.records: dict[str, Record] = {}
        self.links: OrderedDict[str, list[str]] = OrderedDict()
        self.max_links = max_links

    def event(self, subject: str, event: dict[str, float], now: float) -> Record:
        record = self.records.setdefault(subject, Record())
        return apply_event(record, event, now, self.limits)

    def get(self, subject: str, now: float) -> Record:
        record = self.records.get(subject)
        return advance(record, now, self.limits) if record is not None else Record()

    def set_override(self, subject: str, override: str) -> None:
        self.records.setdefault(subject, Record()).override = override

    def reset(self, subject: str) -> None:
        self.records.pop(subject, None)

    def subjects(self) -> list[str]:
        return sorted(self.records)

    def link(self, queue_id: str, subjects: list[str], now: float) -> None:
        self.links[queue_id] = list(subjects)
        while len(self.links) > self.max_links:
            self.links.popitem(last=False)

    def linked(self, queue_id: str) -> list[str]:
        return list(self.links.get(queue_id, []))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS subjects (
    subject TEXT PRIMARY KEY, record TEXT NOT NULL, at REAL NOT NULL, override TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS subjects_at ON subjects (at);
CREATE TABLE IF NOT EXISTS links (
    queue_id TEXT PRIMARY KEY, subjects TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS links_at ON links (at);
"""


@implementer(IReputationStore)
class SQLiteReputationStore:
    """``IReputationStore`` in ``path`` (blocking; thread-safe; see the module docstring)."""

    def __init__(self, path: str, limits: Limits | None = None) -> None:
        self.path = path
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._links_added = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _load(self, subject: str) -> Record | None:
        row = self._db.execute(
            "SELECT record FROM subjects WHERE subject = ?", (subject,)
        ).fetchone()
        return Record.from_dict(json.loads(row[0])) if row else None

    def _save(self, subject: str, record: Record) -> None:
        self._db.execute(
            "INSERT INTO subjects (subject, record, at, override) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(subject) DO UPDATE SET record = excluded.record, at = excluded.at,"
            " override = excluded.override",
            (subject, json.dumps(record.to_dict()), record.points_at, record.override),
        )

    def _modify(self, subject: str, change: Callable[[Record], Record]) -> Record:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                record = change(self._load(subject) or Record())
                self._save(subject, record)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return record

    def event(self, subject: str, event: dict[str, float], now: float) -> Record:
        return self._modify(subject, lambda r: apply_event(r, event, now, self.limits))

    def get(self, subject: str, now: float) -> Record:
        with self._lock:
            record = self._load(subject)
        return advance(record, now, self.limits) if record is not None else Record()

    def set_override(self, subject: str, override: str) -> None:
        def change(record: Record) -> Record:
            record.override = override
            return record

        self._modify(subject, change)

    def reset(self, subject: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM subjects WHERE subject = ?", (subject,))

    def subjects(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT subject FROM subjects ORDER BY subject").fetchall()
        return [r[0] for r in rows]

    def link(self, queue_id: str, subjects: list[str], now: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO links (queue_id, subjects, at) VALUES (?, ?, ?)",
                (queue_id, json.dumps(list(subjects)), now),
            )
            self._links_added += 1
            if self._links_added % 1000 == 0:
                self.prune(now)

    def prune(self, now: float) -> None:
        """Forget expired links and idle records without an override (caller holds the
        lock)."""
        self._db.execute("DELETE FROM links WHERE at < ?", (now - LINK_TTL,))
        self._db.execute("DELETE FROM subjects WHERE at < ? AND override = ''", (now - RECORD_TTL,))

    def linked(self, queue_id: str) -> list[str]:
        with self._lock:
            row = self._db.execute(
                "SELECT subjects FROM links WHERE queue_id = ?", (queue_id,)
            ).fetchone()
        return [str(s) for s in json.loads(row[0])] if row else []


Runner = Callable[..., Deferred[Any]]


@implementer(IReputationStore)
class ThreadedReputationStore:
    """A blocking store (``SQLiteReputationStore``) whose calls run through ``run`` (the
    node's I/O thread pool): every answer is a Deferred."""

    def __init__(self, store: SQLiteReputationStore, run: Runner) -> None:
        self.store = store
        self.run = run

    def event(self, subject: str, event: dict[str, float], now: float) -> Deferred[Record]:
        return self.run(self.store.event, subject, event, now)

    def get(self, subject: str, now: float) -> Deferred[Record]:
        return self.run(self.store.get, subject, now)

    def set_override(self, subject: str, override: str) -> Deferred[None]:
        return self.run(self.store.set_override, subject, override)

    def reset(self, subject: str) -> Deferred[None]:
        return self.run(self.store.reset, subject)

    def subjects(self) -> Deferred[list[str]]:
        return self.run(self.store.subjects)

    def link(self, queue_id: str, subjects: list[str], now: float) -> Deferred[None]:
        return self.run(self.store.link, queue_id, subjects, now)

    def linked(self, queue_id: str) -> Deferred[list[str]]:
        return self.run(self.store.linked, queue_id)


def store_path(data_dir: str) -> str:
    """Where the embedded store lives (``data_dir/reputation.sqlite``)."""
    return os.path.join(data_dir, DB_NAME)
