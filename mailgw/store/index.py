"""Per-user SQLite index (WAL): mailboxes with UIDVALIDITY/UIDNEXT/HIGHESTMODSEQ, messages."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from mailgw.journal.writer import TABLE as JOURNAL_TABLE
from mailgw.journal.writer import DBJournal

INDEX_NAME = "mailgw-index.sqlite"
SCHEMA_VERSION = "1"
BUSY_TIMEOUT = 30.0

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mailboxes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed INTEGER NOT NULL DEFAULT 1,
    total_size INTEGER NOT NULL DEFAULT 0,
    message_count INTEGER NOT NULL DEFAULT 0,
    new_mtime INTEGER NOT NULL DEFAULT -1,
    cur_mtime INTEGER NOT NULL DEFAULT -1,
    -- 1: a scan found new/ and cur/ (at the mtimes above, both settled) to match the index,
    -- 0: the mtimes were recorded by a mailgw writer after its own change (not yet verified).
    mtimes_verified INTEGER NOT NULL DEFAULT 0,
    -- The highest UID some session has seen as \\Recent (Dovecot's first_recent_uid - 1).
    recent_uid INTEGER NOT NULL DEFAULT 0,
    -- The folder's tier-2 manifest (mailgw.store.manifest): generation (NULL: no manifest),
    -- committed length, length after its last rewrite, reserved UIDNEXT and modseq.
    t2_log_gen TEXT,
    t2_log_size INTEGER NOT NULL DEFAULT 0,
    t2_log_base INTEGER NOT NULL DEFAULT 0,
    t2_uid_mark INTEGER NOT NULL DEFAULT 0,
    t2_modseq_mark INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    mailbox INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    base TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    flags TEXT NOT NULL DEFAULT '',
    internaldate REAL NOT NULL,
    modseq INTEGER NOT NULL,
    blob TEXT,
    -- The zone the internal date was given in (APPEND) or of the server at delivery:
    -- minutes east of UTC (FETCH INTERNALDATE shows it, SEARCH BEFORE/ON/SINCE use it).
    internaldate_tz INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    mailbox INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_blob ON messages(blob) WHERE blob IS NOT NULL;
-- Replication finds a message by its Maildir base name wherever it is now (moved, renamed).
CREATE INDEX IF NOT EXISTS messages_base ON messages(base);
-- Incremental refresh and CHANGEDSINCE/VANISHED read only the rows above a modseq.
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(mailbox, modseq);
CREATE INDEX IF NOT EXISTS tombstones_modseq ON tombstones(mailbox, modseq);
"""
    + JOURNAL_TABLE
)

# Columns added after schema 1 was released: (table, column, declaration).
_ADDED_COLUMNS = (
    ("messages", "blob", "TEXT"),
    ("mailboxes", "recent_uid", "INTEGER NOT NULL DEFAULT 0"),
    ("mailboxes", "mtimes_verified", "INTEGER NOT NULL DEFAULT 0"),
    ("messages", "internaldate_tz", "INTEGER NOT NULL DEFAULT 0"),
    ("mailboxes", "t2_log_gen", "TEXT"),
    ("mailboxes", "t2_log_size", "INTEGER NOT NULL DEFAULT 0"),
    ("mailboxes", "t2_log_base", "INTEGER NOT NULL DEFAULT 0"),
    ("mailboxes", "t2_uid_mark", "INTEGER NOT NULL DEFAULT 0"),
    ("mailboxes", "t2_modseq_mark", "INTEGER NOT NULL DEFAULT 0"),
)


class UserIndex:
    """One user's index connection. ``lock`` serialises threads of this process; SQLite's
    ``BEGIN IMMEDIATE`` serialises writers across processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        # Records for the folders' tier-2 manifests queued by the open write transaction
        # (folder id -> records), and the hook that writes them just before COMMIT.
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.before_commit: Callable[[sqlite3.Connection], None] | None = None
        # The change journal of this index (``mailgw.journal``): entries recorded in the open
        # write transaction are numbered and inserted just before its COMMIT.
        self.journal: DBJournal | None = None
        self.conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.write() as c:
                for table, column, decl in _ADDED_COLUMNS:
                    cols = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
                    if cols and column not in cols:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                had_subscriptions = c.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'subscriptions'"
                ).fetchone()
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                    (SCHEMA_VERSION,),
                )
                if not had_subscriptions:  # an index from before subscriptions had a table
                    c.execute(
                        "INSERT OR IGNORE INTO subscriptions(name)"
                        " SELECT name FROM mailboxes WHERE subscribed = 1"
                    )
        except BaseException:
            self.conn.close()
            raise

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on
        any exception. ``before_commit`` (when set) runs inside it, just before COMMIT, when
        the transaction changed something; then the journal entries it recorded are written
        (``DBJournal.flush``: the node's sequencer lock is held from there to the end)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.pending = {}
            changes = self.conn.total_changes
            journal = self.journal
            try:
                yield self.conn
                if self.before_commit is not None and (
                    self.pending or self.conn.total_changes != changes
                ):
                    self.before_commit(self.conn)
                if journal is not None:
                    journal.flush(self.conn)
                self.pending = {}
                self.conn.execute("COMMIT")
            except BaseException:
                self.pending = {}
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if journal is not None:
                    journal.end(False)
                raise
            if journal is not None:
                journal.end(True)

    def log(self, mailbox: int, record: dict[str, Any]) -> None:
        """Queue a record for the tier-2 manifest of folder ``mailbox`` (inside ``write``)."""
        self.pending.setdefault(mailbox, []).append(record)

    def check(self) -> None:
        """Raise sqlite3.DatabaseError (and close) when the index file is damaged."""
        try:
            result = self.conn.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"index {self.path} failed quick_check: {result}")
        except sqlite3.DatabaseError:
            self.close()
            raise

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def new_uidvalidity(conn: sqlite3.Connection) -> int:
    """A UIDVALIDITY never handed out before in this index (time based, strictly growing).
    Call inside a write transaction."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_uidvalidity'").fetchone()
    last = int(row[0]) if row else 0
    value = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)", (str(value),)
    )
    return value


def quarantine_index(path: str) -> str:
    """Move an unreadable index (and its WAL files) aside; returns the new name."""
    target = f"{path}.corrupt-{int(time.time())}"
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.replace(path + suffix, target + suffix)
    return target
