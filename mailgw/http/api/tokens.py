"""API bearer tokens with scopes: created by ``mailgw token create``, stored hashed in SQLite.

A token is ``mgw_<id>_<secret>``: ``id`` (8 hex digits) names the row, ``secret`` is 32 random
bytes (``secrets.token_urlsafe``). Only the SHA-256 of the whole token is stored
(``data_dir/api_tokens.sqlite``, mode 0600); ``authenticate`` finds the row by ``id`` and
compares the hashes with ``hmac.compare_digest``. Scopes: ``admin`` (everything), ``read``
(GET endpoints), ``send`` (``POST /api/v1/messages``). A token may carry the ``sender`` its
OA messages go out as. Revoked and expired tokens stop working at once (no cache: the
server and the command share the file).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DB_NAME = "api_tokens.sqlite"
SCOPES = ("admin", "read", "send")
_TOKEN = re.compile(r"mgw_([0-9a-f]{8})_([A-Za-z0-9_-]{20,100})")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    sender TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL
)
"""


class TokenError(ValueError):
    """A token operation cannot be done (unknown scope, unknown token ID)."""


@dataclass(frozen=True)
class Token:
    """A stored token (never its secret)."""

    id: str
    name: str
    scope: str
    sender: str
    created: float
    expires: float | None
    revoked: float | None

    def allows(self, scope: str) -> bool:
        """Whether this token may use an endpoint that needs ``scope``."""
        return self.scope == "admin" or self.scope == scope

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope,
            "sender": self.sender,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
        }


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens in ``path`` (see the module docstring); thread-safe."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self, scope: str, name: str = "", expires_in: float | None = None, sender: str = ""
    ) -> tuple[Token, str]:
        """A new token: (its record, the token text, shown once)."""
        if scope not in SCOPES:
            raise TokenError(f"unknown scope {scope!r} (one of {', '.join(SCOPES)})")
        if expires_in is not None and expires_in <= 0:
            raise TokenError("expiry must be in the future")
        now = self.clock()
        with self._lock:
            while True:
                tid = secrets.token_hex(4)
                if not self._db.execute("SELECT 1 FROM tokens WHERE id=?", (tid,)).fetchone():
                    break
            text = f"mgw_{tid}_{secrets.token_urlsafe(32)}"
            expires = now + expires_in if expires_in is not None else None
            self._db.execute(
                "INSERT INTO tokens (id, name, scope, sender, hash, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tid, name, scope, sender, digest(text), now, expires),
            )
        return Token(tid, name, scope, sender, now, expires, None), text

    def list(self) -> list[Token]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, scope, sender, created, expires, revoked FROM tokens"
                " ORDER BY created"
            ).fetchall()
        return [Token(*row) for row in rows]

    def revoke(self, token_id: str) -> None:
        with self._lock:
            cur = self._db.execute(
                "UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL",
                (self.clock(), token_id),
            )
        if cur.rowcount != 1:
            raise TokenError(f"no such active token {token_id}")

    def authenticate(self, text: str) -> Token | None:
        """The token ``text`` is, when it is valid (known, not revoked, not expired)."""
        m = _TOKEN.fullmatch(text)
        if m is None:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, scope, sender, created, expires, revoked, hash FROM tokens"
                " WHERE id=?",
                (m.group(1),),
            ).fetchone()
        if row is None:
            hmac.compare_digest(digest(text), digest(""))  # the same work either way
            return None
        if not hmac.compare_digest(digest(text), row[7]):
            return None
        token = Token(*row[:7])
        if token.revoked is not None:
            return None
        if token.expires is not None and token.expires <= self.clock():
            return None
        return token


def token_path(data_dir: str) -> str:
    return os.path.join(data_dir, DB_NAME)
