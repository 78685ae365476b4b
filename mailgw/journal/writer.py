"""The journal table of one SQLite database, written inside that database's transactions."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from mailgw.journal.sequencer import Sequencer
from mailgw.model.change import ChangeEntry

# json.dumps(..., separators=(",", ":")) without building an encoder for every entry
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))

TABLE = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    user TEXT NOT NULL,
    folder TEXT NOT NULL,
    payload TEXT NOT NULL,
    pid INTEGER NOT NULL
)"""

PRUNE_INTERVAL = 600.0
"""A database's expired entries are deleted at most this often per process (in a write
transaction that journals something anyway: no transaction of its own)."""


def decode_row(row: tuple[Any, ...]) -> ChangeEntry:
    """A ChangeEntry from ``SELECT seq, time, kind, user, folder, payload, pid``."""
    seq, when, kind, user, folder, payload, pid = row
    return ChangeEntry(
        int(seq), float(when), str(kind), str(user), str(folder), json.loads(payload), int(pid)
    )


class DBJournal:
    """The journal of one database (a user's index, the directory).

    Inside a write transaction the owner calls ``record`` for each change; just before its
    COMMIT it calls ``flush`` (takes the node's sequencer lock, numbers the recorded entries,
    inserts them into the ``journal`` table of the same transaction), and after the COMMIT
    or ROLLBACK ``end`` (releases the lock; after a COMMIT the entries go to ``on_commit``).
    One transaction holds the change and its entries: a process killed anywhere leaves both
    or neither.
    """

    def __init__(
        self,
        sequencer: Sequencer,
        db_path: str,
        on_commit: Callable[[list[ChangeEntry]], None] | None = None,
    ) -> None:
        self.sequencer = sequencer
        self.db = os.path.relpath(os.path.abspath(db_path), sequencer.data_dir)
        self.on_commit = on_commit
        self._pending: list[tuple[str, str, str, Mapping[str, Any]]] = []
        self._held: list[ChangeEntry] | None = None
        self._next_prune = 0.0
        self._pruned = 0  # the highest number this transaction's prune deleted
        # The highest number the database held when this writer first numbered (None: not
        # looked yet). Once the node's counter has passed it, every later number is above it.
        self._found: int | None = None

    def record(self, kind: str, user: str, folder: str, payload: Mapping[str, Any]) -> None:
        """Queue an entry of the open transaction."""
        self._pending.append((kind, user, folder, payload))

    def flush(self, conn: sqlite3.Connection) -> None:
        """Just before COMMIT: number and insert the queued entries (the sequencer's lock is
        held from here until ``end``)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self.sequencer.begin()
        try:
            # A database copied or restored from another data directory (a backup, a moved
            # user) brings journal rows numbered by that node: number above them, so the
            # node's sequence stays unique in every database and still only grows. Rows can
            # only come from outside before the database is opened: look once per writer.
            if self._found is None:
                (found,) = conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()
                self._found = int(found)
            first = self.sequencer.allocate(len(pending), self.db, above=self._found)
            now = time.time()
            pid = self.sequencer.pid
            entries = [
                ChangeEntry(first + n, now, kind, user, folder, payload, pid)
                for n, (kind, user, folder, payload) in enumerate(pending)
            ]
            conn.executemany(
                "INSERT INTO journal(seq, time, kind, user, folder, payload, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.seq,
                        e.time,
                        e.kind,
                        e.user,
                        e.folder,
                        _COMPACT_JSON.encode(e.payload),
                        pid,
                    )
                    for e in entries
                ],
            )
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_INTERVAL
                cutoff = now - self.sequencer.retention()
                (top,) = conn.execute(
                    "SELECT max(seq) FROM journal WHERE time < ?", (cutoff,)
                ).fetchone()
                if top is not None:
                    conn.execute("DELETE FROM journal WHERE time < ?", (cutoff,))
                    self._pruned = int(top)
        except BaseException:
            self._pruned = 0
            self.sequencer.end()
            raise
        self._held = entries

    def end(self, committed: bool) -> None:
        """After COMMIT (``committed``) or ROLLBACK: release the lock, publish the entries."""
        self._pending = []
        held, self._held = self._held, None
        pruned, self._pruned = self._pruned, 0
        if held is None:
            return
        try:
            if committed and pruned:
                # Readers (replication) must know the numbers up to here may be gone.
                self.sequencer.record_pruned(pruned)
        finally:
            self.sequencer.end()
        if committed and self.on_commit is not None:
            self.on_commit(held)
