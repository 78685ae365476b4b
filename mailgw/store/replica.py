"""The store as a disaster-recovery replica writes it: each change of the primary applied
with the primary's own UIDs, modseqs, UIDVALIDITY, flags and internal dates, and the
primary's sequence number of the change (``replica_seq`` in the user's index ``meta``)
recorded in the same write transaction, so an entry is applied once or not at all.

Used by ``mailgw.replication.apply``; it reaches into the facade's internals (user handles,
folders, the tier-1 backend and the tier-2 placement) as the store's own layers do.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from mailgw.interfaces import MailboxNotFound
from mailgw.model.message import MessageInfo
from mailgw.store import maildir
from mailgw.store.backend import Folder, UserHandle
from mailgw.store.facade import MessageStore
from mailgw.store.mailbox import Mailbox
from mailgw.store.names import INBOX
from mailgw.store.rows import ROW_COLUMNS, add_tombstones, info_from_row

SEQ_KEY = "replica_seq"
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _reloads_snapshots(method: _Method) -> _Method:
    """After the method (its first argument the user) the user's folder snapshots in this
    process reload whole: the primary's modseqs need not be above those they were loaded at."""

    @functools.wraps(method)
    def run(self: ReplicaStore, user: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, user, *args, **kwargs)
        finally:
            self.store._forget_snapshots(user)

    return cast(_Method, run)


def applied_seq(conn: sqlite3.Connection) -> int:
    """The primary's last sequence number applied to this index (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (SEQ_KEY,)).fetchone()
    return int(row[0]) if row else 0


def _done(conn: sqlite3.Connection, seq: int | None) -> bool:
    """True when entry ``seq`` is applied already (never for None: a resync's changes)."""
    return seq is not None and applied_seq(conn) >= seq


def _mark(c: sqlite3.Connection, seq: int | None) -> None:
    if seq is None:
        return
    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (SEQ_KEY, str(seq)))


def _totals(c: sqlite3.Connection, folder_id: int) -> None:
    c.execute(
        "UPDATE mailboxes SET"
        " total_size = (SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ?),"
        " message_count = (SELECT COUNT(*) FROM messages WHERE mailbox = ?) WHERE id = ?",
        (folder_id, folder_id, folder_id),
    )


def _raise_marks(c: sqlite3.Connection, folder_id: int, uidnext: int, modseq: int) -> None:
    c.execute(
        "UPDATE mailboxes SET uidnext = max(uidnext, ?), highestmodseq = max(highestmodseq, ?)"
        " WHERE id = ?",
        (uidnext, modseq, folder_id),
    )


