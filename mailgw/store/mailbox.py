"""A folder of one user as the store facade opens it (``IMailbox``), and the snapshot of its
messages that the ``Mailbox`` objects of the folder share in a process.

``Mailbox`` works on the user's index (rows, modseqs, tombstones, the ``\\Recent`` mark)
and reaches message bytes through the facade's tier-1 backend (``store.tier1``, an
``IMessageBackend``) or tier-2 placement (``store.placement``).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import sqlite3
import weakref
from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from zope.interface import implementer

from mailgw.interfaces import IMailbox
from mailgw.model.message import MessageInfo
from mailgw.store import blobs, maildir
from mailgw.store.backend import Folder, MessageData, UserHandle, folder_gone
from mailgw.store.rows import ROW_COLUMNS, add_tombstones, info_from_row, split_internaldate

if TYPE_CHECKING:
    from mailgw.store.facade import MessageStore


class Snapshot:
    """The messages of one folder as of the index state ``loaded`` (UIDVALIDITY, UIDNEXT,
    HIGHESTMODSEQ; None before the first load), shared by every ``Mailbox`` object of the
    folder in this process and changed only under the user's lock. Each change is told to
    the ``watchers`` (weakly held; the IMAP selected state) with the message's previous
    info: ``snapshot_changed(uid, old)`` (``old`` None for a new message) after a message
    was added, changed or removed, ``snapshot_reloaded(old_infos)`` after a full reload."""

    __slots__ = ("infos", "loaded", "watchers", "_uids", "_keywords", "_unseen", "__weakref__")

    def __init__(self) -> None:
        self.infos: dict[int, MessageInfo] = {}  # kept in UID order
        self.loaded: tuple[int, int, int] | None = None
        self.watchers: weakref.WeakSet[Any] = weakref.WeakSet()
        # What a SELECT needs of the whole folder, computed once per state (None: to do).
        self._uids: array[int] | None = None
        self._keywords: frozenset[str] | None = None
        self._unseen: int | None = None  # the first UID without \Seen (0: none)

    def _changed(self) -> None:
        self._uids = self._keywords = self._unseen = None

    def uids(self) -> array[int]:
        """The UIDs, ascending (a shared array: copy it to keep or change it)."""
        if self._uids is None:
            self._uids = array("I", self.infos)
        return self._uids

    def keywords(self) -> frozenset[str]:
        """The keywords (flags without a backslash) some message has."""
        if self._keywords is None:
            sets = {info.flags for info in self.infos.values()}
            self._keywords = frozenset(f for s in sets for f in s if not f.startswith("\\"))
        return self._keywords

    def first_unseen(self) -> int:
        """The lowest UID without ``\\Seen``, 0 when every message has it."""
        if self._unseen is None:
            self._unseen = next(
                (uid for uid, info in self.infos.items() if "\\Seen" not in info.flags), 0
            )
        return self._unseen

    def put(self, info: MessageInfo) -> None:
        """Add or replace ``info``, keeping UID order."""
        self._changed()
        infos = self.infos
        old = infos.get(info.uid)
        infos[info.uid] = info
        if old is None and len(infos) > 1 and info.uid < next(reversed(infos)):
            # An older UID arriving after a newer one (another writer's append).
            self.infos = dict(sorted(infos.items()))
        if old is not info:
            for watcher in list(self.watchers):
                watcher.snapshot_changed(info.uid, old)

    def remove(self, uid: int) -> None:
        old = self.infos.pop(uid, None)
        if old is not None:
            self._changed()
            for watcher in list(self.watchers):
                watcher.snapshot_changed(uid, old)

    def replace(self, infos: dict[int, MessageInfo]) -> None:
        self._changed()
        old, self.infos = self.infos, infos
        for watcher in list(self.watchers):
            watcher.snapshot_reloaded(old)


@implementer(IMailbox)
class Mailbox:
    """One folder of one user as of its snapshot's last load.

    The snapshot (``messages()``) is shared by the Mailbox objects of the folder in this
    process: it moves forward when any of them refreshes or changes the folder (their own
    ``set_flags``/``expunge``/``append``/``move_to`` show in it at once), never while the
    caller holds the list ``messages()`` returned. ``uidnext`` and ``highestmodseq`` are
    those of this object's last refresh or change. Changes by other processes appear on
    ``refresh()``; watchers registered with ``watch`` hear of every change of the snapshot.
    """

    def __init__(
        self,
        store: MessageStore,
        user: str,
        folder: Folder,
        snapshot: bool = True,
        shared: bool = True,
    ) -> None:
        self._store = store
        self._user = user
        self._folder = folder
        # ``shared`` false: a private snapshot (a writer in another thread must not change
        # the shared one, whose watchers live in the reactor thread).
        self._snap = store._snapshot(user, folder) if shared else Snapshot()
        self.name = folder.name
        self.uidvalidity = 0
        self.uidnext = 1
        self.highestmodseq = 1
        self._fresh = False  # loaded from the index by this object (a kept snapshot may lag)
        if snapshot:
            self.refresh()
        else:
            u = self._u()
            with u.lock:
                row = self._state_row(u)
            self.uidvalidity, self.uidnext, self.highestmodseq = row[0], row[1], row[2]

    def _u(self) -> UserHandle:
        return self._store._user(self._user)

    def messages(self) -> list[MessageInfo]:
        """Every message of the snapshot, ordered by UID."""
        if not self._fresh or self._snap.loaded is None:  # not loaded, or kept and behind
            self.refresh()
        return list(self._snap.infos.values())

    def snapshot(self) -> Snapshot:
        """The shared snapshot itself (``infos``, ``uids()``, ``keywords()``,
        ``first_unseen()``), for readers in the reactor thread; loads nothing."""
        return self._snap

    def snapshot_info(self, uid: int) -> MessageInfo | None:
        """The snapshot's message ``uid`` (None when not in it); loads nothing."""
        return self._snap.infos.get(uid)

    def snapshot_count(self) -> int:
        """The number of messages in the snapshot; loads nothing."""
        return len(self._snap.infos)

    def watch(self, watcher: Any) -> None:
        """Tell ``watcher`` (held weakly) of every later change of the shared snapshot: see
        ``Snapshot``. Its callbacks run under the user's lock and must not use the store."""
        self._snap.watchers.add(watcher)

    def _state_row(self, u: UserHandle) -> tuple[int, int, int, int]:
        """(UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, message count) of the folder's row."""
        # The name too: the id may now be another folder's (renamed, deleted, re-created).
        row = u.index.conn.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, message_count FROM mailboxes"
            " WHERE id = ? AND name = ?",
            (self._folder.id, self._folder.name),
        ).fetchone()
        if row is None:
            raise folder_gone(self._folder)
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def refresh(self) -> None:
        """Repair the index if the folder's files changed, then bring the snapshot up to
        date (``_load``)."""
        u = self._u()
        with u.lock:
            self._store.tier1.sync(u, self._folder)
            self._load(u)

    def _load(self, u: UserHandle) -> None:
        """Bring the shared snapshot up to date from the index, in one read transaction:
        nothing to read when the index's UIDNEXT and HIGHESTMODSEQ are those last loaded;
        else only the rows and tombstones with a higher modseq (every change of a row or
        removal raises its modseq); a full reload when UIDVALIDITY changed, the modseq went
        back (a rebuilt index) or the message count disagrees."""
        snap = self._snap
        conn = u.index.conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            row = self._state_row(u)
            state = (row[0], row[1], row[2])
            loaded = snap.loaded
            if state != loaded:
                if loaded is None or loaded[0] != state[0] or state[2] < loaded[2]:
                    snap.replace(self._rows(conn))
                else:
                    self._apply_changes(conn, loaded[2])
                    if len(snap.infos) != row[3]:
                        snap.replace(self._rows(conn))
                snap.loaded = state
        finally:
            if own:
                conn.execute("COMMIT")
        self.uidvalidity, self.uidnext, self.highestmodseq = state
        self._fresh = True

    def _rows(self, conn: sqlite3.Connection) -> dict[int, MessageInfo]:
        rows = conn.execute(
            f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? ORDER BY uid",
            (self._folder.id,),
        ).fetchall()
        return {int(r[0]): info_from_row(r) for r in rows}

    def _apply_changes(self, conn: sqlite3.Connection, modseq: int) -> None:
        """Apply the index's changes above ``modseq`` (removals, then changed/new rows)."""
        for (uid,) in conn.execute(
            "SELECT uid FROM tombstones WHERE mailbox = ? AND modseq > ?",
            (self._folder.id, modseq),
        ).fetchall():
            self._snap.remove(int(uid))
        rows = conn.execute(
            f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ? ORDER BY uid",
            (self._folder.id, modseq),
        ).fetchall()
        for r in rows:
            self._snap.put(info_from_row(r))

    def _wrote(
        self,
        u: UserHandle,
        before: tuple[int, int, int],
        after: tuple[int, int, int],
        put: Iterable[MessageInfo] = (),
        removed: Iterable[int] = (),
    ) -> None:
        """After this object changed the folder from index state ``before`` to ``after``:
        apply the change to the shared snapshot directly when it was loaded at ``before``
        (nobody else wrote meanwhile), else load it from the index; a snapshot never loaded
        stays so."""
        snap = self._snap
        if snap.loaded is None:
            self.uidvalidity, self.uidnext, self.highestmodseq = after
        elif snap.loaded == before:
            for uid in removed:
                snap.remove(uid)
            for info in put:
                snap.put(info)
            snap.loaded = after
            self.uidvalidity, self.uidnext, self.highestmodseq = after
        else:
            self._load(u)

    def _box_state(self, u: UserHandle) -> tuple[int, int, int]:
        """(UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) of the folder's row; MailboxNotFound."""
        row = self._state_row(u)
        return (row[0], row[1], row[2])

    def _lookup(self, u: UserHandle, uid: int) -> MessageInfo | None:
        row = u.index.conn.execute(
            f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
            (self._folder.id, uid),
        ).fetchone()
        return None if row is None else info_from_row(row)

    def open_message(self, uid: int) -> BinaryIO:
        """The stored bytes as a binary file; KeyError if the UID is gone. A stale snapshot
        entry (the file renamed by a flag change, the message promoted back to tier 1 and
        its blob collected) is looked up again in the index."""
        u = self._u()
        with u.lock:
            info = self._snap.infos.get(uid) or self._lookup(u, uid)
            tried: set[str] = set()
            for attempt in range(3):
                if info is None:
                    break
                if info.blob is not None:
                    try:
                        return self._store._open_tier2(u, self._folder, info)
                    except blobs.BlobNotFound:
                        fresh = self._lookup(u, uid)
                        if fresh is not None and fresh.blob == info.blob:
                            raise
                        info = fresh
                        continue
                if info.filename not in tried:
                    tried.add(info.filename)
                    try:
                        return self._store.tier1.open(self._folder, info.filename)
                    except FileNotFoundError:
                        pass
                # Renamed (flags) or removed by someone else: ask the index, then repair it.
                if attempt == 1:
                    self._store.tier1.sync(u, self._folder)
                info = self._lookup(u, uid)
        raise KeyError(uid)

    def read_message(self, uid: int) -> bytes:
        """The stored bytes of the message; KeyError if the UID is gone."""
        with self.open_message(uid) as fh:
            return fh.read()

    def set_flags(
        self, uids: Iterable[int], flags: Iterable[str], mode: str
    ) -> dict[int, MessageInfo]:
        """Set, add or remove flags (``mode`` ``set``/``add``/``remove``); renames the files
        so their ``:2,`` letters match. Returns the MessageInfo of every UID still present.
        ValueError for a bad mode or flag."""
        if mode not in ("set", "add", "remove"):
            raise ValueError(f"unknown flag mode {mode!r}")
        wanted = maildir.normalize_flags(flags)
        result: dict[int, MessageInfo] = {}
        changed = False
        put: list[MessageInfo] = []
        removed: list[int] = []
        u = self._u()
        with u.lock:
            with u.index.write() as c:
                before = self._box_state(u)
                modseq = before[2]
                for uid in sorted(set(uids)):
                    row = c.execute(
                        f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                        (self._folder.id, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    info = info_from_row(row)
                    if mode == "set":
                        new = wanted
                    elif mode == "add":
                        new = info.flags | wanted
                    else:
                        new = info.flags - wanted
                    if new != info.flags:
                        modseq += 1
                        renamed = self._rename_for(c, u, info, new, modseq)
                        changed = True
                        if renamed is None:
                            removed.append(uid)
                            continue
                        info = renamed
                        put.append(info)
                    result[uid] = info
                if changed:
                    c.execute(
                        "UPDATE mailboxes SET highestmodseq = ? WHERE id = ?",
                        (modseq, self._folder.id),
                    )
                    self._store.tier1.record_mtimes(c, u, self._folder)
                    self._store._journal.flags(u, self.name, modseq, put, removed)
            if changed:
                self._wrote(u, before, (before[0], before[1], modseq), put, removed)
        return result

    def _rename_for(
        self,
        c: sqlite3.Connection,
        u: UserHandle,
        info: MessageInfo,
        flags: frozenset[str],
        modseq: int,
    ) -> MessageInfo | None:
        """Rename the file for ``flags`` and update its row; None if the file vanished."""
        if info.blob is not None:  # tier 2: the flags live in the index and the manifest
            text = maildir.flags_to_text(flags)
            c.execute(
                "UPDATE messages SET flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
                (text, modseq, self._folder.id, info.uid),
            )
            self._store.placement.log_flags(u, self._folder.id, info.uid, text)
            return dataclasses.replace(info, flags=flags, modseq=modseq)
        rel = self._store.tier1.rename_for_flags(self._folder, info.filename, flags)
        if rel is None:
            c.execute(
                "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                (self._folder.id, info.uid),
            )
            add_tombstones(c, self._folder.id, [info.uid], modseq)
            self._fix_totals(c)
            return None
        c.execute(
            "UPDATE messages SET filename = ?, flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
            (rel, maildir.flags_to_text(flags), modseq, self._folder.id, info.uid),
        )
        return dataclasses.replace(info, flags=flags, modseq=modseq, filename=rel)

    def _fix_totals(self, c: sqlite3.Connection) -> None:
        c.execute(
            "UPDATE mailboxes SET"
            " total_size = (SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ?),"
            " message_count = (SELECT COUNT(*) FROM messages WHERE mailbox = ?) WHERE id = ?",
            (self._folder.id, self._folder.id, self._folder.id),
        )

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Unlink the files and drop the rows; returns the UIDs actually removed."""
        removed: list[int] = []
        freed = 0
        u = self._u()
        with u.lock:
            with u.index.write() as c:
                before = self._box_state(u)
                modseq = before[2]
                for uid in sorted(set(uids)):
                    row = c.execute(
                        "SELECT filename, size, blob FROM messages WHERE mailbox = ? AND uid = ?",
                        (self._folder.id, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    filename = str(row[0])
                    freed += int(row[1])
                    # A tier-2 row only needs its row dropped (``store gc`` collects the blob
                    # once no index refers to it) and a tier-1 leftover of its migration
                    # removed, which would otherwise come back as a new message.
                    if row[2] is None:
                        self._store.tier1.unlink(self._folder, filename)
                    else:
                        self._store.tier1.discard(self._folder, filename)
                        self._store.placement.log_delete(u, self._folder.id, uid)
                    c.execute(
                        "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                        (self._folder.id, uid),
                    )
                    removed.append(uid)
                if removed:
                    modseq += 1
                    add_tombstones(c, self._folder.id, removed, modseq)
                    c.execute(
                        "UPDATE mailboxes SET highestmodseq = ?, total_size = total_size - ?,"
                        " message_count = message_count - ? WHERE id = ?",
                        (modseq, freed, len(removed), self._folder.id),
                    )
                    self._store.tier1.record_mtimes(c, u, self._folder)
                    self._store._journal.expunged(u, self.name, removed, modseq)
            if removed:
                self._wrote(u, before, (before[0], before[1], modseq), (), removed)
        return removed

    def append(
        self,
        data: MessageData,
        flags: Iterable[str] = (),
        internaldate: datetime.datetime | float | None = None,
    ) -> int:
        """Store ``data`` with ``flags`` and ``internaldate`` (also the file's mtime);
        returns its UID. ``internaldate`` is an aware datetime (its zone is kept for FETCH
        INTERNALDATE and SEARCH BEFORE/ON/SINCE), a UTC epoch (zone +0000) or None (now, in
        the server's zone). QuotaExceeded when over quota; ValueError for a naive datetime."""
        when, tz = split_internaldate(internaldate)
        normalized = maildir.normalize_flags(flags)
        u = self._u()
        with u.lock:
            limit = self._store._quota_for(self._user)
            self._store._check_quota(u, limit, len(data))
            if isinstance(data, bytes):
                src, raw = None, data
            else:  # a file-like message (a spooled IMAP literal): copied in chunks
                src, raw = cast(BinaryIO, data), None
            info = self._store._store(u, self._folder, limit, b"", src, raw, normalized, when, tz)
            if self._snap.loaded is None:
                self.uidnext = max(self.uidnext, info.uid + 1)
                self.highestmodseq = max(self.highestmodseq, info.modseq)
            else:
                self._load(u)
        return info.uid

    def changes_since(self, modseq: int) -> tuple[list[MessageInfo], list[int]]:
        """(messages whose modseq is above ``modseq``, UIDs expunged since then), both read
        from the index now and ordered by UID (CONDSTORE CHANGEDSINCE, QRESYNC VANISHED)."""
        u = self._u()
        with u.lock:
            self._state_row(u)
            rows = u.index.conn.execute(
                f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ? ORDER BY uid",
                (self._folder.id, modseq),
            ).fetchall()
            gone = u.index.conn.execute(
                "SELECT uid FROM tombstones WHERE mailbox = ? AND modseq > ? ORDER BY uid",
                (self._folder.id, modseq),
            ).fetchall()
        return [info_from_row(r) for r in rows], [int(r[0]) for r in gone]

    # -- \\Recent: each message is recent in exactly one session (of any process) -------------

    def _recent_mark(self, c: sqlite3.Connection, u: UserHandle) -> int:
        row = c.execute(
            "SELECT recent_uid FROM mailboxes WHERE id = ? AND name = ?",
            (self._folder.id, self._folder.name),
        ).fetchone()
        if row is None:
            raise folder_gone(self._folder)
        return int(row[0])

    def claim_recent(self, uids: Iterable[int], ascending: bool = False) -> set[int]:
        """Claim the messages of ``uids`` that no session has seen as \\Recent yet and return
        them: the folder's claim mark (the highest claimed UID, in the index) moves up in a
        write transaction, so of several sessions, in any processes, exactly one gets each
        message. Writes nothing when no UID is above the mark. ``ascending``: ``uids`` is a
        sequence in ascending order (only the part above the mark is looked at).
        MailboxNotFound."""
        wanted: Sequence[int] = uids if ascending else list(uids)  # type: ignore[assignment]
        if not wanted:
            return set()
        top = wanted[-1] if ascending else max(wanted)
        u = self._u()
        with u.lock:
            if top <= self._recent_mark(u.index.conn, u):
                return set()
            with u.index.write() as c:
                mark = self._recent_mark(c, u)
                if ascending:
                    claimed = set(wanted[bisect.bisect_right(wanted, mark) :])
                else:
                    claimed = {x for x in wanted if x > mark}
                if claimed:
                    c.execute(
                        "UPDATE mailboxes SET recent_uid = ? WHERE id = ?",
                        (max(claimed), self._folder.id),
                    )
        return claimed

    def unclaimed_recent(self, uids: Iterable[int], ascending: bool = False) -> set[int]:
        """The messages of ``uids`` no session has claimed yet (\\Recent for a read-only
        session, which claims nothing); ``ascending`` as for ``claim_recent``.
        MailboxNotFound."""
        u = self._u()
        with u.lock:
            mark = self._recent_mark(u.index.conn, u)
        if ascending:
            wanted: Sequence[int] = uids  # type: ignore[assignment]
            return set(wanted[bisect.bisect_right(wanted, mark) :])
        return {x for x in uids if x > mark}

    def recent_count(self) -> int:
        """How many messages of the folder (in the index now) no session has claimed yet
        (STATUS RECENT). MailboxNotFound."""
        u = self._u()
        with u.lock:
            mark = self._recent_mark(u.index.conn, u)
            row = u.index.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE mailbox = ? AND uid > ?",
                (self._folder.id, mark),
            ).fetchone()
        return int(row[0])

    def copy_to(self, uids: Iterable[int], dest_name: str) -> list[tuple[int, int]]:
        """Copy messages (bytes, flags, internal date) into another folder of the same user;
        returns (source UID, new UID) pairs for the UIDs that exist, in UID order. A tier-1
        message is copied as a new file; a tier-2 one as a new row sharing the blob.
        QuotaExceeded (nothing copied) when the copies do not fit; MailboxNotFound when the
        destination does not exist."""
        u = self._u()
        pairs: list[tuple[int, int]] = []
        with u.lock, self._store._journal.copying():
            dest = self._store._folder(u, dest_name)
            infos = [i for i in (self._lookup(u, uid) for uid in sorted(set(uids))) if i]
            limit = self._store._quota_for(self._user)
            self._store._check_quota(u, limit, sum(i.size for i in infos))
            for info in infos:
                self._store._journal.copy_source(self.name, info.uid)
                if info.blob is not None:
                    new = self._store._place_blob(
                        u,
                        dest,
                        limit,
                        info.blob,
                        info.size,
                        info.flags,
                        info.internaldate,
                        info.filename,
                        info.internaldate_tz,
                    )
                else:
                    try:
                        src = self.open_message(info.uid)
                    except KeyError:
                        continue
                    with src:
                        new = self._store._store(
                            u,
                            dest,
                            limit,
                            b"",
                            src,
                            None,
                            info.flags,
                            info.internaldate,
                            info.internaldate_tz,
                        )
                pairs.append((info.uid, new.uid))
            if pairs and dest.id == self._folder.id and self._snap.loaded is not None:
                self._load(u)
        return pairs

    def move_to(self, uids: Iterable[int], dest_name: str) -> list[tuple[int, int]]:
        """Move messages into another folder of the same user (RFC 6851 MOVE: like COPY then
        EXPUNGE, done as renames in one transaction so the quota needs no room for a
        copy); returns (source UID, new UID) pairs. The moved UIDs leave this snapshot and
        become tombstones here. MailboxNotFound when the destination does not exist,
        ValueError when it is this folder."""
        u = self._u()
        with u.lock:
            dest = self._store._folder(u, dest_name)
            if dest.id == self._folder.id:
                raise ValueError("cannot move messages into their own folder")
            with u.index.write() as c:
                pairs = self._store._move_rows(c, u, self._folder, dest, uids)
                row = c.execute(
                    "SELECT highestmodseq FROM mailboxes WHERE id = ?", (self._folder.id,)
                ).fetchone()
            self._store.tier1.sync_dirs(self._folder, dest)
            if pairs:
                if self._snap.loaded is None:
                    self.highestmodseq = int(row[0])
                else:
                    self._load(u)
        return pairs
