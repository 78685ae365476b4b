"""Webmail login sessions: a random session ID in an HttpOnly, SameSite=Strict cookie (Secure
over TLS), a CSRF token per session, idle and absolute expiry. Kept in memory (one process
serves the http role): a restart logs everyone out."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

COOKIE = b"mailgw_session"
LOGIN_COOKIE = b"mailgw_login"
"""Before login: a random value the login form must echo (login CSRF, double submit)."""

MAX_AGE = 12 * 3600.0
"""A session ends this long after login, however active."""


@dataclass
class Session:
    """One logged-in browser: the user, its CSRF token, and its times (reactor seconds)."""

    sid: str
    user: str
    csrf: str
    created: float
    seen: float
    data: dict[str, Any] = field(default_factory=dict)

    def csrf_ok(self, token: str | None) -> bool:
        """Whether ``token`` (from a form) is this session's CSRF token."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


EXPIRE_INTERVAL = 60.0
"""Look for expired sessions at most this often (at a request)."""


class Sessions:
    """The live sessions; ``clock`` gives ``seconds()`` (the reactor). ``user_gone(user)`` is
    called when a user's last session ends (logout, expiry, password change): the IMAP
    reader then forgets the password."""

    def __init__(
        self,
        clock: Any,
        idle_timeout: float,
        max_age: float = MAX_AGE,
        user_gone: Callable[[str], object] | None = None,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.user_gone = user_gone
        self._by_id: dict[str, Session] = {}
        self._last_expiry = clock.seconds()

    def create(self, user: str) -> Session:
        """A new session for ``user`` (expired ones are dropped first)."""
        self._expire()
        now = self.clock.seconds()
        s = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now)
        self._by_id[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session of ``sid`` (its idle time restarts), or None."""
        now = self.clock.seconds()
        if now - self._last_expiry >= EXPIRE_INTERVAL:
            self._expire()
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if self._expired(s, now):
            self._drop([sid])
            return None
        s.seen = now
        return s

    def end(self, sid: str) -> None:
        """Log the session out."""
        self._drop([sid])

    def end_user(self, user: str, keep: str = "") -> None:
        """End every session of ``user`` but ``keep`` (after a password change)."""
        self._drop([k for k, s in self._by_id.items() if s.user == user and k != keep])

    def of_user(self, user: str) -> list[Session]:
        """The user's live sessions."""
        return [s for s in self._by_id.values() if s.user == user]

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > self.idle_timeout or now - s.created > self.max_age

    def _expire(self) -> None:
        now = self._last_expiry = self.clock.seconds()
        self._drop([k for k, s in self._by_id.items() if self._expired(s, now)])

    def _drop(self, sids: list[str]) -> None:
        users = {self._by_id.pop(sid).user for sid in sids if sid in self._by_id}
        if self.user_gone is not None:
            for user in users:
                if not self.of_user(user):
                    self.user_gone(user)

    def __len__(self) -> int:
        return len(self._by_id)


def cookie(name: bytes, value: str, secure: bool, max_age: int | None = None) -> bytes:
    """A ``Set-Cookie`` value: Path=/, HttpOnly, SameSite=Strict, Secure over TLS;
    ``max_age`` 0 deletes it."""
    parts = [name + b"=" + value.encode("ascii"), b"Path=/", b"HttpOnly", b"SameSite=Strict"]
    if secure:
        parts.append(b"Secure")
    if max_age is not None:
        parts.append(b"Max-Age=" + str(max_age).encode("ascii"))
    return b"; ".join(parts)
