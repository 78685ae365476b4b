"""Tier-1 mailbox store: Dovecot-compatible Maildir++ per user with a SQLite index (WAL).

Layout: user ``alice@example.test`` is the Maildir ``root/example.test/alice/`` (INBOX in its
``cur/ new/ tmp/``); folders are Maildir++ directories ``.Sent``, ``.Archive.2024`` with a
``maildirfolder`` marker; folder names are stored on disk in IMAP modified UTF-7 like Dovecot
(see ``mailgw.store.names``). Message files are named the Dovecot way,
``<time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>[:2,<DFRST>]``: a delivered message goes
``tmp/`` -> ``new/`` (no flags); a message with flags lives in ``cur/`` with the letters of its
system flags; other keywords live only in the index.

The Maildir files are the truth; the index (``mailgw-index.sqlite`` in the user's maildir)
holds UIDVALIDITY, UIDs, flags, modseqs, sizes and internal dates and can be rebuilt from the
files (``reindex``) without changing the UIDs of files it knows. Every writer renames or
unlinks message files inside a ``BEGIN IMMEDIATE`` transaction, so a reader holding that lock
sees files and index agree except for the effects of a crash or of another Maildir program;
opening or refreshing a folder repairs those when ``new/`` or ``cur/`` changed since the last
check (directory mtimes, as Dovecot does).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import os
import shutil
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from twisted.logger import Logger
from zope.interface import implementer

from mailgw.interfaces import IMailbox, IMessageStore, MailboxNotFound, QuotaExceeded
from mailgw.journal.store import StoreJournal
from mailgw.store import blobs, maildir, manifest
from mailgw.store.index import INDEX_NAME, UserIndex, new_uidvalidity, quarantine_index
from mailgw.store.names import (
    INBOX,
    folder_dirname,
    folder_from_dirname,
    normalize_folder,
    user_dir,
)

log = Logger()

# A directory mtime this close to "now" may still change within the same clock tick without
# the mtime changing, so it is not recorded as "in sync" (Dovecot's rule).
RACY_NS = 2_000_000_000
# While recorded mtimes are racy, a process lists a folder at most this often to catch another
# program's change made in the same clock tick as a mailgw writer's.
SCAN_INTERVAL_NS = 1_000_000_000
# tmp/ files older than this are leftovers of crashed writers (the Maildir convention).
TMP_MAX_AGE = 36 * 3600


class SizedReader(Protocol):
    """A message given as a file (an IMAP literal spooled to disk): read from its position
    to its end, whose size ``len()`` gives."""

    def read(self, n: int = -1, /) -> bytes: ...

    def __len__(self) -> int: ...


MessageData = bytes | SizedReader


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a folder. ``filename`` is the path relative to the folder's directory
    (``new/<name>`` or ``cur/<name>:2,<letters>``); ``size`` is the message's byte size (the
    logical size, whatever the tier). ``blob`` is None for a message in tier 1 (its Maildir
    file), else its tier-2 reference (``<header sha256>:<header size>+<body sha256>``, or
    one sha256 for a message stored whole, see ``mailgw.store.blobs``) and ``filename`` is
    only the name it had in tier 1. ``internaldate`` is the instant (UTC epoch seconds) and
    ``internaldate_tz`` the zone it was given in, in minutes east of UTC (RFC 3501 keeps the
    zone of an APPEND's date-time; a delivery gets the server's zone)."""

    uid: int
    size: int
    flags: frozenset[str]
    internaldate: float
    modseq: int
    filename: str
    blob: str | None = None
    internaldate_tz: int = 0


@dataclass(frozen=True)
class MailboxStatus:
    """What IMAP STATUS reports of a folder, computed from the index alone. ``recent`` counts
    the messages no session has claimed as ``\\Recent`` yet (UIDs above the folder's claim
    mark, see ``Mailbox.claim_recent``); ``size`` is the sum of the messages' sizes (RFC 8438
    STATUS=SIZE)."""

    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int
    size: int


@dataclass
class StoreCheck:
    """What ``MessageStore.check`` found: index rows whose Maildir file is missing (user,
    folder, UID, file name), files the index does not know (user, folder, file), size
    mismatches (user, folder, UID, index size, file size), folders whose tier-2 manifest is
    out of step with the index (user, folder); folders and messages checked, folders
    repaired."""

    folders: int = 0
    messages: int = 0
    repaired: int = 0
    missing: list[tuple[str, str, int, str]] = dataclasses.field(default_factory=list)
    unknown: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    size: list[tuple[str, str, int, int, int]] = dataclasses.field(default_factory=list)
    manifests: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unknown or self.size or self.manifests)


@dataclass(frozen=True)
class _Folder:
    id: int
    name: str
    path: str


class _User:
    """A user's open index. Folder names are resolved from the index each time (another
    process may rename, delete or re-create a folder at any moment)."""

    def __init__(self, name: str, path: str, index: UserIndex) -> None:
        self.name = name
        self.path = path
        self.index = index

    @property
    def lock(self) -> threading.RLock:
        return self.index.lock


# Flag sets are few (most messages have one of a handful): one frozenset per distinct text.
_FLAG_SETS: dict[str, frozenset[str]] = {}
_FLAG_SETS_MAX = 4096


def _flag_set(text: str) -> frozenset[str]:
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


def _info_from_row(row: Sequence[object]) -> MessageInfo:
    uid, filename, size, flags, internaldate, modseq, blob, tz = row
    return MessageInfo(
        uid=int(uid),  # type: ignore[call-overload]
        size=int(size),  # type: ignore[call-overload]
        flags=_flag_set(str(flags)),
        internaldate=float(internaldate),  # type: ignore[arg-type]
        modseq=int(modseq),  # type: ignore[call-overload]
        filename=str(filename),
        blob=None if blob is None else str(blob),
        internaldate_tz=_zone(int(tz)),  # type: ignore[call-overload]
    )


_ROW_COLUMNS = "uid, filename, size, flags, internaldate, modseq, blob, internaldate_tz"


def _put_record(row: Sequence[Any]) -> dict[str, Any]:
    """The manifest ``put`` record of a row (uid, blob, size, flags, internaldate,
    internaldate_tz, base, filename)."""
    uid, blob, size, flags, internaldate, tz, base, filename = row
    return manifest.put(
        int(uid),
        str(blob),
        int(size),
        str(flags),
        float(internaldate),
        int(tz),
        str(base),
        str(filename),
    )


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


# Prefix of a deleted folder's directory while it is being removed; ``..`` never decodes to a
# folder name, so a leftover after a crash is not adopted (``reindex`` removes it).
DELETED_PREFIX = "..mailgw-deleted-"


def add_tombstones(c: sqlite3.Connection, mailbox: int, uids: Iterable[int], modseq: int) -> None:
    """Remember expunged UIDs with the modseq of their removal (CONDSTORE/QRESYNC VANISHED)."""
    c.executemany(
        "INSERT OR REPLACE INTO tombstones(mailbox, uid, modseq) VALUES (?, ?, ?)",
        [(mailbox, uid, modseq) for uid in uids],
    )