class ReplicaStore:
    """Applies the primary's store changes to ``store`` (this node's ``MessageStore``).
    Every method takes the entry's ``seq`` and does nothing when the user's index has
    applied it already."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    # -- positions -------------------------------------------------------------------------

    def user_seq(self, user: str) -> int:
        """The last sequence number applied to ``user``'s index."""
        u = self.store._user(user)
        with u.lock:
            return applied_seq(u.index.conn)

    def position(self) -> int:
        """The highest sequence number applied to any user's index (entries are applied in
        order, so every lower one is applied too)."""
        return max([0, *(self.user_seq(user) for user in self.store.users())])

    def _folder_or_none(self, u: UserHandle, name: str) -> Folder | None:
        try:
            return self.store._folder(u, name)
        except MailboxNotFound:
            return None

    def reset(self, user: str) -> None:
        """Forget the applied position of ``user``'s index (a full resync from another
        primary, whose numbers mean nothing here, starts)."""
        u = self.store._user(user)
        with u.lock, u.index.write() as c:
            c.execute("DELETE FROM meta WHERE key = ?", (SEQ_KEY,))

    @_reloads_snapshots
    def set_marks(self, user: str, folder: str, uidnext: int, highestmodseq: int) -> None:
        """A resync's last step for a folder: the primary's UIDNEXT and HIGHESTMODSEQ."""
        u = self.store._user(user)
        with u.lock:
            f = self._folder_or_none(u, folder)
            if f is None:
                return
            with u.index.write() as c:
                c.execute(
                    "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                    (uidnext, highestmodseq, f.id),
                )

    def mark(self, user: str, seq: int | None) -> None:
        """Record ``seq`` as applied to ``user``'s index without any other change (an entry
        with nothing left to do: its message gone on the primary meanwhile, an unknown
        kind)."""
        u = self.store._user(user)
        with u.lock, u.index.write() as c:
            if not _done(c, seq):
                _mark(c, seq)

    # -- folders ---------------------------------------------------------------------------

    @_reloads_snapshots
    def created(
        self, user: str, seq: int | None, name: str, uidvalidity: int, subscribed: bool
    ) -> None:
        """The primary has folder ``name`` with ``uidvalidity`` (a new user's folders, CREATE)."""
        store = self.store
        u = self.store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            path = store.tier1.make_folder(u, name)
            with u.index.write() as c:
                row = c.execute(
                    "SELECT id, uidvalidity FROM mailboxes WHERE name = ?", (name,)
                ).fetchone()
                if row is None:
                    new = c.execute(
                        "INSERT INTO mailboxes(name, uidvalidity) VALUES (?, ?) RETURNING id",
                        (name, uidvalidity),
                    ).fetchone()
                    folder_id = int(new[0])
                    store.placement.restore_manifest(c, u, folder_id, name, path)
                    store._journal.created(u, c, folder_id, name, subscribed, False)
                elif int(row[1]) != uidvalidity:
                    # Made here before the primary's entry arrived (a new user's defaults):
                    # the primary's UIDVALIDITY wins, its messages (if any) start afresh.
                    folder_id = int(row[0])
                    for (filename,) in c.execute(
                        "SELECT filename FROM messages WHERE mailbox = ? AND blob IS NULL",
                        (folder_id,),
                    ).fetchall():
                        store.tier1.unlink(Folder(folder_id, name, path), str(filename))
                    c.execute("DELETE FROM messages WHERE mailbox = ?", (folder_id,))
                    c.execute("DELETE FROM tombstones WHERE mailbox = ?", (folder_id,))
                    c.execute(
                        "UPDATE mailboxes SET uidvalidity = ?, uidnext = 1, highestmodseq = 1,"
                        " total_size = 0, message_count = 0 WHERE id = ?",
                        (uidvalidity, folder_id),
                    )
                if subscribed:
                    c.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
                last = c.execute("SELECT value FROM meta WHERE key = 'last_uidvalidity'").fetchone()
                if last is None or int(last[0]) < uidvalidity:
                    c.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)",
                        (str(uidvalidity),),
                    )
                _mark(c, seq)

    @_reloads_snapshots
    def deleted(self, user: str, seq: int | None, name: str) -> None:
        store = self.store
        u = store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = self._folder_or_none(u, name) if name != INBOX else None
            trash = ""
            with u.index.write() as c:
                if f is not None:
                    c.execute("DELETE FROM messages WHERE mailbox = ?", (f.id,))
                    c.execute("DELETE FROM tombstones WHERE mailbox = ?", (f.id,))
                    c.execute("DELETE FROM mailboxes WHERE id = ?", (f.id,))
                    store._journal.deleted(u, name)
                    trash = store.tier1.remove_folder(u, f)
                _mark(c, seq)
        if trash:
            store.tier1.purge(u, trash)

    @_reloads_snapshots
    def renamed(self, user: str, seq: int | None, old: str, new: str) -> None:
        store = self.store
        u = store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            exists = u.index.conn.execute(
                "SELECT 1 FROM mailboxes WHERE name = ?", (old,)
            ).fetchone()
            done: list[tuple[str, str]] = []
            try:
                with u.index.write() as c:
                    if exists and store.tier1.folder_exists(u, old):
                        c.execute(
                            "DELETE FROM messages WHERE mailbox IN "
                            "(SELECT id FROM mailboxes WHERE name = ?)",
                            (new,),
                        )
                        c.execute("DELETE FROM mailboxes WHERE name = ?", (new,))
                        done.append(store.tier1.rename_folder(u, old, new))
                        c.execute("UPDATE mailboxes SET name = ? WHERE name = ?", (new, old))
                        c.execute("DELETE FROM subscriptions WHERE name = ?", (new,))
                        c.execute("UPDATE subscriptions SET name = ? WHERE name = ?", (new, old))
                        store._journal.renamed(u, old, new)
                    _mark(c, seq)
            except BaseException:
                for moved in reversed(done):
                    store.tier1.undo_rename(moved)
                raise
            store.tier1.sync_root(u)

    def subscribed(self, user: str, seq: int | None, name: str, subscribed: bool) -> None:
        u = self.store._user(user)
        with u.lock, u.index.write() as c:
            if _done(c, seq):
                return
            if subscribed:
                c.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
            else:
                c.execute("DELETE FROM subscriptions WHERE name = ?", (name,))
            self.store._journal.subscribed(u, name, subscribed)
            _mark(c, seq)

    # -- messages --------------------------------------------------------------------------

    @_reloads_snapshots
    def added(
        self,
        user: str,
        seq: int | None,
        folder: str,
        uid: int,
        modseq: int,
        flags: Iterable[str],
        internaldate: float,
        tz: int,
        data: bytes | None = None,
        blob: str | None = None,
        filename: str = "",
    ) -> None:
        """A message the primary added (delivery, APPEND, COPY): with ``data`` (tier 1),
        ``blob`` (a tier-2 reference whose blobs this node's tier 2 holds) or neither (gone
        on the primary since: only the folder's UIDNEXT and HIGHESTMODSEQ move)."""
        store = self.store
        u = store._user(user)
        wanted = maildir.normalize_flags(flags)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = store._folder(u, folder)
            there = u.index.conn.execute(
                "SELECT 1 FROM messages WHERE mailbox = ? AND uid = ?", (f.id, uid)
            ).fetchone()
        if there or (data is None and blob is None):
            with u.lock, u.index.write() as c:
                _raise_marks(c, f.id, uid + 1, modseq)
                _mark(c, seq)
            return

        def allocate(c: sqlite3.Connection, size: int) -> tuple[int, int]:
            row = c.execute(
                "UPDATE mailboxes SET uidnext = max(uidnext, ?),"
                " highestmodseq = max(highestmodseq, ?), total_size = total_size + ?,"
                " message_count = message_count + 1 WHERE id = ? AND name = ? RETURNING id",
                (uid + 1, modseq, size, f.id, f.name),
            ).fetchone()
            if row is None:
                raise MailboxNotFound(f.name)
            _mark(c, seq)
            return uid, modseq

        if blob is not None:
            name = filename or f"cur/{uid}.replica:2,"
            with u.lock:
                store.placement.place_blob(
                    u, f, allocate, blob, self._blob_size(blob), wanted, internaldate, name, tz
                )
            return
        assert data is not None
        written = store.tier1.write(f, b"", None, data)
        with u.lock:
            info = store.tier1.place(u, f, written, wanted, internaldate, tz, allocate)
            store.tier1.make_durable(u, f, info)

    def _blob_size(self, ref: str) -> int:
        from mailgw.store import blobs

        tier2 = self.store.placement.store()
        total = 0
        for digest in blobs.split_ref(ref):
            with tier2.open(digest) as fh:
                total += len(fh.read())
        return total

    @_reloads_snapshots
    def flags(
        self,
        user: str,
        seq: int | None,
        folder: str,
        modseq: int,
        changes: Sequence[Sequence[Any]],
    ) -> None:
        """Flag changes: ``changes`` [[uid, modseq, flags]]."""
        store = self.store
        u = store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = self._folder_or_none(u, folder)
            with u.index.write() as c:
                if f is None:
                    _mark(c, seq)
                    return
                put: list[MessageInfo] = []
                removed: list[int] = []
                for uid, msg_modseq, flag_list in changes:
                    row = c.execute(
                        f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                        (f.id, int(uid)),
                    ).fetchone()
                    if row is None:
                        continue
                    info = info_from_row(row)
                    new = maildir.normalize_flags(flag_list)
                    text = maildir.flags_to_text(new)
                    if info.blob is not None:
                        c.execute(
                            "UPDATE messages SET flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
                            (text, int(msg_modseq), f.id, info.uid),
                        )
                        store.placement.log_flags(u, f.id, info.uid, text)
                    else:
                        rel = store.tier1.rename_for_flags(f, info.filename, new)
                        if rel is None:
                            c.execute(
                                "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                                (f.id, info.uid),
                            )
                            add_tombstones(c, f.id, [info.uid], int(msg_modseq))
                            removed.append(info.uid)
                            continue
                        c.execute(
                            "UPDATE messages SET filename = ?, flags = ?, modseq = ?"
                            " WHERE mailbox = ? AND uid = ?",
                            (rel, text, int(msg_modseq), f.id, info.uid),
                        )
                    put.append(
                        info_from_row(
                            c.execute(
                                f"SELECT {ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                                (f.id, info.uid),
                            ).fetchone()
                        )
                    )
                if removed:
                    _totals(c, f.id)
                c.execute(
                    "UPDATE mailboxes SET highestmodseq = max(highestmodseq, ?) WHERE id = ?",
                    (modseq, f.id),
                )
                store.tier1.record_mtimes(c, u, f)
                store._journal.flags(u, f.name, modseq, put, removed)
                _mark(c, seq)

    @_reloads_snapshots
    def expunged(
        self, user: str, seq: int | None, folder: str, uids: Iterable[int], modseq: int
    ) -> None:
        store = self.store
        u = store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = self._folder_or_none(u, folder)
            with u.index.write() as c:
                if f is None:
                    _mark(c, seq)
                    return
                removed: list[int] = []
                for uid in sorted({int(x) for x in uids}):
                    row = c.execute(
                        "SELECT filename, blob FROM messages WHERE mailbox = ? AND uid = ?",
                        (f.id, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    if row[1] is None:
                        store.tier1.unlink(f, str(row[0]))
                    else:
                        store.tier1.discard(f, str(row[0]))
                        store.placement.log_delete(u, f.id, uid)
                    c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (f.id, uid))
                    removed.append(uid)
                add_tombstones(c, f.id, removed, modseq)
                _totals(c, f.id)
                c.execute(
                    "UPDATE mailboxes SET highestmodseq = max(highestmodseq, ?) WHERE id = ?",
                    (modseq, f.id),
                )
                store.tier1.record_mtimes(c, u, f)
                store._journal.expunged(u, f.name, removed, modseq)
                _mark(c, seq)

    @_reloads_snapshots
    def moved(
        self,
        user: str,
        seq: int | None,
        src_name: str,
        dst_name: str,
        pairs: Sequence[Sequence[int]],
        modseqs: Sequence[int] | None,
        src_modseq: int | None,
        to_modseq: int | None = None,
    ) -> None:
        """Messages moved: ``pairs`` [[old uid, new uid]], ``modseqs`` their modseqs in the
        target and ``src_modseq`` the source's (None, from an older journal: counted here as
        the primary counted them)."""
        store = self.store
        u = store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            src = self._folder_or_none(u, src_name)
            dst = self._folder_or_none(u, dst_name)
            with u.index.write() as c:
                if src is None or dst is None:
                    _mark(c, seq)
                    return
                box = c.execute(
                    "SELECT highestmodseq FROM mailboxes WHERE id = ?", (dst.id,)
                ).fetchone()
                src_box = c.execute(
                    "SELECT highestmodseq FROM mailboxes WHERE id = ?", (src.id,)
                ).fetchone()
                next_modseq = int(box[0])
                gone_modseq = src_modseq if src_modseq is not None else int(src_box[0]) + 1
                done: list[tuple[int, int]] = []
                top_uid = 0
                for n, (old, new) in enumerate(pairs):
                    next_modseq = modseqs[n] if modseqs is not None else next_modseq + 1
                    top_uid = max(top_uid, int(new))
                    row = c.execute(
                        "SELECT base, filename, size, flags, internaldate, blob, internaldate_tz"
                        " FROM messages WHERE mailbox = ? AND uid = ?",
                        (src.id, int(old)),
                    ).fetchone()
                    if row is None:
                        continue
                    base, filename, size, flags, internaldate, blob, tz = row
                    if blob is not None:
                        store.tier1.discard(src, filename)
                        store.placement.log_delete(u, src.id, int(old))
                    else:
                        current = store.tier1.move(src, dst, filename, base)
                        if current is None:  # vanished here: drop the row
                            c.execute(
                                "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                                (src.id, int(old)),
                            )
                            add_tombstones(c, src.id, [int(old)], gone_modseq)
                            continue
                        filename = current
                    c.execute(
                        "DELETE FROM messages WHERE mailbox = ? AND uid = ?", (src.id, int(old))
                    )
                    c.execute(
                        "INSERT OR REPLACE INTO messages(mailbox, uid, base, filename, size, flags,"
                        " internaldate, modseq, blob, internaldate_tz)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            dst.id,
                            int(new),
                            base,
                            filename,
                            size,
                            flags,
                            internaldate,
                            next_modseq,
                            blob,
                            tz,
                        ),
                    )
                    if blob is not None:
                        store.placement.log_put(u, c, dst.id, int(new))
                    add_tombstones(c, src.id, [int(old)], gone_modseq)
                    done.append((int(old), int(new)))
                for folder in (src, dst):
                    _totals(c, folder.id)
                _raise_marks(c, src.id, 0, gone_modseq)
                _raise_marks(
                    c, dst.id, top_uid + 1, to_modseq if to_modseq is not None else next_modseq + 1
                )
                store.tier1.record_mtimes(c, u, src)
                store.tier1.record_mtimes(c, u, dst)
                store._journal.moved(u, src.name, dst.name, done, modseqs, gone_modseq, to_modseq)
                _mark(c, seq)
        store.tier1.sync_dirs(src, dst)

    @_reloads_snapshots
    def migrated(self, user: str, seq: int | None, folder: str, uid: int) -> None:
        """The primary moved the message to tier 2 (this node's tier 2 holds its blobs)."""
        u = self.store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = self._folder_or_none(u, folder)
        if f is not None and self.store.tier2 is not None:
            self.store.placement.migrate(u, f, uid)
        self.mark(user, seq)

    @_reloads_snapshots
    def promoted(self, user: str, seq: int | None, folder: str, uid: int) -> None:
        u = self.store._user(user)
        with u.lock:
            if _done(u.index.conn, seq):
                return
            f = self._folder_or_none(u, folder)
        if f is not None and self.store.tier2 is not None:
            self.store.placement.promote(u, f, uid)
        self.mark(user, seq)

    # -- comparing -------------------------------------------------------------------------

    def digest(self, user: str) -> dict[str, Any]:
        """What must be identical on both nodes for ``user``: each folder's UIDVALIDITY,
        UIDNEXT, HIGHESTMODSEQ and messages (UID -> sha256 of the bytes, flags, modseq,
        internal date and zone, size, tier), and the subscriptions."""
        store = self.store
        u = store._user(user)
        out: dict[str, Any] = {"folders": {}, "subscriptions": store.list_subscribed(user)}
        for name in store.list_mailboxes(user):
            with u.lock:
                row = u.index.conn.execute(
                    "SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes WHERE name = ?",
                    (name,),
                ).fetchone()
            if row is None:
                continue
            # A private snapshot read from the index now: a kept shared one trusts the
            # modseqs, and a verify must see even rows changed behind the store's back.
            with u.lock:
                box = Mailbox(store, user, store._folder(u, name), shared=False)
            messages: dict[str, list[Any]] = {}
            for info in box.messages():
                try:
                    with box.open_message(info.uid) as fh:
                        sha = hashlib.sha256(fh.read()).hexdigest()
                except (KeyError, OSError):
                    sha = "missing"
                messages[str(info.uid)] = [
                    sha,
                    sorted(info.flags),
                    info.modseq,
                    round(info.internaldate, 3),
                    info.internaldate_tz,
                    info.size,
                    "tier2" if info.blob is not None else "tier1",
                ]
            out["folders"][name] = {
                "uidvalidity": int(row[1]),
                "uidnext": int(row[2]),
                "highestmodseq": int(row[3]),
                "messages": messages,
            }
        return out


