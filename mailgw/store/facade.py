"""The mailbox store facade (``IMessageStore``): per-user folders, quota, listeners and the
tiering of messages, over the per-user SQLite index (``mailgw.store.index``).

Layers (each imports only those below it):

- ``facade`` (this module): ``MessageStore``, what callers use. It owns the user handles
  (index connections, LRU-bounded), folder resolution, UID/modseq allocation and the quota
  check (``_allocate``, in the same write transaction as the message's row), the change
  journal (``mailgw.journal.store.StoreJournal``: bound to each index, handed to the
  backend and the placement; every write site records its entries, ``UserIndex.write``
  writes them in the same transaction), the listeners (fed from the journal) and the hook
  run inside every index write transaction before COMMIT (``_before_commit``: the tier-2
  manifests).
- ``mailbox``: ``Mailbox`` (``IMailbox``), one open folder and its shared snapshot.
- ``backend``: ``IMessageBackend``, the seam to where tier-1 bytes live, with the handle
  types; ``tier1``: ``MaildirBackend``, Dovecot-compatible Maildir++ (the files are the
  truth; the index is repaired from them).
- ``tier2``: ``Tier2Placement``, blobs (``blobs``) and per-folder manifests (``manifest``),
  with the crash-safe moves between the tiers (``migrate``/``promote``).
- ``rows``, ``index``, ``maildir``, ``names``, ``blobs``, ``manifest``: helpers.

Values (``MessageInfo``, ``MailboxStatus``, ``StoreCheck``, ``BlobRef``) live in
``mailgw.model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sqlite3
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

from twisted.logger import Logger
from zope.interface import implementer

from mailgw.interfaces import IBlobStore, IMessageStore, MailboxNotFound, QuotaExceeded
from mailgw.journal.store import StoreJournal
from mailgw.model.message import MailboxStatus, MessageInfo, StoreCheck
from mailgw.store.backend import (
    Allocate,
    Folder,
    IMessageBackend,
    MessageData,
    UserHandle,
    folder_gone,
)
from mailgw.store.index import INDEX_NAME, UserIndex, new_uidvalidity, quarantine_index
from mailgw.store.mailbox import Mailbox, Snapshot
from mailgw.store.names import INBOX, normalize_folder
from mailgw.store.rows import add_tombstones
from mailgw.store.tier1 import MaildirBackend
from mailgw.store.tier2 import Tier2Placement

log = Logger()

# ``data_dir/replication/state`` -> why writes are refused (``MessageStore.write_refusal``).
_REFUSALS = {
    "replica": "This server is a read-only replica",
    "fenced": "This server was replaced by its replica; it accepts no changes until demoted",
}

# Folder snapshots kept loaded after their last Mailbox is gone (most recently opened first):
# at most this many folders and messages in all (a message's info is ~250 bytes), checked
# when a folder is opened.
RETAINED_SNAPSHOTS = 64
RETAINED_SNAPSHOT_MESSAGES = 100_000


class UnsyncedDeliveries:
    """Messages delivered without their directory fsync (``unsynced_deliveries``)."""

    def __init__(self, store: MessageStore) -> None:
        self._store = store
        self.placed: list[tuple[UserHandle, Folder, MessageInfo]] = []
        self.failed: set[tuple[str, int]] = set()
        """(user, UID) of every copy taken out again because its directory fsync failed."""

    def sync(self) -> set[tuple[str, int]]:
        """fsync the directory of every message delivered since the last call, once per
        directory; a message whose directory fsync failed is taken out again (file and
        index row) and added to ``failed``. Returns ``failed`` (of the whole batch)."""
        placed, self.placed = self.placed, []
        if placed:
            failed = self._store.tier1.make_durable_many(placed)
            self.failed.update((u.name, info.uid) for u, _, info in failed)
        return self.failed


@implementer(IMessageStore)
class MessageStore:
    """The message store of all users under ``root`` (``data_dir/mail``): the facade over
    the tier-1 backend ``backend`` (an ``IMessageBackend``; default: ``MaildirBackend`` on
    ``root``, Maildir++ named for ``hostname``) and the tier-2 placement (``tier2``, an
    ``IBlobStore``; None: no tier 2).

    Thread-safe: local delivery calls ``deliver`` from worker threads while the protocols
    use the store from the reactor thread. Each user's index connection is shared by the
    threads under the index's lock; message files are written and fsynced outside it.
    Every change is journaled in its write transaction (``mailgw.journal``, one
    ``self._journal`` call per write site, here, in ``Mailbox``, the backend and the tier-2
    placement); listeners hear of the committed entries (``changes``) in the thread that
    created the store (the reactor thread): a change made in another thread is reported
    through ``reactor.callFromThread``.
    """

    def __init__(
        self,
        root: str,
        quota_for: Callable[[str], int | None],
        default_folders: Sequence[str] = ("Sent", "Drafts", "Trash", "Junk", "Archive"),
        hostname: str = "localhost",
        max_open_users: int = 128,
        reactor: Any = None,
        tier2: IBlobStore | None = None,
        promote_on_read: bool = False,
        backend: IMessageBackend | None = None,
    ) -> None:
        self.tier1: IMessageBackend = (
            backend if backend is not None else MaildirBackend(root, hostname)
        )
        self.root = self.tier1.root
        self._journal = StoreJournal(self.root, reactor)
        self.changes = self._journal.changes
        """This process's view of the node's change journal (``IChangeLog``)."""
        self.tier1.journal = self._journal
        self.placement = Tier2Placement(self.tier1, tier2, self._patch_snapshot, self._journal)
        self.promote_on_read = promote_on_read and tier2 is not None
        self._quota_for = quota_for
        self._default_folders = tuple(normalize_folder(f) for f in default_folders)
        self._max_open = max(1, max_open_users)
        self._users: OrderedDict[str, UserHandle] = OrderedDict()
        self._users_lock = threading.Lock()
        # Per thread: the open ``unsynced_deliveries`` batch, if any.
        self._local = threading.local()
        # One snapshot per open folder, shared by its Mailbox objects (alive while one is).
        self._snapshots: weakref.WeakValueDictionary[tuple[str, int, str], Snapshot] = (
            weakref.WeakValueDictionary()
        )
        # The last folders opened stay loaded when nobody holds them (the next SELECT reads
        # only the index's changes since), up to RETAINED_SNAPSHOT_MESSAGES messages in all.
        self._retained: OrderedDict[tuple[str, int, str], Snapshot] = OrderedDict()
        self._refusal: tuple[tuple[int, int, int], str | None] | None = None

    def write_refusal(self) -> str | None:
        """Why the protocols must not change mail on this node now (None: they may): it is
        a disaster-recovery replica, or a primary that was replaced and has not been
        demoted yet (``data_dir/replication/state``, kept by ``mailgw.replication``). The
        replica's own applying of the primary's changes is not refused."""
        path = os.path.join(os.path.dirname(self.root), "replication", "state")
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)  # replaced by rename: a new inode
        cached = self._refusal
        if cached is None or cached[0] != key:
            try:
                with open(path, encoding="utf-8") as fh:
                    state = fh.read().split()
            except OSError:
                return None
            word = state[0] if state else ""
            reason = _REFUSALS.get(word)
            self._refusal = cached = (key, reason)
        return cached[1]

    @property
    def tier2(self) -> IBlobStore | None:
        """The tier-2 blob store (None: no tier 2)."""
        return self.placement.blob_store

    @tier2.setter
    def tier2(self, blob_store: IBlobStore | None) -> None:
        self.placement.blob_store = blob_store

    # -- users and their indexes ---------------------------------------------------------

    def close(self) -> None:
        """Close every cached index connection (the store stays usable: they reopen)."""
        with self._users_lock:
            users = list(self._users.values())
            self._users.clear()
        for u in users:
            u.index.close()

    def _user(self, user: str) -> UserHandle:
        with self._users_lock:
            cached = self._users.get(user)
            if cached is not None:
                self._users.move_to_end(user)
                return cached
        opened = self._open_user(user)
        evicted: list[UserHandle] = []
        with self._users_lock:
            cached = self._users.get(user)
            if cached is not None:  # another thread won the race
                evicted.append(opened)
                opened = cached
            else:
                self._users[user] = opened
            while len(self._users) > self._max_open:
                _name, old = self._users.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            old.index.close()
        return opened

    def _open_user(self, user: str, rebuild: bool = False) -> UserHandle:
        path = self.tier1.user_path(user)
        index_path = os.path.join(path, INDEX_NAME)
        try:
            index = UserIndex(index_path)
            if rebuild:
                index.check()
        except sqlite3.DatabaseError:
            if not rebuild:
                raise
            moved = quarantine_index(index_path)
            log.warn("store: index of {user} unreadable, moved to {moved}", user=user, moved=moved)
            index = UserIndex(index_path)
        u = UserHandle(user, path, index)
        self._journal.bind(index)
        index.before_commit = lambda c: self._before_commit(u, c)
        try:
            if index.get_meta("initialized") is None:
                self._initialize(u)
            if index.get_meta("tier2_manifests") is None:
                self.placement.start_manifests(u)
        except BaseException:
            index.close()
            raise
        return u

    def _initialize(self, u: UserHandle) -> None:
        """First use of a maildir: register INBOX, the folders on disk and the defaults, then
        index whatever files are already there (a Maildir migrated from elsewhere)."""
        on_disk = self.tier1.disk_folders(u)
        with u.index.write() as c:
            if c.execute("SELECT 1 FROM meta WHERE key = 'initialized'").fetchone():
                return
            for name in (INBOX, *self._default_folders, *on_disk):
                self._register(c, u, name)
            c.execute("INSERT INTO meta(key, value) VALUES ('initialized', '1')")
        for name in self._names_in_index(u):
            self.tier1.sync(u, self._folder(u, name), force=True)

    def _register(
        self,
        c: sqlite3.Connection,
        u: UserHandle,
        name: str,
        subscribe: bool = True,
        found: bool = True,
    ) -> bool:
        """Create the folder's directories and index row if missing (in a write txn). A new
        folder is subscribed when ``subscribe``: the defaults of a new user and folders found
        on disk are; IMAP CREATE is not (RFC 3501 6.3.3: the client subscribes). ``found``
        false: made by CREATE (journaled as such)."""
        path = self.tier1.make_folder(u, name)
        if c.execute("SELECT 1 FROM mailboxes WHERE name = ?", (name,)).fetchone():
            return False
        row = c.execute(
            "INSERT INTO mailboxes(name, uidvalidity) VALUES (?, ?) RETURNING id",
            (name, new_uidvalidity(c)),
        ).fetchone()
        if subscribe:
            c.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
        self.placement.restore_manifest(c, u, int(row[0]), name, path)
        self._journal.created(u, c, int(row[0]), name, subscribe, found)
        return True

    def _names_in_index(self, u: UserHandle) -> list[str]:
        return [str(r[0]) for r in u.index.conn.execute("SELECT name FROM mailboxes")]

    def _folder(self, u: UserHandle, name: str) -> Folder:
        """Resolve a folder name from the index (one lookup by its unique name, never
        cached: another process may have renamed, deleted or re-created it); folders made on
        disk by another program are adopted. MailboxNotFound when it does not exist,
        ValueError when the name is invalid."""
        canonical = normalize_folder(name)
        row = u.index.conn.execute(
            "SELECT id FROM mailboxes WHERE name = ?", (canonical,)
        ).fetchone()
        if row is None:
            if canonical != INBOX and not self.tier1.folder_exists(u, canonical):
                raise MailboxNotFound(canonical)
            with u.index.write() as c:
                self._register(c, u, canonical)
                row = c.execute("SELECT id FROM mailboxes WHERE name = ?", (canonical,)).fetchone()
        return Folder(int(row[0]), canonical, self.tier1.folder_path(u, canonical))

    def _before_commit(self, u: UserHandle, c: sqlite3.Connection) -> None:
        """Run inside each write transaction of the user's index, before COMMIT: what must
        commit with the change or not at all (the tier-2 manifest records)."""
        self.placement.before_commit(u, c)

    # -- listeners -----------------------------------------------------------------------

    def add_listener(self, callback: object) -> None:
        """``callback(user, folder)`` is called for each folder a committed journal entry
        concerns (``ChangeEntry.folders``): at once for changes made in the thread that
        created the store, through ``reactor.callFromThread`` for changes made in other
        threads, and for other processes' changes while ``changes`` tails the journal
        (exceptions it raises are logged, never propagated). TypeError if not callable."""
        self.changes.add_listener(callback)

    # -- IMessageStore -------------------------------------------------------------------

    def deliver(
        self,
        user: str,
        content_path: str,
        prefix: bytes = b"",
        folder: str = INBOX,
        offset: int = 0,
    ) -> int:
        """Deliver ``prefix`` + the spool file's bytes (from ``offset``) into ``user``'s
        folder; returns the UID.

        The message file is written and fsynced without holding the user's lock (deliveries
        to one user in several threads overlap their fsyncs); placing and indexing it takes
        the lock; the fsync of its directory follows, and only then does this return.
        """
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
        with open(content_path, "rb") as src:
            if offset:
                src.seek(offset)
            size = len(prefix) + os.fstat(src.fileno()).st_size - offset
            limit = self._quota_for(user)
            with u.lock:
                self._check_quota(u, limit, size)
            written = self.tier1.write(f, prefix, src, None)
        info = self.tier1.place(
            u, f, written, frozenset(), None, None, self._allocator(u, f, limit)
        )
        batch: UnsyncedDeliveries | None = getattr(self._local, "batch", None)
        if batch is not None:
            batch.placed.append((u, f, info))
        else:
            self.tier1.make_durable(u, f, info)
        return info.uid

    @contextlib.contextmanager
    def unsynced_deliveries(self) -> Iterator[UnsyncedDeliveries]:
        """Within the block, ``deliver`` calls made by this thread return before the
        directory fsync of their message: call the batch's ``sync`` before relying on them
        (before recording them as done). Leaving the block syncs what is left. Local
        delivery stores a group of messages this way and syncs each directory once."""
        batch = UnsyncedDeliveries(self)
        self._local.batch = batch
        try:
            yield batch
        finally:
            self._local.batch = None
            batch.sync()

    def open_mailbox(self, user: str, name: str = INBOX, snapshot: bool = True) -> Mailbox:
        """Open a folder (repairing its index first if its directories changed). With
        ``snapshot`` false only its counters are read (for APPEND, or a COPY target): the
        messages are loaded on the first ``messages()`` or ``refresh()``. The Mailbox
        objects of one folder share one snapshot of its messages in this process."""
        u = self._user(user)
        with u.lock:
            f = self._folder(u, name)
            return Mailbox(self, user, f, snapshot)

    def _snapshot(self, user: str, f: Folder) -> Snapshot:
        """The shared snapshot of a folder (a new, unloaded one when nobody holds it)."""
        key = (user, f.id, f.name)
        with self._users_lock:
            snap = self._snapshots.get(key)
            if snap is None:
                snap = self._snapshots[key] = Snapshot()
            retained = self._retained
            retained[key] = snap
            retained.move_to_end(key)
            if len(retained) > 1:
                total = sum(len(s.infos) for s in retained.values())
                while len(retained) > 1 and (
                    total > RETAINED_SNAPSHOT_MESSAGES or len(retained) > RETAINED_SNAPSHOTS
                ):
                    _key, dropped = retained.popitem(last=False)
                    total -= len(dropped.infos)
            return snap

    def _forget_snapshots(self, user: str) -> None:
        """Have the snapshots of ``user``'s folders reload whole on their next refresh, and
        keep none of them loaded: for a writer that changes the index without raising the
        modseqs past every snapshot's (the replica applying its primary's numbers)."""
        with self._users_lock:
            for key in [k for k in self._retained if k[0] == user]:
                del self._retained[key]
            live = [snap for key, snap in self._snapshots.items() if key[0] == user]
        for snap in live:
            snap.loaded = None

    def append_messages(
        self,
        user: str,
        name: str,
        messages: Sequence[tuple[MessageData, Iterable[str], datetime.datetime | float | None]],
    ) -> tuple[int, list[int]]:
        """Store ``(data, flags, internaldate)`` messages in a folder, all or none (IMAP
        APPEND / MULTIAPPEND, RFC 3502): returns (UIDVALIDITY, new UIDs). ``data`` is bytes
        or a file read from its position to its end, in chunks, whose ``len()`` is that size
        (an IMAP literal spooled to disk). ``internaldate``
        is as for ``Mailbox.append`` (an aware datetime keeps its zone). Safe to call from
        any thread: it does not touch the shared snapshots (sessions see the messages on
        their next refresh). QuotaExceeded when they do not all fit (nothing stored),
        MailboxNotFound / ValueError for the folder."""
        u = self._user(user)
        with u.lock:
            f = self._folder(u, name)
            limit = self._quota_for(user)
            self._check_quota(u, limit, sum(len(data) for data, _, _ in messages))
        box = Mailbox(self, user, f, snapshot=False, shared=False)
        uids: list[int] = []
        try:
            for data, flags, internaldate in messages:
                uids.append(box.append(data, flags, internaldate))
        except BaseException:
            if uids:
                box.expunge(uids)
            raise
        return box.uidvalidity, uids

    def list_mailboxes(self, user: str) -> list[str]:
        """INBOX first, then the other folders sorted; folders created on disk by another
        Maildir program are adopted."""
        u = self._user(user)
        with u.lock:
            known = set(self._names_in_index(u))
            missing = [n for n in self.tier1.disk_folders(u) if n not in known]
            if missing:
                with u.index.write() as c:
                    for name in missing:
                        self._register(c, u, name)
                known.update(missing)
            present = [n for n in known if n == INBOX or self.tier1.folder_exists(u, n)]
        return [INBOX] + sorted(n for n in present if n != INBOX)

    def create_mailbox(self, user: str, name: str) -> None:
        """Create a folder; ValueError if the name is invalid or the folder exists."""
        canonical = normalize_folder(name)
        u = self._user(user)
        with u.lock:
            if canonical == INBOX or self.tier1.folder_exists(u, canonical):
                raise ValueError(f"mailbox {canonical!r} already exists")
            with u.index.write() as c:
                # A row without a directory (deleted behind our back) starts afresh.
                c.execute(
                    "DELETE FROM messages WHERE mailbox IN "
                    "(SELECT id FROM mailboxes WHERE name = ?)",
                    (canonical,),
                )
                c.execute("DELETE FROM mailboxes WHERE name = ?", (canonical,))
                self._register(c, u, canonical, subscribe=False, found=False)

    def quota_usage(self, user: str) -> tuple[int, int | None]:
        """(bytes used in all folders, limit or None)."""
        u = self._user(user)
        with u.lock:
            used = self._used(u.index.conn)
        return used, self._quota_for(user)

    def reindex(self, user: str) -> int:
        """Rebuild the index from the Maildir files (keeping known UIDs); an unreadable index
        is moved aside and rebuilt. Returns the number of messages indexed."""
        with self._users_lock:
            cached = self._users.pop(user, None)
        if cached is not None:
            cached.index.close()
        u = self._open_user(user, rebuild=True)
        try:
            with u.lock:
                self.tier1.clean_tmp(u.path)
                on_disk = set(self.tier1.disk_folders(u))
                with u.index.write() as c:
                    for name in on_disk:
                        self._register(c, u, name)
                    for name in self._names_in_index(u):
                        if name != INBOX and name not in on_disk:
                            c.execute(
                                "DELETE FROM messages WHERE mailbox IN "
                                "(SELECT id FROM mailboxes WHERE name = ?)",
                                (name,),
                            )
                            c.execute("DELETE FROM mailboxes WHERE name = ?", (name,))
                            self._journal.deleted(u, name)
                for name in self._names_in_index(u):
                    f = self._folder(u, name)
                    self.tier1.clean_tmp(f.path)
                    self.tier1.sync(u, f, force=True)
                row = u.index.conn.execute("SELECT COALESCE(SUM(message_count), 0) FROM mailboxes")
                count = int(row.fetchone()[0])
        finally:
            u.index.close()
            self._forget_snapshots(user)  # a rebuilt index: its modseqs start anew
        return count

    def check(self, user: str, repair: bool = False) -> StoreCheck:
        """Compare ``user``'s index with the Maildir files and the tier-2 manifests, folder
        by folder under the index's write lock (no writer of any process changes the folder
        meanwhile): index rows whose file is missing, files the index does not know
        (leftovers of a finished migration included), files whose size differs from the
        index's, manifests that do not say what the index does. With ``repair`` each folder
        with a problem is re-indexed from its files (``reindex`` for one folder: new files
        get UIDs, vanished ones are dropped, sizes are read again) and its manifest is
        rewritten from the index."""
        report = StoreCheck()
        u = self._user(user)
        with u.lock:
            for name in self._names_in_index(u):
                try:
                    f = self._folder(u, name)
                    with u.index.write() as c:
                        problems = self._check_folder(u, c, f, report)
                        if repair and problems & {"manifest"} and not problems - {"manifest"}:
                            self.placement.rewrite_folder_manifest(c, f)
                    if repair and problems - {"manifest"}:
                        self.tier1.sync(u, f, force=True)
                        with u.index.write() as c:
                            self.placement.rewrite_folder_manifest(c, f)
                except MailboxNotFound:
                    continue
                report.folders += 1
                report.repaired += bool(repair and problems)
        return report

    def _check_folder(
        self, u: UserHandle, c: sqlite3.Connection, f: Folder, report: StoreCheck
    ) -> set[str]:
        """One folder of ``check`` (in a write transaction); the kinds of problem found:
        the tier-1 rows are checked by the backend, the tier-2 ones by the placement."""
        tier1: list[tuple[Any, ...]] = []
        tier2: dict[int, tuple[Any, ...]] = {}
        for uid, base, filename, size, blob, flags, date, tz in c.execute(
            "SELECT uid, base, filename, size, blob, flags, internaldate, internaldate_tz"
            " FROM messages WHERE mailbox = ?",
            (f.id,),
        ).fetchall():
            report.messages += 1
            if blob is not None:
                tier2[int(uid)] = (str(blob), int(size), str(flags), float(date), int(tz))
            else:
                tier1.append((uid, base, filename, size))
        problems = self.tier1.check(u, f, tier1, report)
        if self.placement.check(c, u, f, tier2, report):
            problems.add("manifest")
        return problems

    def delete_mailbox(self, user: str, name: str) -> None:
        """Delete a folder: its messages (the quota goes down), its directory and its index
        rows; child folders stay. ValueError for INBOX or an invalid name, MailboxNotFound
        when it does not exist. Its subscription stays (RFC 3501 6.3.4)."""
        canonical = normalize_folder(name)
        if canonical == INBOX:
            raise ValueError("INBOX cannot be deleted")
        u = self._user(user)
        with u.lock:
            f = self._folder(u, canonical)
            with u.index.write() as c:
                c.execute("DELETE FROM messages WHERE mailbox = ?", (f.id,))
                c.execute("DELETE FROM tombstones WHERE mailbox = ?", (f.id,))
                c.execute("DELETE FROM mailboxes WHERE id = ?", (f.id,))
                self._journal.deleted(u, canonical)
                trash = self.tier1.remove_folder(u, f)
        if trash:
            self.tier1.purge(u, trash)

    def rename_mailbox(self, user: str, old: str, new: str) -> None:
        """Rename a folder and its children (``A`` -> ``B`` also moves ``A/x`` -> ``B/x``)
        on disk and in the index, keeping UIDVALIDITY and UIDs; subscriptions follow.
        Renaming INBOX moves all its messages into the new folder (new UIDs there) and
        leaves INBOX empty (RFC 3501 6.3.5). ValueError when a name is invalid, the target
        exists, is INBOX or lies below the source; MailboxNotFound when the source does not
        exist."""
        src = normalize_folder(old)
        dst = normalize_folder(new)
        if dst in (INBOX, src):
            raise ValueError(f"mailbox {dst!r} already exists")
        if dst.startswith(src + "/"):
            raise ValueError(f"cannot rename {src!r} into its own child {dst!r}")
        u = self._user(user)
        with u.lock:
            source = self._folder(u, src)
            if src == INBOX:
                self.create_mailbox(user, dst)
                target = self._folder(u, dst)
                with u.index.write() as c:
                    uids = [
                        r[0]
                        for r in c.execute(
                            "SELECT uid FROM messages WHERE mailbox = ? ORDER BY uid", (source.id,)
                        )
                    ]
                    self._move_rows(c, u, source, target, uids)
                self.tier1.sync_dirs(source, target)
                return
            present = set(self.list_mailboxes(user))
            moving = sorted(n for n in present if n == src or n.startswith(src + "/"))
            plan = [(n, dst + n[len(src) :]) for n in moving]
            for _n, t in plan:
                normalize_folder(t)  # too long on disk -> ValueError
                if t in present:
                    raise ValueError(f"mailbox {t!r} already exists")
            done: list[tuple[str, str]] = []
            try:
                with u.index.write() as c:
                    for n, t in plan:
                        c.execute(  # a stale row of a folder deleted behind our back
                            "DELETE FROM messages WHERE mailbox IN "
                            "(SELECT id FROM mailboxes WHERE name = ?)",
                            (t,),
                        )
                        c.execute("DELETE FROM mailboxes WHERE name = ?", (t,))
                        done.append(self.tier1.rename_folder(u, n, t))
                        c.execute("UPDATE mailboxes SET name = ? WHERE name = ?", (t, n))
                        c.execute("DELETE FROM subscriptions WHERE name = ?", (t,))
                        c.execute("UPDATE subscriptions SET name = ? WHERE name = ?", (t, n))
                        self._journal.renamed(u, n, t)
            except BaseException:
                for moved in reversed(done):
                    self.tier1.undo_rename(moved)
                raise
            self.tier1.sync_root(u)

    def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        """Subscribe to or unsubscribe from a folder name; the folder need not exist (RFC
        3501 6.3.6). ValueError for an invalid name."""
        canonical = normalize_folder(name)
        u = self._user(user)
        with u.lock, u.index.write() as c:
            if subscribed:
                c.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (canonical,))
            else:
                c.execute("DELETE FROM subscriptions WHERE name = ?", (canonical,))
            self._journal.subscribed(u, canonical, subscribed)

    def list_subscribed(self, user: str) -> list[str]:
        """Subscribed names (INBOX first if subscribed, then sorted), existing or not."""
        u = self._user(user)
        with u.lock:
            names = [str(r[0]) for r in u.index.conn.execute("SELECT name FROM subscriptions")]
        return [n for n in names if n == INBOX] + sorted(n for n in names if n != INBOX)

    def mailbox_status(self, user: str, name: str) -> MailboxStatus:
        """Counters of a folder from the index alone (no file is opened, no repair is run):
        MailboxNotFound when it does not exist, ValueError for an invalid name."""
        u = self._user(user)
        with u.lock:
            f = self._folder(u, name)
            box = u.index.conn.execute(
                "SELECT message_count, uidnext, uidvalidity, highestmodseq, total_size,"
                " recent_uid FROM mailboxes WHERE id = ?",
                (f.id,),
            ).fetchone()
            if box is None:
                raise folder_gone(f)
            unseen = u.index.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE mailbox = ?"
                " AND (' ' || flags || ' ') NOT LIKE '% \\Seen %'",
                (f.id,),
            ).fetchone()[0]
            recent = u.index.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE mailbox = ? AND uid > ?", (f.id, box[5])
            ).fetchone()[0]
        return MailboxStatus(
            messages=int(box[0]),
            recent=int(recent),
            uidnext=int(box[1]),
            uidvalidity=int(box[2]),
            unseen=int(unseen),
            highestmodseq=int(box[3]),
            size=int(box[4]),
        )

    # -- tiers ----------------------------------------------------------------------------

    def users(self) -> list[str]:
        """Names (``local@domain``) of every user with an index under the root, sorted."""
        return self.tier1.users()

    def tier_rows(self, user: str) -> list[tuple[str, int, int, int, str | None, float]]:
        """Every message of ``user`` as (folder, uid, size, modseq, blob or None,
        internaldate), read from the index alone."""
        u = self._user(user)
        with u.lock:
            rows = u.index.conn.execute(
                "SELECT b.name, m.uid, m.size, m.modseq, m.blob, m.internaldate"
                " FROM messages m JOIN mailboxes b ON b.id = m.mailbox ORDER BY b.name, m.uid"
            ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2]), int(r[3]), r[4], float(r[5])) for r in rows]

    def tier_totals(self, user: str) -> dict[str, tuple[int, int]]:
        """``{"tier1": (messages, bytes), "tier2": (...)}`` of ``user``, read from the index."""
        u = self._user(user)
        with u.lock:
            rows = u.index.conn.execute(
                "SELECT blob IS NULL, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY 1"
            ).fetchall()
        out = {"tier1": (0, 0), "tier2": (0, 0)}
        for tier1, n, size in rows:
            out["tier1" if tier1 else "tier2"] = (int(n), int(size))
        return out

    def _open_tier2(self, u: UserHandle, f: Folder, info: MessageInfo) -> BinaryIO:
        """Open a tier-2 message (verified bytes); promote it back when configured."""
        fh = self.placement.open(info)
        if self.promote_on_read:
            try:
                self.promote_message(u.name, f.name, info.uid)
            except Exception:
                log.failure(
                    "store: promoting {user} {folder} {uid} failed",
                    user=u.name,
                    folder=f.name,
                    uid=info.uid,
                )
        return fh

    def migrate_message(self, user: str, folder: str, uid: int) -> bool:
        """Move one message from tier 1 to tier 2, crash-safe and idempotent: the file's bytes
        go into a header blob and a body blob (fsynced), the index row is switched to them in
        a transaction, and only then is the Maildir file unlinked. A crash before the switch
        leaves the message in tier 1 (the next run stores the same blobs again, deduplicated);
        a crash after it leaves a redundant file that the next sync of the folder removes.
        Returns True when the message moved, False when it was gone or already in tier 2.
        Raises MailboxNotFound, OSError."""
        self.placement.store()  # OSError without a tier 2, before the folder is looked up
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
        return self.placement.migrate(u, f, uid)

    def promote_message(self, user: str, folder: str, uid: int) -> bool:
        """Move one message back from tier 2 to tier 1 (a new Maildir file with its flags,
        same UID); the blob stays until ``gc`` finds it unreferenced. Returns False when the
        message is gone or in tier 1 already. BlobCorrupt/BlobNotFound when the blob is
        damaged (the message stays in tier 2)."""
        self.placement.store()  # OSError without a tier 2, before the folder is looked up
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
        return self.placement.promote(u, f, uid)

    def _patch_snapshot(self, u: UserHandle, f: Folder, uid: int, **fields: Any) -> None:
        """Update where a message lives (``blob``, ``filename``) in this process's snapshot
        of its folder, if one is loaded: not a change its watchers hear of (no modseq). The
        snapshots of other processes keep the old place until their next reload;
        ``Mailbox.open_message`` then finds the message through the index."""
        with self._users_lock:
            snap = self._snapshots.get((u.name, f.id, f.name))
        if snap is not None:
            info = snap.infos.get(uid)
            if info is not None:
                snap.infos[uid] = dataclasses.replace(info, **fields)

    # -- internals shared with Mailbox ---------------------------------------------------

    def _move_rows(
        self, c: sqlite3.Connection, u: UserHandle, src: Folder, dst: Folder, uids: Iterable[int]
    ) -> list[tuple[int, int]]:
        """In a write transaction: move messages from ``src`` to ``dst`` (a rename of the
        tier-1 file, the row of a tier-2 one), giving them new UIDs in ``dst`` and leaving
        tombstones in ``src``. Returns (source UID, new UID) pairs. The caller fsyncs the
        directories. A crash between the renames and the commit is repaired by the next
        sync (the files are re-indexed in ``dst``): nothing is lost."""
        pairs: list[tuple[int, int]] = []
        modseqs: list[int] = []
        dropped = False
        box = c.execute(
            "SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ? AND name = ?",
            (dst.id, dst.name),
        ).fetchone()
        src_box = c.execute(
            "SELECT highestmodseq FROM mailboxes WHERE id = ? AND name = ?", (src.id, src.name)
        ).fetchone()
        if box is None:
            raise folder_gone(dst)
        if src_box is None:
            raise folder_gone(src)
        uidnext, modseq = int(box[0]), int(box[1])
        src_modseq = int(src_box[0]) + 1
        for uid in sorted(set(uids)):
            row = c.execute(
                "SELECT base, filename, size, flags, internaldate, blob, internaldate_tz"
                " FROM messages WHERE mailbox = ? AND uid = ?",
                (src.id, uid),
            ).fetchone()
            if row is None:
                continue
            base, filename, size, flags, internaldate, blob, tz = row
            if blob is not None:  # a leftover of its migration would come back in src
                self.tier1.discard(src, filename)
                self.placement.log_delete(u, src.id, uid)
            else:
                current = self.tier1.move(src, dst, filename, base)
                if current is None:  # vanished: drop the row
                    c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (src.id, uid))
                    add_tombstones(c, src.id, [uid], src_modseq)
                    dropped = True
                    continue
                filename = current
            modseq += 1
            c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (src.id, uid))
            c.execute(
                "INSERT INTO messages(mailbox, uid, base, filename, size, flags, internaldate,"
                " modseq, blob, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (dst.id, uidnext, base, filename, size, flags, internaldate, modseq, blob, tz),
            )
            if blob is not None:
                self.placement.log_put(u, c, dst.id, uidnext)
            add_tombstones(c, src.id, [uid], src_modseq)
            pairs.append((uid, uidnext))
            modseqs.append(modseq)
            uidnext += 1
        if not pairs and not dropped:
            return pairs
        for folder in (src, dst):
            c.execute(
                "UPDATE mailboxes SET"
                " total_size = (SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ?),"
                " message_count = (SELECT COUNT(*) FROM messages WHERE mailbox = ?) WHERE id = ?",
                (folder.id, folder.id, folder.id),
            )
        c.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?", (src_modseq, src.id))
        c.execute(
            "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
            (uidnext, modseq + 1, dst.id),
        )
        self.tier1.record_mtimes(c, u, src)
        self.tier1.record_mtimes(c, u, dst)
        self._journal.moved(u, src.name, dst.name, pairs, modseqs, src_modseq, modseq + 1)
        return pairs

    @staticmethod
    def _used(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT COALESCE(SUM(total_size), 0) FROM mailboxes").fetchone()
        return int(row[0])

    def _allocate(
        self, c: sqlite3.Connection, u: UserHandle, f: Folder, limit: int | None, size: int
    ) -> tuple[int, int]:
        """In a write transaction: the quota check, then the new message's UID and modseq
        (the folder's UIDNEXT, HIGHESTMODSEQ and totals counted up). MailboxNotFound when the
        folder is gone or renamed, QuotaExceeded over ``limit`` (checked again here, under
        the write lock: another process may have used the room since ``_check_quota``)."""
        self._fits(c, u, limit, size)
        row = c.execute(
            "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1,"
            " total_size = total_size + ?, message_count = message_count + 1"
            " WHERE id = ? AND name = ? RETURNING uidnext - 1, highestmodseq",
            (size, f.id, f.name),
        ).fetchone()
        if row is None:
            raise folder_gone(f)
        return int(row[0]), int(row[1])

    def _allocator(self, u: UserHandle, f: Folder, limit: int | None) -> Allocate:
        """``_allocate`` for a backend's ``place``: (connection, size) -> (UID, modseq)."""
        return lambda c, size: self._allocate(c, u, f, limit, size)

    def _check_quota(self, u: UserHandle, limit: int | None, size: int) -> None:
        """The pre-check before writing a message file (repeated by ``_allocate``)."""
        self._fits(u.index.conn, u, limit, size)

    def _fits(self, c: sqlite3.Connection, u: UserHandle, limit: int | None, size: int) -> None:
        """QuotaExceeded when ``size`` more bytes would take the user over ``limit``."""
        if limit is None:
            return
        used = self._used(c)
        if used + size > limit:
            raise QuotaExceeded(f"{u.name}: {used} + {size} bytes > quota {limit}")

    def _store(
        self,
        u: UserHandle,
        f: Folder,
        limit: int | None,
        prefix: bytes,
        src: BinaryIO | None,
        data: bytes | None,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
    ) -> MessageInfo:
        """Write, place and make durable a tier-1 message (the backend's ``store``)."""
        return self.tier1.store(
            u, f, self._allocator(u, f, limit), prefix, src, data, flags, internaldate, tz
        )

    def _place_blob(
        self,
        u: UserHandle,
        f: Folder,
        limit: int | None,
        blob: str,
        size: int,
        flags: frozenset[str],
        internaldate: float,
        filename: str,
        tz: int,
    ) -> MessageInfo:
        """Index a new message whose bytes are the tier-2 blob ``blob`` (a copy of a tier-2
        message shares its blob): quota check, UID, row."""
        return self.placement.place_blob(
            u, f, self._allocator(u, f, limit), blob, size, flags, internaldate, filename, tz
        )
