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

import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

from twisted.logger import Logger
from zope.interface import implementer

from mailgw.journal.store import StoreJournal
from mailgw.model.message import MessageInfo, StoreCheck
from mailgw.store import maildir
from mailgw.store.backend import (
    Allocate,
    Folder,
    IMessageBackend,
    UserHandle,
    Written,
    folder_gone,
)
from mailgw.store.index import INDEX_NAME
from mailgw.store.names import INBOX, folder_dirname, folder_from_dirname, user_dir
from mailgw.store.rows import add_tombstones, local_zone

log = Logger()

# A directory mtime this close to "now" may still change within the same clock tick without
# the mtime changing, so it is not recorded as "in sync" (Dovecot's rule).
RACY_NS = 2_000_000_000
# While recorded mtimes are racy, a process lists a folder at most this often to catch another
# program's change made in the same clock tick as a mailgw writer's.
SCAN_INTERVAL_NS = 1_000_000_000
# tmp/ files older than this are leftovers of crashed writers (the Maildir convention).
TMP_MAX_AGE = 36 * 3600

# Prefix of a deleted folder's directory while it is being removed; ``..`` never decodes to a
# folder name, so a leftover after a crash is not adopted (``reindex`` removes it).
DELETED_PREFIX = "..mailgw-deleted-"


