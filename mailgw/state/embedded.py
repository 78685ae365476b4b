"""The embedded gateway state: counters and values in memory, mailbox nodes and config
versions in SQLite under ``data_dir`` (one node, no server needed): ``EmbeddedState``."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailgw.interfaces import IGatewayState, IMailboxNodes

DB_FILE = "gateway-state.db"
"""In ``[server] data_dir``: the embedded state's SQLite file."""
MAX_KEYS = 200_000
"""Keys kept in memory; past it, expired ones are dropped, then the oldest half."""
HIT_CAP = 100_000
"""Events kept per ``hit`` window (the count saturates there)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox_nodes (user TEXT PRIMARY KEY, node TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS config_versions (
    version INTEGER PRIMARY KEY, blob BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS config_history (pos INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS config_nodes (node TEXT PRIMARY KEY, info BLOB NOT NULL);
"""


class _SQLite:
    """The SQLite file (opened per call: the ``mailgw`` command and the server share it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ready = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                self._ready = True
            yield db
        finally:
            db.close()


@implementer(IMailboxNodes)
class SQLiteMailboxNodes:
    """``IMailboxNodes`` in the embedded state's SQLite file."""

    def __init__(self, db: _SQLite) -> None:
        self.db = db

    def get(self, user: str) -> defer.Deferred[str | None]:
        with self.db.connect() as db:
            row = db.execute(
                "SELECT node FROM mailbox_nodes WHERE user = ?", (user.lower(),)
            ).fetchone()
        return defer.succeed(row[0] if row else None)

    def set(self, user: str, node: str | None) -> defer.Deferred[None]:
        with self.db.connect() as db:
            if node is None:
                db.execute("DELETE FROM mailbox_nodes WHERE user = ?", (user.lower(),))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO mailbox_nodes (user, node) VALUES (?, ?)",
                    (user.lower(), node),
                )
        return defer.succeed(None)


@implementer(IGatewayState)
class EmbeddedState:
    """``IGatewayState`` of one node (see the module docstring); ``clock`` has ``seconds()``
    (the reactor; default: the system time); ``data_dir``: where the SQLite file is."""

    def __init__(self, data_dir: str, clock: Any = None) -> None:
        self.clock = clock
        os.makedirs(data_dir, exist_ok=True)
        self.db = _SQLite(os.path.join(data_dir, DB_FILE))
        self.nodes = SQLiteMailboxNodes(self.db)
        # key -> (expires at or 0, value): bytes, int, deque of event times, or dict (hashes)
        self._keys: dict[str, tuple[float, Any]] = {}

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def _live(self, key: str, now: float) -> Any:
        entry = self._keys.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires and expires <= now:
            del self._keys[key]
            return None
        return value

    def _store(self, key: str, value: Any, expires: float) -> None:
        if key not in self._keys and len(self._keys) >= MAX_KEYS:
            self._sweep()
        self._keys[key] = (expires, value)

    def _sweep(self) -> None:
        now = self._now()
        for k in [k for k, (e, v) in self._keys.items() if e and e <= now]:
            del self._keys[k]
        if len(self._keys) >= MAX_KEYS:
            for k in list(self._keys)[: len(self._keys) // 2]:  # dicts keep insertion order
                del self._keys[k]

    # -- counters and values -------------------------------------------------------------------

    def hit(self, key: str, window: float) -> defer.Deferred[int]:
        now = self._now()
        events = self._live(key, now)
        if not isinstance(events, deque):
            events = deque()
        horizon = now - window
        while events and events[0] <= horizon:
            events.popleft()
        events.append(now)
        if len(events) > HIT_CAP:
            events.popleft()
        self._store(key, events, now + window)
        return defer.succeed(len(events))

    def incr(self, key: str, amount: int = 1, ttl: float = 0) -> defer.Deferred[int]:
        now = self._now()
        value = self._live(key, now)
        if isinstance(value, int):
            expires = self._keys[key][0]
            value += amount
        else:
            expires = now + ttl if ttl > 0 else 0.0
            value = amount
        self._store(key, value, expires)
        return defer.succeed(value)

    def get(self, key: str) -> defer.Deferred[bytes | None]:
        value = self._live(key, self._now())
        if isinstance(value, int):
            value = str(value).encode()
        return defer.succeed(value if isinstance(value, bytes) else None)

    def set(self, key: str, value: bytes, ttl: float = 0) -> defer.Deferred[None]:
        now = self._now()
        self._store(key, bytes(value), now + ttl if ttl > 0 else 0.0)
        return defer.succeed(None)

    def delete(self, key: str) -> defer.Deferred[None]:
        self._keys.pop(key, None)
        return defer.succeed(None)

    # -- hashes ----------------------------------------------------------------------------------

    def _hash(self, name: str) -> dict[str, bytes]:
        value = self._live(name, self._now())
        if not isinstance(value, dict):
            value = {}
            self._store(name, value, 0.0)
        return value

    def hincr(self, name: str, field: str, amount: int = 1) -> defer.Deferred[int]:
        h = self._hash(name)
        value = int(h.get(field, b"0")) + amount
        h[field] = str(value).encode()
        return defer.succeed(value)

    def hset(self, name: str, field: str, value: bytes) -> defer.Deferred[None]:
        self._hash(name)[field] = bytes(value)
        return defer.succeed(None)

    def hgetall(self, name: str) -> defer.Deferred[dict[str, bytes]]:
        value = self._live(name, self._now())
        return defer.succeed(dict(value) if isinstance(value, dict) else {})

    def hdel(self, name: str, field: str) -> defer.Deferred[None]:
        value = self._live(name, self._now())
        if isinstance(value, dict):
            value.pop(field, None)
        return defer.succeed(None)

    # -- the unified configuration -------------------------------------------------------------

    def config_publish(self, blob: bytes) -> defer.Deferred[int]:
        with self.db.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM config_versions").fetchone()
            version = int(row[0]) + 1
            db.execute(
                "INSERT INTO config_versions (version, blob, created) VALUES (?, ?, ?)",
                (version, bytes(blob), time.time()),
            )
            db.execute("INSERT INTO config_history (version) VALUES (?)", (version,))
            db.execute("COMMIT")
        return defer.succeed(version)

    def config_current(self) -> defer.Deferred[tuple[int, bytes] | None]:
        with self.db.connect() as db:
            row = db.execute(
                "SELECT v.version, v.blob FROM config_history h JOIN config_versions v "
                "ON v.version = h.version ORDER BY h.pos DESC LIMIT 1"
            ).fetchone()
        return defer.succeed((int(row[0]), bytes(row[1])) if row else None)

    def config_rollback(self) -> defer.Deferred[int]:
        with self.db.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT pos, version FROM config_history ORDER BY pos DESC LIMIT 2"
            ).fetchall()
            if len(rows) < 2:
                db.execute("ROLLBACK")
                return defer.fail(LookupError("no previous version to return to"))
            db.execute("DELETE FROM config_history WHERE pos = ?", (rows[0][0],))
            db.execute("COMMIT")
        return defer.succeed(int(rows[1][1]))

    def config_report(self, node: str, info: bytes) -> defer.Deferred[None]:
        with self.db.connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO config_nodes (node, info) VALUES (?, ?)",
                (node, bytes(info)),
            )
        return defer.succeed(None)

    def config_nodes(self) -> defer.Deferred[dict[str, bytes]]:
        with self.db.connect() as db:
            rows = db.execute("SELECT node, info FROM config_nodes").fetchall()
        return defer.succeed({str(n): bytes(i) for n, i in rows})
