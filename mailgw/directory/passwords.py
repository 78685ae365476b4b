"""argon2id password hashing with equal work for unknown users and transparent rehashing."""

from __future__ import annotations

import contextlib

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# Longer passwords are refused when set; argon2 itself would accept them, but nothing needs it.
MAX_PASSWORD_BYTES = 1024


class PasswordHashing:
    """Hash and verify passwords with argon2id at the configured cost.

    ``verify`` always performs one full argon2 verification, against a dummy hash when the
    stored hash is missing or unreadable, so an unknown user costs the same as a wrong
    password.
    """

    def __init__(self, time_cost: int, memory_kib: int) -> None:
        if time_cost < 1:
            raise ValueError("argon2 time cost must be at least 1")
        if memory_kib < 8:
            raise ValueError("argon2 memory must be at least 8 KiB")
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)
        self._dummy: str | None = None

    def hash(self, password: str | bytes) -> str:
        """Return a new argon2id hash (PHC string) of ``password``."""
        return self._hasher.hash(password)

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self._hasher.hash(b"mailgw dummy password for unknown users")
        return self._dummy

    def verify(self, stored: str | None, password: str | bytes) -> tuple[bool, str | None]:
        """Check ``password`` against ``stored``.

        Returns ``(matches, new_hash)``: ``new_hash`` is a fresh hash with the current
        parameters when the password matches but ``stored`` was made with other ones, else
        None. Blocking (CPU and memory bound): run it in a thread from the reactor.
        """
        if stored is not None:
            try:
                self._hasher.verify(stored, password)
            except VerificationError:
                return False, None
            except InvalidHashError:
                pass  # unreadable hash: fail after the same work as an unknown user
            else:
                if self._hasher.check_needs_rehash(stored):
                    return True, self._hasher.hash(password)
                return True, None
        with contextlib.suppress(VerificationError):
            self._hasher.verify(self._dummy_hash(), b"\x00")
        return False, None


def check_new_password(password: str) -> None:
    """Raise ValueError when ``password`` cannot be set (empty, too long, NUL or line breaks)."""
    if not password:
        raise ValueError("the password must not be empty")
    if len(password.encode("utf-8", "surrogateescape")) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    if any(c in password for c in "\x00\r\n"):
        raise ValueError("the password must not contain NUL or line breaks")