@implementer(IMessageBackend)
class MaildirBackend:
    """Tier 1: every user's Maildir++ under ``root`` (``data_dir/mail``), see the module
    docstring. Thread-safe as the facade uses it: callers hold the user's lock where
    ``IMessageBackend`` says so; ``write`` runs without it."""

    def __init__(
        self, root: str, hostname: str = "localhost", journal: StoreJournal | None = None
    ) -> None:
        self.root = os.path.abspath(root)
        self.journal = journal
        self._names = maildir.UniqueNames(hostname)
        # Directory fsyncs after placing a message, shared by concurrent deliveries.
        self.dir_sync = maildir.GroupSync()
        # (user, folder id) -> when this process last listed the folder's directories.
        self._scanned: dict[tuple[str, int], int] = {}

    # -- users and folders -----------------------------------------------------------

    def user_path(self, user: str) -> str:
        """The user's Maildir (INBOX), created when missing."""
        path = user_dir(self.root, user)
        maildir.make_maildir(path, subfolder=False)
        return path

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

    def disk_folders(self, u: UserHandle) -> list[str]:
        names = []
        for entry in sorted(os.listdir(u.path)):
            name = folder_from_dirname(entry)
            if name is not None and os.path.isdir(os.path.join(u.path, entry, "cur")):
                names.append(name)
        return names

    def folder_path(self, u: UserHandle, name: str) -> str:
        return os.path.join(u.path, folder_dirname(name))

    def folder_exists(self, u: UserHandle, name: str) -> bool:
        return os.path.isdir(os.path.join(self.folder_path(u, name), "cur"))

    def make_folder(self, u: UserHandle, name: str) -> str:
        """A Maildir++ folder (with its ``maildirfolder`` marker unless INBOX)."""
        path = self.folder_path(u, name)
        maildir.make_maildir(path, subfolder=name != INBOX)
        return path

    def remove_folder(self, u: UserHandle, f: Folder) -> str:
        """Rename the folder's directory to a ``DELETED_PREFIX`` name (never adopted as a
        folder); "" when it is gone already."""
        trash = os.path.join(u.path, f"{DELETED_PREFIX}{f.id}-{time.time_ns()}")
        try:
            os.rename(f.path, trash)
        except FileNotFoundError:
            return ""
        return trash

    def purge(self, u: UserHandle, removed: str) -> None:
        maildir.fsync_dir(u.path)
        shutil.rmtree(removed, ignore_errors=True)

    def rename_folder(self, u: UserHandle, old: str, new: str) -> tuple[str, str]:
        from_path = self.folder_path(u, old)
        to_path = self.folder_path(u, new)
        os.rename(from_path, to_path)
        return from_path, to_path

    def undo_rename(self, moved: tuple[str, str]) -> None:
        from_path, to_path = moved
        os.rename(to_path, from_path)

    def sync_root(self, u: UserHandle) -> None:
        maildir.fsync_dir(u.path)

    def clean_tmp(self, folder_path: str) -> None:
        tmp = os.path.join(folder_path, "tmp")
        limit = time.time() - TMP_MAX_AGE
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            try:
                if os.stat(path).st_mtime < limit:
                    os.unlink(path)
            except FileNotFoundError:
                continue

    # -- messages ----------------------------------------------------------------------

    def write(
        self, f: Folder, prefix: bytes, src: BinaryIO | None, data: bytes | None
    ) -> tuple[str, str, int, int, float]:
        """Write ``tmp/<unique name>`` and fsync it: (head, path, size, vsize, mtime)."""
        head = self._names.next()
        tmp = os.path.join(f.path, "tmp", head)
        size, vsize, mtime = maildir.write_file(tmp, prefix, src, data)
        return head, tmp, size, vsize, mtime

    def place(
        self,
        u: UserHandle,
        f: Folder,
        written: Written,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
        allocate: Allocate,
    ) -> MessageInfo:
        """Under the index write lock: quota check and UID allocation (``allocate``),
        rename of the written tmp file into new/ or cur/, index row (and its journal entry).
        The caller fsyncs the directory. On error the file is removed. ``internaldate`` None
        is the file's mtime (now); ``tz`` None is the server's zone at that instant."""
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
                uid, modseq = allocate(c, size)
                placed = os.path.join(f.path, rel)
                os.rename(tmp, placed)
                c.execute(
                    "INSERT INTO messages(mailbox, uid, base, filename, size, flags,"
                    " internaldate, modseq, internaldate_tz) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.id, uid, base, rel, size, maildir.flags_to_text(flags), mtime, modseq, zone),
                )
                self.record_mtimes(c, u, f)
                info = MessageInfo(uid, size, flags, mtime, modseq, rel, internaldate_tz=zone)
                if self.journal is not None:
                    self.journal.added(u, f.name, info)
        except BaseException:
            maildir.unlink_quiet(placed or tmp)
            raise
        return info

    def make_durable(self, u: UserHandle, f: Folder, info: MessageInfo) -> None:
        """fsync the directory of a placed message (an fsync shared with the messages
        placed in it meanwhile by other threads: ``maildir.GroupSync``); if that fails, take
        the message out again (file and index row) and raise."""
        try:
            self.dir_sync.sync(self.placed_dir(f, info))
        except BaseException:
            self.take_out(u, f, info)
            raise

    def make_durable_many(
        self, placed: Sequence[tuple[UserHandle, Folder, MessageInfo]]
    ) -> list[tuple[UserHandle, Folder, MessageInfo]]:
        by_dir: dict[str, list[tuple[UserHandle, Folder, MessageInfo]]] = {}
        for item in placed:
            by_dir.setdefault(self.placed_dir(item[1], item[2]), []).append(item)
        failed = []
        for path, items in by_dir.items():
            try:
                self.dir_sync.sync(path)
            except OSError as e:
                log.error("fsync of {path} failed: {e}", path=path, e=e)
                for u, f, info in items:
                    try:
                        self.take_out(u, f, info)
                    except Exception:
                        log.failure("cannot take out {user} uid={uid}", user=u.name, uid=info.uid)
                    failed.append((u, f, info))
        return failed

    @staticmethod
    def placed_dir(f: Folder, info: MessageInfo) -> str:
        """The directory (``new/`` or ``cur/``) a placed message's name is in."""
        return os.path.dirname(os.path.join(f.path, info.filename))

    def take_out(self, u: UserHandle, f: Folder, info: MessageInfo) -> None:
        """Undo ``place`` after its directory fsync failed: the index row goes (with a
        tombstone and its journal entry) and the file is unlinked."""
        path = os.path.join(f.path, info.filename)
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
                if self.journal is not None:
                    self.journal.expunged(u, f.name, [info.uid], int(row[0]))
            maildir.unlink_quiet(path)

    def store(
        self,
        u: UserHandle,
        f: Folder,
        allocate: Allocate,
        prefix: bytes,
        src: BinaryIO | None,
        data: bytes | None,
        flags: frozenset[str],
        internaldate: float | None,
        tz: int | None,
    ) -> MessageInfo:
        """Write tmp + fsync, place it (``place``), fsync its directory."""
        written = self.write(f, prefix, src, data)
        info = self.place(u, f, written, flags, internaldate, tz, allocate)
        self.make_durable(u, f, info)
        return info

    def open(self, f: Folder, filename: str) -> BinaryIO:
        return open(os.path.join(f.path, filename), "rb")

    def new_tmp(self, f: Folder) -> str:
        return os.path.join(f.path, "tmp", self._names.next())

    def adopt(self, f: Folder, tmp: str, base: str, filename: str, flags: frozenset[str]) -> str:
        """Rename ``tmp`` to the message's Maildir name (``base``, the info of ``filename``,
        the letters of ``flags``)."""
        old_info = maildir.split_filename(filename.split("/", 1)[-1])[1]
        rel = maildir.rel_name(base, flags, old_info)
        os.rename(tmp, os.path.join(f.path, rel))
        return rel

    def sync_file(self, f: Folder, filename: str) -> None:
        maildir.fsync_dir(os.path.dirname(os.path.join(f.path, filename)))

    def unlink(self, f: Folder, filename: str) -> None:
        """Unlink a tier-1 file, also when a flag change renamed it meanwhile."""
        try:
            os.unlink(os.path.join(f.path, filename))
        except FileNotFoundError:
            base = maildir.split_filename(filename.split("/", 1)[1])[0]
            current = maildir.list_files(f.path).get(base)
            if current is not None:
                maildir.unlink_quiet(os.path.join(f.path, current))

    def discard(self, f: Folder, filename: str) -> None:
        maildir.unlink_quiet(os.path.join(f.path, filename))

    def move(self, src: Folder, dst: Folder, filename: str, base: str) -> str | None:
        """Rename the file into ``dst`` (found again by its base name when a flag change
        renamed it meanwhile)."""
        current: str | None = filename
        try:
            os.rename(os.path.join(src.path, filename), os.path.join(dst.path, filename))
        except FileNotFoundError:
            current = maildir.list_files(src.path).get(base)
            if current is not None:
                os.rename(os.path.join(src.path, current), os.path.join(dst.path, current))
        return current

    def rename_for_flags(self, f: Folder, filename: str, flags: frozenset[str]) -> str | None:
        """Rename the file so its ``:2,`` letters show ``flags``."""
        base, old_info = maildir.split_filename(filename.split("/", 1)[1])
        rel = maildir.rel_name(base, flags, old_info if old_info is not None else "")
        src = os.path.join(f.path, filename)
        try:
            if rel != filename:
                os.rename(src, os.path.join(f.path, rel))
        except FileNotFoundError:
            current = maildir.list_files(f.path).get(base)
            if current is None:
                return None
            rel = maildir.rel_name(base, flags, maildir.split_filename(current)[1] or "")
            if rel != current:
                os.rename(os.path.join(f.path, current), os.path.join(f.path, rel))
        return rel

    def sync_dirs(self, *folders: Folder) -> None:
        for f in folders:
            for sub in ("new", "cur"):
                maildir.fsync_dir(os.path.join(f.path, sub))

    # -- keeping the index in step with the files ------------------------------------

    def dir_mtimes(self, u: UserHandle, f: Folder) -> tuple[int, int]:
        try:
            return (
                os.stat(os.path.join(f.path, "new")).st_mtime_ns,
                os.stat(os.path.join(f.path, "cur")).st_mtime_ns,
            )
        except FileNotFoundError:
            if f.name != INBOX:
                raise folder_gone(f) from None
            maildir.make_maildir(f.path, subfolder=False)
            return self.dir_mtimes(u, f)

    @staticmethod
    def settled(mtimes: tuple[int, int]) -> tuple[int, int]:
        now = time.time_ns()
        new, cur = mtimes
        return (new if now - new > RACY_NS else -1, cur if now - cur > RACY_NS else -1)

    def record_mtimes(self, c: sqlite3.Connection, u: UserHandle, f: Folder) -> None:
        """After this writer's own change of ``new/``/``cur/`` (in its write transaction, so
        no other mailgw writer changes them meanwhile): remember their mtimes as "the index
        matches these, not yet verified", so readers need not list the directories. Another
        program's change in the same clock tick is caught by ``sync``'s verification scan."""
        c.execute(
            "UPDATE mailboxes SET new_mtime = ?, cur_mtime = ?, mtimes_verified = 0 WHERE id = ?",
            (*self.dir_mtimes(u, f), f.id),
        )

    def sync(self, u: UserHandle, f: Folder, force: bool = False) -> bool:
        """Make the index match the folder's files if its directories may have changed since
        the last check (always with ``force``). Returns True when the index changed.

        The directories are listed when their mtimes differ from the recorded ones (another
        Maildir program changed them). Mtimes a mailgw writer recorded after its own change
        are trusted, except that they are verified by one listing once they are older than
        the racy window (a change in the same clock tick leaves the mtime unchanged), and by
        at most one listing per ``SCAN_INTERVAL_NS`` per process while they are younger."""
        mtimes = self.dir_mtimes(u, f)
        # The name too: a folder object of a renamed folder must not read the files of a
        # new folder made with its old name as its own.
        row = u.index.conn.execute(
            "SELECT new_mtime, cur_mtime, mtimes_verified FROM mailboxes WHERE id = ? AND name = ?",
            (f.id, f.name),
        ).fetchone()
        if row is None:
            raise folder_gone(f)
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

    def _reconcile(self, c: sqlite3.Connection, u: UserHandle, f: Folder, force: bool) -> bool:
        """Under the write lock: adopt renamed files, drop rows of vanished files, give new
        UIDs to unknown files (in delivery order), recompute the folder's totals."""
        mtimes = self.dir_mtimes(u, f)
        files = maildir.list_files(f.path)
        box = c.execute(
            "SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ? AND name = ?",
            (f.id, f.name),
        ).fetchone()
        if box is None:
            raise folder_gone(f)
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
            (uidnext, modseq, *mtimes, int(self.settled(mtimes) == mtimes), f.id, f.id, f.id),
        )
        if self.journal is not None:
            self.journal.resynced(u, f.name, modseq, added, gone, altered)
        return changed

    def check(self, u: UserHandle, f: Folder, rows: Sequence[Any], report: StoreCheck) -> set[str]:
        """Tier-1 rows (uid, base, filename, size) against the folder's files."""
        problems: set[str] = set()
        files = maildir.list_files(f.path)
        for uid, base, filename, size in rows:
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
        return problems