def read_current(store: MessageStore, user: str, base: str) -> tuple[str, MessageInfo] | None:
    """Where the message whose Maildir base name is ``base`` is now in ``user``'s folders
    (moved, renamed for flags or migrated since it was added): (folder, info), or None when
    it is gone."""
    u = store._user(user)
    with u.lock:
        row = u.index.conn.execute(
            f"SELECT b.name, {', '.join('m.' + c.strip() for c in ROW_COLUMNS.split(','))}"
            " FROM messages m JOIN mailboxes b ON b.id = m.mailbox WHERE m.base = ?"
            " ORDER BY m.uid DESC LIMIT 1",
            (base,),
        ).fetchone()
    if row is None:
        return None
    return str(row[0]), info_from_row(row[1:])


def current_row(store: MessageStore, user: str, folder: str, uid: int) -> MessageInfo | None:
    """The message ``uid`` of ``folder`` as the index has it now (None: gone)."""
    u = store._user(user)
    with u.lock:
        row = u.index.conn.execute(
            f"SELECT {', '.join('m.' + c.strip() for c in ROW_COLUMNS.split(','))}"
            " FROM messages m JOIN mailboxes b ON b.id = m.mailbox"
            " WHERE b.name = ? AND m.uid = ?",
            (folder, uid),
        ).fetchone()
    return None if row is None else info_from_row(row)


def base_of(filename: str) -> str:
    """The Maildir base name of ``cur/BASE:2,FLAGS`` (or ``new/BASE``)."""
    return maildir.split_filename(os.path.basename(filename))[0]
