"""The message store's journal: one call per write site of ``mailgw.store`` records what
changed, in the write transaction of the user's index (``UserIndex.journal``)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from mailgw.journal.changelog import ChangeLog
from mailgw.journal.writer import DBJournal
from mailgw.model import change as k


class _Index(Protocol):
    path: str
    journal: DBJournal | None


class _User(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def index(self) -> _Index: ...


class _Info(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def modseq(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...
    @property
    def internaldate(self) -> float: ...
    @property
    def filename(self) -> str: ...
    @property
    def blob(self) -> str | None: ...
    @property
    def internaldate_tz(self) -> int: ...


def journal_dir(root: str) -> str:
    """The journal of the data directory above the store's root (``data_dir/mail``)."""
    return os.path.join(os.path.dirname(os.path.abspath(root)), "journal")


def _flags(flags: Iterable[str]) -> list[str]:
    return sorted(flags)


class StoreJournal:
    """Records the store's changes; ``changes`` is this process's ``ChangeLog`` of the node
    (the store's listeners hang on it)."""

    def __init__(self, root: str, reactor: Any = None) -> None:
        self.changes = ChangeLog(journal_dir(root), reactor)
        self._local = threading.local()

    def bind(self, index: _Index) -> None:
        """Journal the write transactions of a user's index."""
        journal = DBJournal(self.changes.sequencer, index.path, self.changes.committed)
        self.changes.publishes(journal.db)
        index.journal = journal

    @staticmethod
    def _record(u: _User, kind: str, folder: str, **payload: Any) -> None:
        journal = u.index.journal
        if journal is not None:
            journal.record(kind, u.name, folder, payload)

    # -- messages --------------------------------------------------------------------------------

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Around a COPY: its new messages are ``message.copied`` (see ``copy_source``) and
        listeners hear of the target once, at the end."""
        try:
            with self.changes.batch():
                yield
        finally:
            self._local.source = None

    def copy_source(self, folder: str, uid: int) -> None:
        """The next message added by this thread (in ``copying``) is a copy of this one."""
        self._local.source = (folder, uid)

    def added(self, u: _User, folder: str, info: _Info) -> None:
        source = getattr(self._local, "source", None)
        self._local.source = None
        extra: dict[str, Any] = {}
        if source is not None:
            extra = {"from": source[0], "from_uid": source[1]}
        where = {"blob": info.blob} if info.blob is not None else {"file": info.filename}
        self._record(
            u,
            k.MESSAGE_ADDED if source is None else k.MESSAGE_COPIED,
            folder,
            uid=info.uid,
            modseq=info.modseq,
            size=info.size,
            flags=_flags(info.flags),
            internaldate=info.internaldate,
            tz=info.internaldate_tz,
            **where,
            **extra,
        )

    def flags(
        self, u: _User, folder: str, modseq: int, infos: Iterable[_Info], vanished: Iterable[int]
    ) -> None:
        """Flags changed (``infos`` as they are now); ``vanished``: messages whose file was
        gone (removed by another program), dropped by the same transaction."""
        changes = [[i.uid, i.modseq, _flags(i.flags)] for i in infos]
        if changes:
            self._record(u, k.MESSAGE_FLAGS, folder, modseq=modseq, changes=changes)
        self.expunged(u, folder, vanished, modseq)

    def expunged(self, u: _User, folder: str, uids: Iterable[int], modseq: int) -> None:
        gone = sorted(uids)
        if gone:
            self._record(u, k.MESSAGE_EXPUNGED, folder, uids=gone, modseq=modseq)

    def moved(
        self,
        u: _User,
        src: str,
        dst: str,
        pairs: Iterable[tuple[int, int]],
        modseqs: Iterable[int] | None = None,
        src_modseq: int | None = None,
        to_modseq: int | None = None,
    ) -> None:
        """Messages moved; ``modseqs`` (their modseqs in ``dst``, one per pair), the
        folders' new HIGHESTMODSEQs ``src_modseq`` and ``to_modseq`` let a replica reproduce
        the move exactly."""
        moved = [[a, b] for a, b in pairs]
        if moved:
            extra: dict[str, Any] = {}
            if modseqs is not None:
                extra = {"modseqs": list(modseqs), "modseq": src_modseq, "to_modseq": to_modseq}
            self._record(u, k.MESSAGE_MOVED, src, to=dst, uids=moved, **extra)

    def resynced(
        self,
        u: _User,
        folder: str,
        modseq: int,
        added: list[list[Any]],
        removed: list[int],
        changed: list[list[Any]],
    ) -> None:
        if added or removed or changed:
            self._record(
                u,
                k.MAILBOX_RESYNCED,
                folder,
                modseq=modseq,
                added=added,
                removed=sorted(removed),
                changed=changed,
            )

    # -- folders ---------------------------------------------------------------------------------

    def created(
        self,
        u: _User,
        c: sqlite3.Connection,
        folder_id: int,
        folder: str,
        subscribed: bool,
        found: bool,
    ) -> None:
        row = c.execute("SELECT uidvalidity FROM mailboxes WHERE id = ?", (folder_id,)).fetchone()
        payload: dict[str, Any] = {"uidvalidity": int(row[0]), "subscribed": subscribed}
        if found:
            payload["found"] = True
        self._record(u, k.MAILBOX_CREATED, folder, **payload)

    def deleted(self, u: _User, folder: str) -> None:
        self._record(u, k.MAILBOX_DELETED, folder)

    def renamed(self, u: _User, old: str, new: str) -> None:
        self._record(u, k.MAILBOX_RENAMED, new, **{"from": old})

    def subscribed(self, u: _User, folder: str, subscribed: bool) -> None:
        self._record(u, k.MAILBOX_SUBSCRIBED, folder, subscribed=subscribed)

    # -- tiers -----------------------------------------------------------------------------------

    def migrated(self, u: _User, folder: str, uid: int, blob: str) -> None:
        self._record(u, k.TIER_MIGRATED, folder, uid=uid, blob=blob)

    def promoted(self, u: _User, folder: str, uid: int, filename: str) -> None:
        self._record(u, k.TIER_PROMOTED, folder, uid=uid, file=filename)
