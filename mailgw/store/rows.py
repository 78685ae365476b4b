"""The per-user index's message rows as values, and small helpers shared by the store's
layers (the facade, ``Mailbox``, the tier-1 backend and the tier-2 placement)."""

from __future__ import annotations

import datetime
import errno
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mailgw.model.message import MessageInfo
from mailgw.store import maildir

# Flag sets are few (most messages have one of a handful): one frozenset per distinct text.
_FLAG_SETS: dict[str, frozenset[str]] = {}
_FLAG_SETS_MAX = 4096


def flag_set(text: str) -> frozenset[str]:
    flags = _FLAG_SETS.get(text)
    if flags is None:
        if len(_FLAG_SETS) >= _FLAG_SETS_MAX:
            _FLAG_SETS.clear()
        flags = _FLAG_SETS[text] = maildir.flags_from_text(text)
    return flags


# Zone offsets are few too: one int object per value (beyond CPython's small ints).
_ZONES: dict[int, int] = {}


def _zone(minutes: int) -> int:
    return _ZONES.setdefault(minutes, minutes) if len(_ZONES) < 4096 else minutes


def info_from_row(row: Sequence[Any]) -> MessageInfo:
    """The ``MessageInfo`` of an index row selected with ``ROW_COLUMNS``."""
    uid, filename, size, flags, internaldate, modseq, blob, tz = row
    return MessageInfo(
        uid=int(uid),
        size=int(size),
        flags=flag_set(str(flags)),
        internaldate=float(internaldate),
        modseq=int(modseq),
        filename=str(filename),
        blob=None if blob is None else str(blob),
        internaldate_tz=_zone(int(tz)),
    )


ROW_COLUMNS = "uid, filename, size, flags, internaldate, modseq, blob, internaldate_tz"


# SQLite's "database or disk is full" (SQLITE_FULL).
_SQLITE_FULL = 13


def is_disk_full(error: BaseException | None) -> bool:
    """True when ``error`` says the filesystem (or the user's filesystem quota) is full: an
    OSError ENOSPC/EDQUOT from a message file, blob or manifest, or SQLite's SQLITE_FULL from
    the index. A temporary condition (IMAP ``NO [OVERQUOTA] Not enough disk space``, as
    Dovecot maps ENOSPC; SMTP 452/4.3.1), not a server bug."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL
    return False


def local_zone(ts: float) -> int:
    """The server's UTC offset at the instant ``ts``, in minutes east of UTC."""
    return time.localtime(ts).tm_gmtoff // 60


def split_internaldate(
    value: datetime.datetime | float | None,
) -> tuple[float | None, int | None]:
    """An internal date as given to ``append``: (epoch seconds or None for "now", zone in
    minutes east of UTC or None for the server's zone). An aware datetime keeps its zone; a
    number is a UTC epoch (zone +0000). ValueError for a naive datetime."""
    if value is None:
        return None, None
    if isinstance(value, datetime.datetime):
        offset = value.utcoffset()
        if offset is None:
            raise ValueError(f"internal date {value!r} has no time zone")
        return value.timestamp(), round(offset.total_seconds() / 60)
    return float(value), 0


def add_tombstones(c: sqlite3.Connection, mailbox: int, uids: Iterable[int], modseq: int) -> None:
    """Remember expunged UIDs with the modseq of their removal (CONDSTORE/QRESYNC VANISHED)."""
    c.executemany(
        "INSERT OR REPLACE INTO tombstones(mailbox, uid, modseq) VALUES (?, ?, ?)",
        [(mailbox, uid, modseq) for uid in uids],
    )