@implementer(IMessageStore)
class MessageStore:
    """Maildir++ message store for all users under ``root`` (``data_dir/mail``).

    Thread-safe: local delivery calls ``deliver`` from worker threads while the protocols
    use the store from the reactor thread. Each user's index connection is shared by the
    threads under the index's lock; message files are written and fsynced outside it.
    Every change is journaled in its write transaction (``mailgw.journal``, one
    ``self._journal`` call per write site); listeners hear of the committed entries
    (``changes``) in the thread that created the store (the reactor thread): a change made
    in another thread is reported through ``reactor.callFromThread``.
    """

    def __init__(
        self,
        root: str,
        quota_for: Callable[[str], int | None],
        default_folders: Sequence[str] = ("Sent", "Drafts", "Trash", "Junk", "Archive"),
        hostname: str = "localhost",
        max_open_users: int = 128,
        reactor: Any = None,
        tier2: Any = None,
        promote_on_read: bool = False,
    ) -> None:
        self.root = os.path.abspath(root)
        self.tier2 = tier2
        self.promote_on_read = promote_on_read and tier2 is not None
        self._quota_for = quota_for
        self._default_folders = tuple(normalize_folder(f) for f in default_folders)
        self._names = maildir.UniqueNames(hostname)
        self._max_open = max(1, max_open_users)
        self._users: OrderedDict[str, _User] = OrderedDict()
        self._users_lock = threading.Lock()
        self._journal = StoreJournal(self.root, reactor)
        self.changes = self._journal.changes
        """This process's view of the node's change journal (``IChangeLog``)."""
        # (user, folder id) -> when this process last listed the folder's directories.
        self._scanned: dict[tuple[str, int], int] = {}
        # One snapshot per open folder, shared by its Mailbox objects (alive while one is).
        self._snapshots: weakref.WeakValueDictionary[tuple[str, int, str], _Snapshot] = (
            weakref.WeakValueDictionary()
        )

    # -- users and their indexes ---------------------------------------------------------

    def close(self) -> None:
        """Close every cached index connection (the store stays usable: they reopen)."""
        with self._users_lock:
            users = list(self._users.values())
            self._users.clear()
        for u in users:
            u.index.close()

    def _user(self, user: str) -> _User:
        with self._users_lock:
            cached = self._users.get(user)
            if cached is not None:
                self._users.move_to_end(user)
                return cached
        opened = self._open_user(user)
        evicted: list[_User] = []
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

    def _open_user(self, user: str, rebuild: bool = False) -> _User:
        path = user_dir(self.root, user)
        maildir.make_maildir(path, subfolder=False)
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
        u = _User(user, path, index)
        self._journal.bind(index)
        index.before_commit = lambda c: self._before_commit(u, c)
        try:
            if index.get_meta("initialized") is None:
                self._initialize(u)
            if index.get_meta("tier2_manifests") is None:
                self._start_manifests(u)
        except BaseException:
            index.close()
            raise
        return u

    def _initialize(self, u: _User) -> None:
        """First use of a maildir: register INBOX, the folders on disk and the defaults, then
        index whatever files are already there (a Maildir migrated from elsewhere)."""
        on_disk = self._disk_folders(u)
        with u.index.write() as c:
            if c.execute("SELECT 1 FROM meta WHERE key = 'initialized'").fetchone():
                return
            for name in (INBOX, *self._default_folders, *on_disk):
                self._register(c, u, name)
            c.execute("INSERT INTO meta(key, value) VALUES ('initialized', '1')")
        for name in self._names_in_index(u):
            self._sync(u, self._folder(u, name), force=True)

    def _disk_folders(self, u: _User) -> list[str]:
        names = []
        for entry in sorted(os.listdir(u.path)):
            name = folder_from_dirname(entry)
            if name is not None and os.path.isdir(os.path.join(u.path, entry, "cur")):
                names.append(name)
        return names

    def _register(
        self, c: sqlite3.Connection, u: _User, name: str, subscribe: bool = True, found: bool = True
    ) -> bool:
        """Create the folder's directories and index row if missing (in a write txn). A new
        folder is subscribed when ``subscribe``: the defaults of a new user and folders found
        on disk are; IMAP CREATE is not (RFC 3501 6.3.3: the client subscribes). ``found``
        false: made by CREATE (journaled as such)."""
        path = os.path.join(u.path, folder_dirname(name))
        maildir.make_maildir(path, subfolder=name != INBOX)
        if c.execute("SELECT 1 FROM mailboxes WHERE name = ?", (name,)).fetchone():
            return False
        row = c.execute(
            "INSERT INTO mailboxes(name, uidvalidity) VALUES (?, ?) RETURNING id",
            (name, new_uidvalidity(c)),
        ).fetchone()
        if subscribe:
            c.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
        self._restore_manifest(c, u, int(row[0]), name, path)
        self._journal.created(u, c, int(row[0]), name, subscribe, found)
        return True

    def _names_in_index(self, u: _User) -> list[str]:
        return [str(r[0]) for r in u.index.conn.execute("SELECT name FROM mailboxes")]

    def _folder(self, u: _User, name: str) -> _Folder:
        """Resolve a folder name from the index (one lookup by its unique name, never
        cached: another process may have renamed, deleted or re-created it); folders made on
        disk by another program are adopted. MailboxNotFound when it does not exist,
        ValueError when the name is invalid."""
        canonical = normalize_folder(name)
        path = os.path.join(u.path, folder_dirname(canonical))
        row = u.index.conn.execute(
            "SELECT id FROM mailboxes WHERE name = ?", (canonical,)
        ).fetchone()
        if row is None:
            if canonical != INBOX and not os.path.isdir(os.path.join(path, "cur")):
                raise MailboxNotFound(canonical)
            with u.index.write() as c:
                self._register(c, u, canonical)
                row = c.execute("SELECT id FROM mailboxes WHERE name = ?", (canonical,)).fetchone()
        return _Folder(int(row[0]), canonical, path)

    def _forget(self, u: _User, folder: _Folder) -> MailboxNotFound:
        return MailboxNotFound(folder.name)

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
        self, user: str, content_path: str, prefix: bytes = b"", folder: str = INBOX
    ) -> int:
        """Deliver ``prefix`` + the spool file's bytes into ``user``'s folder; returns the UID.

        The message file is written and fsynced without holding the user's lock (deliveries
        to one user in several threads overlap their fsyncs); placing and indexing it takes
        the lock; the fsync of its directory follows, and only then does this return.
        """
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
        with open(content_path, "rb") as src:
            size = len(prefix) + os.fstat(src.fileno()).st_size
            limit = self._quota_for(user)
            with u.lock:
                self._check_quota(u, limit, size)
            written = self._write_tmp(f, prefix, src, None)
        info = self._place(u, f, limit, written, frozenset(), None, None)
        self._make_durable(u, f, info)
        return info.uid

    def open_mailbox(self, user: str, name: str = INBOX, snapshot: bool = True) -> Mailbox:
        """Open a folder (repairing its index first if its directories changed). With
        ``snapshot`` false only its counters are read (for APPEND, or a COPY target): the
        messages are loaded on the first ``messages()`` or ``refresh()``. The Mailbox
        objects of one folder share one snapshot of its messages in this process."""
        u = self._user(user)
        with u.lock:
            f = self._folder(u, name)
            return Mailbox(self, user, f, snapshot)

    def _snapshot(self, user: str, f: _Folder) -> _Snapshot:
        """The shared snapshot of a folder (a new, unloaded one when nobody holds it)."""
        key = (user, f.id, f.name)
        with self._users_lock:
            snap = self._snapshots.get(key)
            if snap is None:
                snap = self._snapshots[key] = _Snapshot()
            return snap

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
            missing = [n for n in self._disk_folders(u) if n not in known]
            if missing:
                with u.index.write() as c:
                    for name in missing:
                        self._register(c, u, name)
                known.update(missing)
            present = [
                n
                for n in known
                if n == INBOX or os.path.isdir(os.path.join(u.path, folder_dirname(n), "cur"))
            ]
        return [INBOX] + sorted(n for n in present if n != INBOX)

    def create_mailbox(self, user: str, name: str) -> None:
        """Create a folder; ValueError if the name is invalid or the folder exists."""
        canonical = normalize_folder(name)
        u = self._user(user)
        with u.lock:
            path = os.path.join(u.path, folder_dirname(canonical))
            if canonical == INBOX or os.path.isdir(os.path.join(path, "cur")):
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
                self._clean_tmp(u.path)
                on_disk = set(self._disk_folders(u))
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
                    self._clean_tmp(f.path)
                    self._sync(u, f, force=True)
                row = u.index.conn.execute("SELECT COALESCE(SUM(message_count), 0) FROM mailboxes")
                count = int(row.fetchone()[0])
        finally:
            u.index.close()
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
                            self._rewrite_folder_manifest(u, c, f)
                    if repair and problems - {"manifest"}:
                        self._sync(u, f, force=True)
                        with u.index.write() as c:
                            self._rewrite_folder_manifest(u, c, f)
                except MailboxNotFound:
                    continue
                report.folders += 1
                report.repaired += bool(repair and problems)
        return report

    def _rewrite_folder_manifest(self, u: _User, c: sqlite3.Connection, f: _Folder) -> None:
        row = c.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, t2_log_gen FROM mailboxes WHERE id = ?",
            (f.id,),
        ).fetchone()
        has_tier2 = c.execute(
            "SELECT 1 FROM messages WHERE mailbox = ? AND blob IS NOT NULL LIMIT 1", (f.id,)
        ).fetchone()
        if row is not None and (row[3] is not None or has_tier2):
            path = os.path.join(f.path, manifest.LOG_NAME)
            self._rewrite_manifest(c, f.id, path, int(row[0]), int(row[1]), int(row[2]))

    def _check_folder(
        self, u: _User, c: sqlite3.Connection, f: _Folder, report: StoreCheck
    ) -> set[str]:
        """One folder of ``check`` (in a write transaction); the kinds of problem found."""
        problems: set[str] = set()
        files = maildir.list_files(f.path)
        tier2: dict[int, tuple[Any, ...]] = {}
        for uid, base, filename, size, blob, flags, date, tz in c.execute(
            "SELECT uid, base, filename, size, blob, flags, internaldate, internaldate_tz"
            " FROM messages WHERE mailbox = ?",
            (f.id,),
        ).fetchall():
            report.messages += 1
            if blob is not None:
                tier2[int(uid)] = (str(blob), int(size), str(flags), float(date), int(tz))
                continue
            rel = files.pop(str(base), None)
            if rel is None:
                report.missing.append((u.name, f.name, int(uid), str(filename)))
                problems.add("missing")
                continue
            try:
                on_disk = os.stat(os.path.join(f.path, rel)).st_size
            except FileNotFoundError:
                report.missing.append((u.name, f.name, int(uid), str(filename)))
                problems.add("missing")
                continue
            if on_disk != int(size):
                report.size.append((u.name, f.name, int(uid), int(size), on_disk))
                problems.add("size")
        for rel in sorted(files.values()):
            report.unknown.append((u.name, f.name, rel))
            problems.add("unknown")
        box = c.execute(
            "SELECT t2_log_gen, t2_log_size FROM mailboxes WHERE id = ?", (f.id,)
        ).fetchone()
        gen, size = box[0], int(box[1])
        if gen is None and not tier2:
            return problems
        try:
            with open(os.path.join(f.path, manifest.LOG_NAME), "rb") as fh:
                data = fh.read(size)
        except FileNotFoundError:
            data = b""
        found = manifest.parse(data.splitlines(keepends=True)) if len(data) == size else None
        logged = (
            None
            if found is None
            else {
                uid: (r["blob"], r["size"], r["flags"], float(r["date"]), r["tz"])
                for uid, r in found.messages.items()
            }
        )
        if found is None or found.gen != gen or found.damaged or logged != tier2:
            report.manifests.append((u.name, f.name))
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
            trash = os.path.join(u.path, f"{DELETED_PREFIX}{f.id}-{time.time_ns()}")
            with u.index.write() as c:
                c.execute("DELETE FROM messages WHERE mailbox = ?", (f.id,))
                c.execute("DELETE FROM tombstones WHERE mailbox = ?", (f.id,))
                c.execute("DELETE FROM mailboxes WHERE id = ?", (f.id,))
                self._journal.deleted(u, canonical)
                try:
                    os.rename(f.path, trash)
                except FileNotFoundError:
                    trash = ""
        if trash:
            maildir.fsync_dir(u.path)
            shutil.rmtree(trash, ignore_errors=True)

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
                self._sync_dirs(source, target)
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
                        from_path = os.path.join(u.path, folder_dirname(n))
                        to_path = os.path.join(u.path, folder_dirname(t))
                        os.rename(from_path, to_path)
                        done.append((from_path, to_path))
                        c.execute("UPDATE mailboxes SET name = ? WHERE name = ?", (t, n))
                        c.execute("DELETE FROM subscriptions WHERE name = ?", (t,))
                        c.execute("UPDATE subscriptions SET name = ? WHERE name = ?", (t, n))
                        self._journal.renamed(u, n, t)
            except BaseException:
                for from_path, to_path in reversed(done):
                    os.rename(to_path, from_path)
                raise
            maildir.fsync_dir(u.path)

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
                raise self._forget(u, f)
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

    # -- tier 2 --------------------------------------------------------------------------

    def users(self) -> list[str]:
        """Names (``local@domain``) of every user with an index under the root, sorted."""
        found = []
        for domain in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            ddir = os.path.join(self.root, domain)
            if domain.startswith(".") or not os.path.isdir(ddir):
                continue
            for local in sorted(os.listdir(ddir)):
                if os.path.isfile(os.path.join(ddir, local, INDEX_NAME)):
                    found.append(f"{local}@{domain}")
        return found

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

    def _tier2_store(self) -> Any:
        if self.tier2 is None:
            raise OSError("a message is in tier 2 but [store] tier2_dir is not set")
        return self.tier2

    def _open_tier2(self, u: _User, f: _Folder, info: MessageInfo) -> BinaryIO:
        """Open a tier-2 message (verified bytes); promote it back when configured."""
        fh = blobs.open_message(self._tier2_store(), str(info.blob))
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
        tier2 = self._tier2_store()
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
            row = u.index.conn.execute(
                "SELECT filename, size, blob FROM messages WHERE mailbox = ? AND uid = ?",
                (f.id, uid),
            ).fetchone()
        if row is None or row[2] is not None:
            return False
        try:
            fh = open(os.path.join(f.path, str(row[0])), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            # Renamed by a flag change meanwhile: ask the index again.
            with u.lock:
                self._sync(u, f)
                row = u.index.conn.execute(
                    "SELECT filename, size, blob FROM messages WHERE mailbox = ? AND uid = ?",
                    (f.id, uid),
                ).fetchone()
            if row is None or row[2] is not None:
                return False
            try:
                fh = open(os.path.join(f.path, str(row[0])), "rb")  # noqa: SIM115
            except FileNotFoundError:
                return False
        with fh:
            ref, size = blobs.put_message(tier2, fh)
        if size != int(row[1]):
            raise OSError(f"{user} {folder} UID {uid}: {size} bytes read, index says {row[1]}")
        with u.lock:
            # The file goes once the switch is durable (WAL's NORMAL mode may lose the last
            # commits in a power failure, never their manifest records, which are fsynced).
            u.index.conn.execute("PRAGMA synchronous=FULL")
            try:
                with u.index.write() as c:
                    current = c.execute(
                        "SELECT filename, blob FROM messages WHERE mailbox = ? AND uid = ?",
                        (f.id, uid),
                    ).fetchone()
                    if current is None or current[1] is not None:
                        return False  # expunged or migrated meanwhile; gc collects an orphan
                    c.execute(
                        "UPDATE messages SET blob = ? WHERE mailbox = ? AND uid = ?",
                        (ref, f.id, uid),
                    )
                    self._log_put(u, c, f.id, uid)
                    self._journal.migrated(u, f.name, uid, ref)
                    # Make the next sync list the folder, so a leftover file is found.
                    c.execute(
                        "UPDATE mailboxes SET new_mtime = -1, cur_mtime = -1 WHERE id = ?", (f.id,)
                    )
            finally:
                u.index.conn.execute("PRAGMA synchronous=NORMAL")
            self._unlink_message(f, str(current[0]))
            self._patch_snapshot(u, f, uid, blob=ref)
        return True

    def _patch_snapshot(self, u: _User, f: _Folder, uid: int, **fields: Any) -> None:
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

    def promote_message(self, user: str, folder: str, uid: int) -> bool:
        """Move one message back from tier 2 to tier 1 (a new Maildir file with its flags,
        same UID); the blob stays until ``gc`` finds it unreferenced. Returns False when the
        message is gone or in tier 1 already. BlobCorrupt/BlobNotFound when the blob is
        damaged (the message stays in tier 2)."""
        tier2 = self._tier2_store()
        u = self._user(user)
        with u.lock:
            f = self._folder(u, folder)
            row = u.index.conn.execute(
                "SELECT base, blob, internaldate FROM messages WHERE mailbox = ? AND uid = ?",
                (f.id, uid),
            ).fetchone()
        if row is None or row[1] is None:
            return False
        base = str(row[0])
        tmp = os.path.join(f.path, "tmp", self._names.next())
        with blobs.open_message(tier2, str(row[1])) as src:
            maildir.write_file(tmp, b"", src)
        placed = ""
        try:
            os.utime(tmp, (float(row[2]), float(row[2])))
            with u.lock, u.index.write() as c:
                current = c.execute(
                    "SELECT flags, blob, filename FROM messages WHERE mailbox = ? AND uid = ?",
                    (f.id, uid),
                ).fetchone()
                if current is None or current[1] is None:
                    return False
                old_info = maildir.split_filename(str(current[2]).split("/", 1)[-1])[1]
                rel = maildir.rel_name(base, maildir.flags_from_text(str(current[0])), old_info)
                placed = os.path.join(f.path, rel)
                os.rename(tmp, placed)
                c.execute(
                    "UPDATE messages SET blob = NULL, filename = ? WHERE mailbox = ? AND uid = ?",
                    (rel, f.id, uid),
                )
                u.index.log(f.id, manifest.delete(uid))
                self._journal.promoted(u, f.name, uid, rel)
                self._patch_snapshot(u, f, uid, blob=None, filename=rel)
        finally:
            maildir.unlink_quiet(tmp)
        maildir.fsync_dir(os.path.dirname(placed))
        return True

    # -- tier-2 manifests (mailgw.store.manifest) ---------------------------------------

    def _log_put(self, u: _User, c: sqlite3.Connection, folder_id: int, uid: int) -> None:
        """Queue the manifest record of tier-2 message ``uid`` as the transaction has it."""
        row = c.execute(
            "SELECT uid, blob, size, flags, internaldate, internaldate_tz, base, filename"
            " FROM messages WHERE mailbox = ? AND uid = ? AND blob IS NOT NULL",
            (folder_id, uid),
        ).fetchone()
        if row is not None:
            u.index.log(folder_id, _put_record(row))

    def _before_commit(self, u: _User, c: sqlite3.Connection) -> None:
        """Inside each write transaction, before COMMIT: append (and fsync) the queued
        manifest records, and a new reservation mark for every folder with a manifest whose
        UIDNEXT or HIGHESTMODSEQ passed its last one."""
        pending = u.index.pending
        ids = sorted(pending)
        rows = c.execute(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq, t2_log_gen, t2_log_size,"
            " t2_log_base, t2_uid_mark, t2_modseq_mark FROM mailboxes"
            " WHERE (t2_log_gen IS NOT NULL"
            " AND (uidnext > t2_uid_mark OR highestmodseq > t2_modseq_mark))"
            + (f" OR id IN ({','.join('?' * len(ids))})" if ids else ""),
            ids,
        ).fetchall()
        for row in rows:
            self._append_manifest(u, c, row, pending.get(int(row[0]), []))

    def _manifest_path(self, u: _User, name: str) -> str:
        return os.path.join(u.path, folder_dirname(name), manifest.LOG_NAME)

    def _append_manifest(
        self, u: _User, c: sqlite3.Connection, row: Sequence[Any], records: list[dict[str, Any]]
    ) -> None:
        fid, name, uidvalidity, uidnext, modseq, gen, size, base, uid_mark, modseq_mark = row
        path = self._manifest_path(u, str(name))
        if gen is None or uidnext > uid_mark or modseq > modseq_mark:
            records = [*records, manifest.mark(uidnext, modseq)]
        data = b"".join(manifest.encode(r) for r in records)
        stale = gen is None
        if not stale:
            try:
                fh = open(path, "r+b")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                stale = True
            else:
                with fh:
                    if manifest.read_gen(fh) != gen or os.fstat(fh.fileno()).st_size < size:
                        stale = True  # another generation, or damaged: the index is the truth
                    else:
                        fh.truncate(size)  # the tail of a transaction that did not commit
                        fh.seek(size)
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
        size += len(data)
        if stale or (size >= manifest.COMPACT_MIN and size > 2 * base):
            self._rewrite_manifest(c, fid, path, uidvalidity, uidnext, modseq)
            return
        c.execute(
            "UPDATE mailboxes SET t2_log_size = ?, t2_uid_mark = ?, t2_modseq_mark = ?"
            " WHERE id = ?",
            (
                size,
                max(uid_mark, uidnext + manifest.UID_RESERVE),
                max(modseq_mark, modseq + manifest.MODSEQ_RESERVE),
                fid,
            )
            if uidnext > uid_mark or modseq > modseq_mark
            else (size, uid_mark, modseq_mark, fid),
        )

    def _rewrite_manifest(
        self,
        c: sqlite3.Connection,
        folder_id: int,
        path: str,
        uidvalidity: int,
        uidnext: int,
        modseq: int,
    ) -> None:
        """Write the folder's manifest afresh from the index (a new generation): written to
        a temporary file, fsynced, renamed over the old one, directory fsynced."""
        head = manifest.header(uidvalidity)
        reserve = manifest.mark(uidnext, modseq)
        tmp = path + ".new"
        try:
            with open(tmp, "wb") as out:
                out.write(manifest.encode(head))
                out.write(manifest.encode(reserve))
                for row in c.execute(
                    "SELECT uid, blob, size, flags, internaldate, internaldate_tz, base,"
                    " filename FROM messages WHERE mailbox = ? AND blob IS NOT NULL"
                    " ORDER BY uid",
                    (folder_id,),
                ):
                    out.write(manifest.encode(_put_record(row)))
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            os.rename(tmp, path)
        except BaseException:
            maildir.unlink_quiet(tmp)
            raise
        maildir.fsync_dir(os.path.dirname(path))
        c.execute(
            "UPDATE mailboxes SET t2_log_gen = ?, t2_log_size = ?, t2_log_base = ?,"
            " t2_uid_mark = ?, t2_modseq_mark = ? WHERE id = ?",
            (head["gen"], size, size, reserve["uidnext"], reserve["modseq"], folder_id),
        )

    def _start_manifests(self, u: _User) -> None:
        """Once per index: write the manifest of every folder that has tier-2 messages but
        none yet (an index from before manifests existed)."""
        with u.index.write() as c:
            rows = c.execute(
                "SELECT id, name, uidvalidity, uidnext, highestmodseq FROM mailboxes"
                " WHERE t2_log_gen IS NULL AND id IN"
                " (SELECT DISTINCT mailbox FROM messages WHERE blob IS NOT NULL)"
            ).fetchall()
            for fid, name, uidvalidity, uidnext, modseq in rows:
                path = self._manifest_path(u, str(name))
                if os.path.isdir(os.path.dirname(path)):
                    self._rewrite_manifest(c, fid, path, uidvalidity, uidnext, modseq)
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('tier2_manifests', '1')")

    def _restore_manifest(
        self, c: sqlite3.Connection, u: _User, folder_id: int, name: str, folder_path: str
    ) -> None:
        """A folder new to the index (a rebuilt index): when its directory holds a manifest,
        take back its tier-2 messages (same UIDs, flags, keywords, internal dates and
        zones) and its UIDVALIDITY, with UIDNEXT and HIGHESTMODSEQ above anything handed out
        before (the manifest's marks) and tombstones for the UIDs below UIDNEXT it does not
        hold (tier-1 messages get new UIDs from the files; QRESYNC clients hear the old ones
        vanished). Damaged records are skipped and logged."""
        path = os.path.join(folder_path, manifest.LOG_NAME)
        try:
            found = manifest.read(path)
        except OSError as e:
            log.warn("store: manifest {path} unreadable: {error}", path=path, error=e)
            return
        if found is None:
            if os.path.exists(path):
                log.warn("store: manifest {path} has no readable header, ignored", path=path)
            return
        rows = []
        damaged = found.damaged
        for uid, rec in sorted(found.messages.items()):
            try:
                flags = maildir.flags_to_text(maildir.normalize_flags(rec["flags"].split()))
                blobs.split_ref(rec["blob"])
                if not 0 < uid < 1 << 32:
                    raise ValueError(f"UID {uid}")
            except ValueError:
                damaged += 1
                continue
            rows.append((uid, rec, flags))
        uidnext = max(found.uidnext, max((r[0] for r in rows), default=0) + 1)
        modseq = found.modseq + 1
        gaps = uidnext - 1 - len(rows)
        keep = gaps <= manifest.GAP_MAX and 0 < found.uidvalidity < 1 << 32
        fresh = keep and not damaged
        c.executemany(
            "INSERT INTO messages(mailbox, uid, base, filename, size, flags, internaldate,"
            " modseq, blob, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    folder_id,
                    uid,
                    rec["base"],
                    rec["file"],
                    rec["size"],
                    flags,
                    float(rec["date"]),
                    modseq,
                    rec["blob"],
                    rec["tz"],
                )
                for uid, rec, flags in rows
            ],
        )
        if keep:
            held = {r[0] for r in rows}
            c.executemany(
                "INSERT OR REPLACE INTO tombstones(mailbox, uid, modseq) VALUES (?, ?, ?)",
                ((folder_id, x, modseq) for x in range(1, uidnext) if x not in held),
            )
            c.execute(
                "UPDATE mailboxes SET uidvalidity = ? WHERE id = ?", (found.uidvalidity, folder_id)
            )
            last = c.execute("SELECT value FROM meta WHERE key = 'last_uidvalidity'").fetchone()
            if last is None or int(last[0]) < found.uidvalidity:
                c.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)",
                    (str(found.uidvalidity),),
                )
        c.execute(
            "UPDATE mailboxes SET uidnext = ?, highestmodseq = ?, recent_uid = ?,"
            " new_mtime = -1, cur_mtime = -1, mtimes_verified = 0,"
            " total_size = (SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ?),"
            " message_count = (SELECT COUNT(*) FROM messages WHERE mailbox = ?),"
            " t2_log_gen = ?, t2_log_size = ?, t2_log_base = ?, t2_uid_mark = ?,"
            " t2_modseq_mark = ? WHERE id = ?",
            (
                uidnext,
                modseq,
                uidnext - 1,
                folder_id,
                folder_id,
                # No generation, no marks: rewritten at this commit when it no longer says
                # what the index does (damaged records, a new UIDVALIDITY).
                found.gen if fresh else "",
                found.size,
                found.size,
                found.uidnext if fresh else 0,
                found.modseq if fresh else 0,
                folder_id,
            ),
        )
        log.info(
            "store: {user} {folder}: {n} tier-2 message(s) restored from {path}"
            " ({damaged} damaged record(s) skipped){validity}",
            user=u.name,
            folder=name,
            n=len(rows),
            path=path,
            damaged=damaged,
            validity="" if keep else "; new UIDVALIDITY",
        )

    # -- internals shared with Mailbox ---------------------------------------------------

    def _unlink_message(self, f: _Folder, filename: str) -> None:
        """Unlink a tier-1 file, also when a flag change renamed it meanwhile."""
        try:
            os.unlink(os.path.join(f.path, filename))
        except FileNotFoundError:
            base = maildir.split_filename(filename.split("/", 1)[1])[0]
            current = maildir.list_files(f.path).get(base)
            if current is not None:
                maildir.unlink_quiet(os.path.join(f.path, current))

    def _sync_dirs(self, *folders: _Folder) -> None:
        for f in folders:
            for sub in ("new", "cur"):
                maildir.fsync_dir(os.path.join(f.path, sub))

    def _move_rows(
        self, c: sqlite3.Connection, u: _User, src: _Folder, dst: _Folder, uids: Iterable[int]
    ) -> list[tuple[int, int]]:
        """In a write transaction: move messages from ``src`` to ``dst`` (a rename of the
        tier-1 file, the row of a tier-2 one), giving them new UIDs in ``dst`` and leaving
        tombstones in ``src``. Returns (source UID, new UID) pairs. The caller fsyncs the
        directories. A crash between the renames and the commit is repaired by the next
        sync (the files are re-indexed in ``dst``): nothing is lost."""
        pairs: list[tuple[int, int]] = []
        dropped = False
        box = c.execute(
            "SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ? AND name = ?",
            (dst.id, dst.name),
        ).fetchone()
        src_box = c.execute(
            "SELECT highestmodseq FROM mailboxes WHERE id = ? AND name = ?", (src.id, src.name)
        ).fetchone()
        if box is None:
            raise self._forget(u, dst)
        if src_box is None:
            raise self._forget(u, src)
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
                maildir.unlink_quiet(os.path.join(src.path, filename))
                u.index.log(src.id, manifest.delete(uid))
            else:
                current = filename
                try:
                    os.rename(os.path.join(src.path, filename), os.path.join(dst.path, filename))
                except FileNotFoundError:
                    current = maildir.list_files(src.path).get(base)
                    if current is not None:
                        os.rename(os.path.join(src.path, current), os.path.join(dst.path, current))
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
                self._log_put(u, c, dst.id, uidnext)
            add_tombstones(c, src.id, [uid], src_modseq)
            pairs.append((uid, uidnext))
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
        self._record_mtimes(c, u, src)
        self._record_mtimes(c, u, dst)
        self._journal.moved(u, src.name, dst.name, pairs)
        return pairs

    @staticmethod
    def _used(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT COALESCE(SUM(total_size), 0) FROM mailboxes").fetchone()
        return int(row[0])

    def _allocate(
        self, c: sqlite3.Connection, u: _User, f: _Folder, limit: int | None, size: int
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
            raise self._forget(u, f)
        return int(row[0]), int(row[1])

    def _check_quota(self, u: _User, limit: int | None, size: int) -> None:
        """The pre-check before writing a message file (repeated by ``_allocate``)."""
        self._fits(u.index.conn, u, limit, size)

    def _fits(self, c: sqlite3.Connection, u: _User, limit: int | None, size: int) -> None:
        """QuotaExceeded when ``size`` more bytes would take the user over ``limit``."""
        if limit is None:
            return
        used = self._used(c)
        if used + size > limit:
            raise QuotaExceeded(f"{u.name}: {used} + {size} bytes > quota {limit}")

    def _write_tmp(
        self, f: _Folder, prefix: bytes, src: BinaryIO | None, data: bytes | None
    ) -> tuple[str, str, int, int, float]:
        """Write ``tmp/<unique name>`` and fsync it: (head, path, size, vsize, mtime)."""
        head = self._names.next()
        tmp = os.path.join(f.path, "tmp", head)
        size, vsize, mtime = maildir.write_file(tmp, prefix, src, data)
        return head, tmp, size, vsize, mtime

    def _store(
        self,
        u: _User,
        f: _Folder,
        limit: int | None,
        prefix: bytes,
        src: BinaryIO | None,
        data: bytes | None,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
    ) -> MessageInfo:
        """Write tmp + fsync, place it (``_place``), fsync its directory."""
        written = self._write_tmp(f, prefix, src, data)
        info = self._place(u, f, limit, written, flags, internaldate, tz)
        self._make_durable(u, f, info)
        return info

    def _make_durable(self, u: _User, f: _Folder, info: MessageInfo) -> None:
        """fsync the directory of a placed message; if that fails, take the message out
        again (file and index row) and raise."""
        path = os.path.join(f.path, info.filename)
        try:
            maildir.fsync_dir(os.path.dirname(path))
        except BaseException:
            with u.index.write() as c:
                c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (f.id, info.uid))
                row = c.execute(
                    "UPDATE mailboxes SET highestmodseq = highestmodseq + 1,"
                    " total_size = total_size - ?, message_count = message_count - 1"
                    " WHERE id = ? RETURNING highestmodseq",
                    (info.size, f.id),
                ).fetchone()
                if row is not None:
                    add_tombstones(c, f.id, [info.uid], int(row[0]))
                    self._journal.expunged(u, f.name, [info.uid], int(row[0]))
                maildir.unlink_quiet(path)
            raise

    def _place(
        self,
        u: _User,
        f: _Folder,
        limit: int | None,
        written: tuple[str, str, int, int, float],
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
    ) -> MessageInfo:
        """Under the index write lock: quota check, UID allocation, rename of the written
        tmp file into new/ or cur/, index row. The caller fsyncs the directory. On error the
        file is removed. ``internaldate`` None is the file's mtime (now); ``tz`` None is the
        server's zone at that instant."""
        head, tmp, size, vsize, mtime = written
        placed: str | None = None
        try:
            if internaldate is not None:
                os.utime(tmp, (internaldate, internaldate))
                mtime = internaldate
            zone = local_zone(mtime) if tz is None else tz
            base = maildir.full_base(head, size, vsize)
            rel = maildir.rel_name(base, flags)
            with u.index.write() as c:
                uid, modseq = self._allocate(c, u, f, limit, size)
                placed = os.path.join(f.path, rel)
                os.rename(tmp, placed)
                c.execute(
                    "INSERT INTO messages(mailbox, uid, base, filename, size, flags,"
                    " internaldate, modseq, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.id, uid, base, rel, size, maildir.flags_to_text(flags), mtime, modseq, zone),
                )
                self._record_mtimes(c, u, f)
                info = MessageInfo(uid, size, flags, mtime, modseq, rel, internaldate_tz=zone)
                self._journal.added(u, f.name, info)
        except BaseException:
            maildir.unlink_quiet(placed or tmp)
            raise
        return info

    def _place_blob(
        self,
        u: _User,
        f: _Folder,
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
        with u.index.write() as c:
            uid, modseq = self._allocate(c, u, f, limit, size)
            base = maildir.split_filename(filename.split("/", 1)[-1])[0]
            c.execute(
                "INSERT INTO messages(mailbox, uid, base, filename, size, flags, internaldate,"
                " modseq, blob, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    f.id,
                    uid,
                    base,
                    filename,
                    size,
                    maildir.flags_to_text(flags),
                    internaldate,
                    modseq,
                    blob,
                    tz,
                ),
            )
            self._log_put(u, c, f.id, uid)
            info = MessageInfo(uid, size, flags, internaldate, modseq, filename, blob, tz)
            self._journal.added(u, f.name, info)
        return info

    def _clean_tmp(self, folder_path: str) -> None:
        tmp = os.path.join(folder_path, "tmp")
        limit = time.time() - TMP_MAX_AGE
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            try:
                if os.stat(path).st_mtime < limit:
                    os.unlink(path)
            except FileNotFoundError:
                continue

    def _dir_mtimes(self, u: _User, f: _Folder) -> tuple[int, int]:
        try:
            return (
                os.stat(os.path.join(f.path, "new")).st_mtime_ns,
                os.stat(os.path.join(f.path, "cur")).st_mtime_ns,
            )
        except FileNotFoundError:
            if f.name != INBOX:
                raise self._forget(u, f) from None
            maildir.make_maildir(f.path, subfolder=False)
            return self._dir_mtimes(u, f)

    @staticmethod
    def _settled(mtimes: tuple[int, int]) -> tuple[int, int]:
        now = time.time_ns()
        return tuple(m if now - m > RACY_NS else -1 for m in mtimes)  # type: ignore[return-value]

    def _record_mtimes(self, c: sqlite3.Connection, u: _User, f: _Folder) -> None:
        """After this writer's own change of ``new/``/``cur/`` (in its write transaction, so
        no other mailgw writer changes them meanwhile): remember their mtimes as "the index
        matches these, not yet verified", so readers need not list the directories. Another
        program's change in the same clock tick is caught by ``_sync``'s verification scan."""
        c.execute(
            "UPDATE mailboxes SET new_mtime = ?, cur_mtime = ?, mtimes_verified = 0 WHERE id = ?",
            (*self._dir_mtimes(u, f), f.id),
        )

    def _sync(self, u: _User, f: _Folder, force: bool = False) -> bool:
        """Make the index match the folder's files if its directories may have changed since
        the last check (always with ``force``). Returns True when the index changed.

        The directories are listed when their mtimes differ from the recorded ones (another
        Maildir program changed them). Mtimes a mailgw writer recorded after its own change
        are trusted, except that they are verified by one listing once they are older than
        the racy window (a change in the same clock tick leaves the mtime unchanged), and by
        at most one listing per ``SCAN_INTERVAL_NS`` per process while they are younger."""
        mtimes = self._dir_mtimes(u, f)
        # The name too: a folder object of a renamed folder must not read the files of a
        # new folder made with its old name as its own.
        row = u.index.conn.execute(
            "SELECT new_mtime, cur_mtime, mtimes_verified FROM mailboxes WHERE id = ? AND name = ?",
            (f.id, f.name),
        ).fetchone()
        if row is None:
            raise self._forget(u, f)
        key = (u.name, f.id)
        now = time.time_ns()
        settled = all(now - m > RACY_NS for m in mtimes)
        if not force:
            if (row[0], row[1]) == mtimes:
                if row[2]:
                    return False
                if not settled and now - self._scanned.get(key, 0) < SCAN_INTERVAL_NS:
                    return False
            self._scanned[key] = now
            files = maildir.list_files(f.path)
            indexed = dict(
                u.index.conn.execute(
                    "SELECT base, filename FROM messages WHERE mailbox = ? AND blob IS NULL",
                    (f.id,),
                ).fetchall()
            )
            if files == indexed:
                verified = int(settled)
                if (row[0], row[1], row[2]) != (*mtimes, verified):
                    with u.index.write() as c:
                        c.execute(
                            "UPDATE mailboxes SET new_mtime = ?, cur_mtime = ?,"
                            " mtimes_verified = ? WHERE id = ?",
                            (*mtimes, verified, f.id),
                        )
                return False
        self._scanned[key] = now
        with u.index.write() as c:
            return self._reconcile(c, u, f, force)

    def _reconcile(self, c: sqlite3.Connection, u: _User, f: _Folder, force: bool) -> bool:
        """Under the write lock: adopt renamed files, drop rows of vanished files, give new
        UIDs to unknown files (in delivery order), recompute the folder's totals."""
        mtimes = self._dir_mtimes(u, f)
        files = maildir.list_files(f.path)
        box = c.execute(
            "SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ? AND name = ?",
            (f.id, f.name),
        ).fetchone()
        if box is None:
            raise self._forget(u, f)
        uidnext, modseq = int(box[0]), int(box[1])
        changed = False
        rows = c.execute(
            "SELECT uid, base, filename, size, flags FROM messages"
            " WHERE mailbox = ? AND blob IS NULL",
            (f.id,),
        ).fetchall()
        gone: list[int] = []
        added: list[list[Any]] = []
        altered: list[list[Any]] = []
        for uid, base, filename, size, flags_text in rows:
            rel = files.pop(base, None)
            if rel is None:
                c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (f.id, uid))
                gone.append(uid)
                changed = True
                continue
            new_size = size
            if force:
                try:
                    new_size = os.stat(os.path.join(f.path, rel)).st_size
                except FileNotFoundError:
                    c.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (f.id, uid))
                    gone.append(uid)
                    changed = True
                    continue
            if rel == filename and new_size == size:
                continue
            old_flags = maildir.flags_from_text(flags_text)
            keywords = frozenset(x for x in old_flags if x not in maildir.FLAG_LETTERS)
            new_flags = keywords | maildir.system_flags_from_info(maildir.split_filename(rel)[1])
            if new_flags != old_flags or new_size != size:
                modseq += 1
                c.execute(
                    "UPDATE messages SET filename = ?, size = ?, flags = ?, modseq = ?"
                    " WHERE mailbox = ? AND uid = ?",
                    (rel, new_size, maildir.flags_to_text(new_flags), modseq, f.id, uid),
                )
                altered.append([uid, sorted(new_flags), new_size])
                changed = True
            else:
                c.execute(
                    "UPDATE messages SET filename = ? WHERE mailbox = ? AND uid = ?",
                    (rel, f.id, uid),
                )
        tier2_bases = {
            str(r[0])
            for r in c.execute(
                "SELECT base FROM messages WHERE mailbox = ? AND blob IS NOT NULL", (f.id,)
            )
        }
        for base in [b for b in files if b in tier2_bases]:
            # Left behind by a migration that stopped after switching the row to tier 2
            # (or by a promotion that stopped before): the blob is the message now.
            maildir.unlink_quiet(os.path.join(f.path, files.pop(base)))
        for base in sorted(files, key=maildir.sort_key):
            rel = files[base]
            try:
                st = os.stat(os.path.join(f.path, rel))
            except FileNotFoundError:
                continue
            flags = maildir.system_flags_from_info(maildir.split_filename(rel)[1])
            modseq += 1
            c.execute(
                "INSERT INTO messages(mailbox, uid, base, filename, size, flags, internaldate,"
                " modseq, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    f.id,
                    uidnext,
                    base,
                    rel,
                    st.st_size,
                    maildir.flags_to_text(flags),
                    st.st_mtime,
                    modseq,
                    local_zone(st.st_mtime),
                ),
            )
            added.append([uidnext, rel])
            uidnext += 1
            changed = True
        if changed:
            modseq += 1
        add_tombstones(c, f.id, gone, modseq)
        c.execute(
            "UPDATE mailboxes SET uidnext = ?, highestmodseq = ?, new_mtime = ?, cur_mtime = ?,"
            " mtimes_verified = ?,"
            " total_size = (SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ?),"
            " message_count = (SELECT COUNT(*) FROM messages WHERE mailbox = ?) WHERE id = ?",
            (uidnext, modseq, *mtimes, int(self._settled(mtimes) == mtimes), f.id, f.id, f.id),
        )
        self._journal.resynced(u, f.name, modseq, added, gone, altered)
        return changed


