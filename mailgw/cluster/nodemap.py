"""The user -> backend node map kept in the directory database (``IMailboxMap``).

Assignment: a user without a recorded node gets ``nodes[sha256(user) mod len(nodes)]`` (a
stable hash, the same on every gateway, spreading users over the nodes), and that choice is
written down at once. So a node added to ``[cluster] mailbox_nodes`` later takes new users
only: existing users stay where their mail is until ``mailgw user move`` moves them.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence

from zope.interface import implementer

from mailgw.interfaces import IMailboxMap

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox_nodes (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    held INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID
"""


def hashed_node(user: str, nodes: Sequence[str]) -> str:
    """The node a new user is assigned to: a stable hash of the lower-cased name."""
    if not nodes:
        raise ValueError("no mailbox nodes configured")
    digest = hashlib.sha256(user.lower().encode("utf-8")).digest()
    return nodes[int.from_bytes(digest[:8], "big") % len(nodes)]


@implementer(IMailboxMap)
class DirectoryMailboxMap:
    """``IMailboxMap`` in the table ``mailbox_nodes`` of the directory database at ``path``
    (shared by the nodes of a one-machine cluster; see the module docstring)."""

    def __init__(self, path: str, nodes: Sequence[str]) -> None:
        self.nodes = tuple(nodes)
        self.path = path
        self._lock = threading.RLock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, user: str) -> tuple[str, int] | None:
        row = self._db.execute(
            "SELECT node, held FROM mailbox_nodes WHERE name=?", (user.lower(),)
        ).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    def get(self, user: str) -> str:
        with self._lock:
            row = self._row(user)
            if row is not None:
                return row[0]
            node = hashed_node(user, self.nodes)
            self._db.execute(
                "INSERT OR IGNORE INTO mailbox_nodes (name, node) VALUES (?, ?)",
                (user.lower(), node),
            )
            row = self._row(user)
            return row[0] if row else node

    def held(self, user: str) -> bool:
        with self._lock:
            row = self._row(user)
            return bool(row and row[1])

    def set_node(self, user: str, node: str) -> None:
        if node not in self.nodes:
            raise ValueError(f"unknown node {node!r} (mailbox_nodes: {' '.join(self.nodes)})")
        with self._lock:
            self._db.execute(
                "INSERT INTO mailbox_nodes (name, node) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET node=excluded.node",
                (user.lower(), node),
            )

    def set_held(self, user: str, held: bool) -> None:
        with self._lock:
            if self._row(user) is None:
                self.get(user)  # a hold needs a row: the user's assigned node
            self._db.execute(
                "UPDATE mailbox_nodes SET held=? WHERE name=?", (int(held), user.lower())
            )