class _Snapshot:
    """The messages of one folder as of the index state ``loaded`` (UIDVALIDITY, UIDNEXT,
    HIGHESTMODSEQ; None before the first load), shared by every ``Mailbox`` object of the
    folder in this process and changed only under the user's lock. Each change is told to
    the ``watchers`` (weakly held; the IMAP selected state) with the message's previous
    info: ``snapshot_changed(uid, old)`` (``old`` None for a new message) after a message
    was added, changed or removed, ``snapshot_reloaded(old_infos)`` after a full reload."""

    __slots__ = ("infos", "loaded", "watchers", "__weakref__")

    def __init__(self) -> None:
        self.infos: dict[int, MessageInfo] = {}  # kept in UID order
        self.loaded: tuple[int, int, int] | None = None
        self.watchers: weakref.WeakSet[Any] = weakref.WeakSet()

    def put(self, info: MessageInfo) -> None:
        """Add or replace ``info``, keeping UID order."""
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
            for watcher in list(self.watchers):
                watcher.snapshot_changed(uid, old)

    def replace(self, infos: dict[int, MessageInfo]) -> None:
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
        folder: _Folder,
        snapshot: bool = True,
        shared: bool = True,
    ) -> None:
        self._store = store
        self._user = user
        self._folder = folder
        # ``shared`` false: a private snapshot (a writer in another thread must not change
        # the shared one, whose watchers live in the reactor thread).
        self._snap = store._snapshot(user, folder) if shared else _Snapshot()
        self.name = folder.name
        self.uidvalidity = 0
        self.uidnext = 1
        self.highestmodseq = 1
        if snapshot:
            self.refresh()
        else:
            u = self._u()
            with u.lock:
                row = self._state_row(u)
            self.uidvalidity = int(row[0])  # type: ignore[call-overload]
            self.uidnext = int(row[1])  # type: ignore[call-overload]
            self.highestmodseq = int(row[2])  # type: ignore[call-overload]

    def _u(self) -> _User:
        return self._store._user(self._user)

    # The interface declares list[object]/dict[int, object]; the precise types help callers.
    def messages(self) -> list[MessageInfo]:  # type: ignore[override]
        """Every message of the snapshot, ordered by UID."""
        if self._snap.loaded is None:  # opened without a snapshot
            self.refresh()
        return list(self._snap.infos.values())

    def snapshot_info(self, uid: int) -> MessageInfo | None:
        """The snapshot's message ``uid`` (None when not in it); loads nothing."""
        return self._snap.infos.get(uid)

    def snapshot_count(self) -> int:
        """The number of messages in the snapshot; loads nothing."""
        return len(self._snap.infos)

    def watch(self, watcher: Any) -> None:
        """Tell ``watcher`` (held weakly) of every later change of the shared snapshot: see
        ``_Snapshot``. Its callbacks run under the user's lock and must not use the store."""
        self._snap.watchers.add(watcher)

    def _state_row(self, u: _User) -> Sequence[object]:
        # The name too: the id may now be another folder's (renamed, deleted, re-created).
        row = u.index.conn.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, message_count FROM mailboxes"
            " WHERE id = ? AND name = ?",
            (self._folder.id, self._folder.name),
        ).fetchone()
        if row is None:
            raise self._store._forget(u, self._folder)
        return cast(Sequence[object], row)

    def refresh(self) -> None:
        """Repair the index if the folder's files changed, then bring the snapshot up to
        date (``_load``)."""
        u = self._u()
        with u.lock:
            self._store._sync(u, self._folder)
            self._load(u)

    def _load(self, u: _User) -> None:
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
            state = (int(row[0]), int(row[1]), int(row[2]))  # type: ignore[call-overload]
            loaded = snap.loaded
            if state != loaded:
                if loaded is None or loaded[0] != state[0] or state[2] < loaded[2]:
                    snap.replace(self._rows(conn))
                else:
                    self._apply_changes(conn, loaded[2])
                    if len(snap.infos) != int(row[3]):  # type: ignore[call-overload]
                        snap.replace(self._rows(conn))
                snap.loaded = state
        finally:
            if own:
                conn.execute("COMMIT")
        self.uidvalidity, self.uidnext, self.highestmodseq = state

    def _rows(self, conn: sqlite3.Connection) -> dict[int, MessageInfo]:
        rows = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? ORDER BY uid",
            (self._folder.id,),
        ).fetchall()
        return {int(r[0]): _info_from_row(r) for r in rows}

    def _apply_changes(self, conn: sqlite3.Connection, modseq: int) -> None:
        """Apply the index's changes above ``modseq`` (removals, then changed/new rows)."""
        for (uid,) in conn.execute(
            "SELECT uid FROM tombstones WHERE mailbox = ? AND modseq > ?",
            (self._folder.id, modseq),
        ).fetchall():
            self._snap.remove(int(uid))
        rows = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ? ORDER BY uid",
            (self._folder.id, modseq),
        ).fetchall()
        for r in rows:
            self._snap.put(_info_from_row(r))

    def _wrote(
        self,
        u: _User,
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

    def _box_state(self, u: _User) -> tuple[int, int, int]:
        """(UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) of the folder's row; MailboxNotFound."""
        row = self._state_row(u)
        return (int(row[0]), int(row[1]), int(row[2]))  # type: ignore[call-overload]

    def _lookup(self, u: _User, uid: int) -> MessageInfo | None:
        row = u.index.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
            (self._folder.id, uid),
        ).fetchone()
        return None if row is None else _info_from_row(row)

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
                        return open(os.path.join(self._folder.path, info.filename), "rb")
                    except FileNotFoundError:
                        pass
                # Renamed (flags) or removed by someone else: ask the index, then repair it.
                if attempt == 1:
                    self._store._sync(u, self._folder)
                info = self._lookup(u, uid)
        raise KeyError(uid)

    def read_message(self, uid: int) -> bytes:
        """The stored bytes of the message; KeyError if the UID is gone."""
        with self.open_message(uid) as fh:
            return fh.read()

    def set_flags(  # type: ignore[override]
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
                        f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                        (self._folder.id, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    info = _info_from_row(row)
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
                    self._store._record_mtimes(c, u, self._folder)
                    self._store._journal.flags(u, self.name, modseq, put, removed)
            if changed:
                self._wrote(u, before, (before[0], before[1], modseq), put, removed)
        return result

    def _rename_for(
        self, c: sqlite3.Connection, u: _User, info: MessageInfo, flags: frozenset[str], modseq: int
    ) -> MessageInfo | None:
        """Rename the file for ``flags`` and update its row; None if the file vanished."""
        if info.blob is not None:  # tier 2: the flags live in the index and the manifest
            text = maildir.flags_to_text(flags)
            c.execute(
                "UPDATE messages SET flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
                (text, modseq, self._folder.id, info.uid),
            )
            u.index.log(self._folder.id, manifest.set_flags(info.uid, text))
            return dataclasses.replace(info, flags=flags, modseq=modseq)
        base, old_info = maildir.split_filename(info.filename.split("/", 1)[1])
        rel = maildir.rel_name(base, flags, old_info if old_info is not None else "")
        src = os.path.join(self._folder.path, info.filename)
        try:
            if rel != info.filename:
                os.rename(src, os.path.join(self._folder.path, rel))
        except FileNotFoundError:
            current = maildir.list_files(self._folder.path).get(base)
            if current is None:
                c.execute(
                    "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                    (self._folder.id, info.uid),
                )
                add_tombstones(c, self._folder.id, [info.uid], modseq)
                self._fix_totals(c)
                return None
            rel = maildir.rel_name(base, flags, maildir.split_filename(current)[1] or "")
            if rel != current:
                os.rename(
                    os.path.join(self._folder.path, current), os.path.join(self._folder.path, rel)
                )
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
                        self._store._unlink_message(self._folder, filename)
                    else:
                        maildir.unlink_quiet(os.path.join(self._folder.path, filename))
                        u.index.log(self._folder.id, manifest.delete(uid))
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
                    self._store._record_mtimes(c, u, self._folder)
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

    def changes_since(self, modseq: int) -> tuple[list[MessageInfo], list[int]]:  # type: ignore[override]
        """(messages whose modseq is above ``modseq``, UIDs expunged since then), both read
        from the index now and ordered by UID (CONDSTORE CHANGEDSINCE, QRESYNC VANISHED)."""
        u = self._u()
        with u.lock:
            self._state_row(u)
            rows = u.index.conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ?"
                " ORDER BY uid",
                (self._folder.id, modseq),
            ).fetchall()
            gone = u.index.conn.execute(
                "SELECT uid FROM tombstones WHERE mailbox = ? AND modseq > ? ORDER BY uid",
                (self._folder.id, modseq),
            ).fetchall()
        return [_info_from_row(r) for r in rows], [int(r[0]) for r in gone]

    # -- \\Recent: each message is recent in exactly one session (of any process) -------------

    def _recent_mark(self, c: sqlite3.Connection, u: _User) -> int:
        row = c.execute(
            "SELECT recent_uid FROM mailboxes WHERE id = ? AND name = ?",
            (self._folder.id, self._folder.name),
        ).fetchone()
        if row is None:
            raise self._store._forget(u, self._folder)
        return int(row[0])

    def claim_recent(self, uids: Iterable[int]) -> set[int]:
        """Claim the messages of ``uids`` that no session has seen as \\Recent yet and return
        them: the folder's claim mark (the highest claimed UID, in the index) moves up in a
        write transaction, so of several sessions, in any processes, exactly one gets each
        message. Writes nothing when no UID is above the mark. MailboxNotFound."""
        wanted = list(uids)
        if not wanted:
            return set()
        top = max(wanted)
        u = self._u()
        with u.lock:
            if top <= self._recent_mark(u.index.conn, u):
                return set()
            with u.index.write() as c:
                mark = self._recent_mark(c, u)
                claimed = {x for x in wanted if x > mark}
                if claimed:
                    c.execute(
                        "UPDATE mailboxes SET recent_uid = ? WHERE id = ?",
                        (max(claimed), self._folder.id),
                    )
        return claimed

    def unclaimed_recent(self, uids: Iterable[int]) -> set[int]:
        """The messages of ``uids`` no session has claimed yet (\\Recent for a read-only
        session, which claims nothing). MailboxNotFound."""
        u = self._u()
        with u.lock:
            mark = self._recent_mark(u.index.conn, u)
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
            self._store._sync_dirs(self._folder, dest)
            if pairs:
                if self._snap.loaded is None:
                    self.highestmodseq = int(row[0])
                else:
                    self._load(u)
        return pairs
