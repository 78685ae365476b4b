"""Tier 2 of the mailbox store: messages whose bytes are content-addressed blobs
(``mailgw.store.blobs``) instead of tier-1 files, and the per-folder manifests
(``mailgw.store.manifest``) that let a rebuilt index take them back.

A tier-2 message keeps its row in the user's index (same UID, flags, modseq) with the blob
reference in ``blob``; the manifest records (``put``/``flags``/``delete`` and reservation
marks) are queued on the index by the write that changes such a row and appended, fsynced,
by ``before_commit`` inside the same transaction. ``migrate`` and ``promote`` move one
message between the tiers crash-safely; tier-1 files are reached only through the backend's
``IMessageBackend`` (``mailgw.store.backend``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from twisted.logger import Logger

from mailgw.interfaces import IBlobStore
from mailgw.journal.store import StoreJournal
from mailgw.model.message import MessageInfo, StoreCheck
from mailgw.store import blobs, maildir, manifest
from mailgw.store.backend import Allocate, Folder, IMessageBackend, UserHandle

log = Logger()

# Told where a message lives now (``blob``, ``filename`` keyword arguments) after a move
# between the tiers: the facade patches the snapshot of the folder in this process.
Patch = Callable[..., None]


def put_record(row: Sequence[Any]) -> dict[str, Any]:
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


class Tier2Placement:
    """Places messages in tier 2 and keeps the folders' manifests, for the store facade.

    ``blob_store`` is the ``IBlobStore`` (None: no tier 2 configured; reading a tier-2
    message then fails with OSError); ``tier1`` the backend holding tier-1 files; ``patch``
    is called as ``patch(u, f, uid, blob=..., filename=...)`` after a message moved between
    the tiers; ``journal`` records the changes (tier moves, messages added) in their
    transactions.
    """

    def __init__(
        self,
        tier1: IMessageBackend,
        blob_store: IBlobStore | None,
        patch: Patch,
        journal: StoreJournal,
    ) -> None:
        self.tier1 = tier1
        self.blob_store = blob_store
        self._patch = patch
        self._journal = journal

    def store(self) -> IBlobStore:
        """The blob store; OSError when tier 2 is not configured."""
        if self.blob_store is None:
            raise OSError("a message is in tier 2 but [store] tier2_dir is not set")
        return self.blob_store

    def open(self, info: MessageInfo) -> BinaryIO:
        """The verified bytes of a tier-2 message (BlobNotFound, BlobCorrupt)."""
        return blobs.open_message(self.store(), str(info.blob))

    # -- moving messages between the tiers ------------------------------------------

    def migrate(self, u: UserHandle, f: Folder, uid: int) -> bool:
        """Move one message from tier 1 to tier 2, crash-safe and idempotent: the file's bytes
        go into a header blob and a body blob (fsynced), the index row is switched to them in
        a transaction, and only then is the Maildir file unlinked. A crash before the switch
        leaves the message in tier 1 (the next run stores the same blobs again, deduplicated);
        a crash after it leaves a redundant file that the next sync of the folder removes.
        Returns True when the message moved, False when it was gone or already in tier 2.
        Raises MailboxNotFound, OSError."""
        tier2 = self.store()

        def tier1_row() -> Any:
            return u.index.conn.execute(
                "SELECT filename, size, blob FROM messages WHERE mailbox = ? AND uid = ?",
                (f.id, uid),
            ).fetchone()

        with u.lock:
            row = tier1_row()
        if row is None or row[2] is not None:
            return False
        try:
            fh = self.tier1.open(f, str(row[0]))  # closed below
        except FileNotFoundError:
            # Renamed by a flag change meanwhile: ask the index again.
            with u.lock:
                self.tier1.sync(u, f)
                row = tier1_row()
            if row is None or row[2] is not None:
                return False
            try:
                fh = self.tier1.open(f, str(row[0]))
            except FileNotFoundError:
                return False
        with fh:
            ref, size = blobs.put_message(tier2, fh)
        if size != int(row[1]):
            raise OSError(f"{u.name} {f.name} UID {uid}: {size} bytes read, index says {row[1]}")
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
                    self.log_put(u, c, f.id, uid)
                    self._journal.migrated(u, f.name, uid, ref)
                    # Make the next sync list the folder, so a leftover file is found.
                    c.execute(
                        "UPDATE mailboxes SET new_mtime = -1, cur_mtime = -1 WHERE id = ?", (f.id,)
                    )
            finally:
                u.index.conn.execute("PRAGMA synchronous=NORMAL")
            self.tier1.unlink(f, str(current[0]))
            self._patch(u, f, uid, blob=ref)
        return True

    def promote(self, u: UserHandle, f: Folder, uid: int) -> bool:
        """Move one message back from tier 2 to tier 1 (a new Maildir file with its flags,
        same UID); the blob stays until ``gc`` finds it unreferenced. Returns False when the
        message is gone or in tier 1 already. BlobCorrupt/BlobNotFound when the blob is
        damaged (the message stays in tier 2)."""
        tier2 = self.store()
        with u.lock:
            row = u.index.conn.execute(
                "SELECT base, blob, internaldate FROM messages WHERE mailbox = ? AND uid = ?",
                (f.id, uid),
            ).fetchone()
        if row is None or row[1] is None:
            return False
        base = str(row[0])
        with blobs.open_message(tier2, str(row[1])) as src:
            tmp = self.tier1.write(f, b"", src, None)[1]
        try:
            os.utime(tmp, (float(row[2]), float(row[2])))
            with u.lock, u.index.write() as c:
                current = c.execute(
                    "SELECT flags, blob, filename FROM messages WHERE mailbox = ? AND uid = ?",
                    (f.id, uid),
                ).fetchone()
                if current is None or current[1] is None:
                    return False
                flags = maildir.flags_from_text(str(current[0]))
                rel = self.tier1.adopt(f, tmp, base, str(current[2]), flags)
                c.execute(
                    "UPDATE messages SET blob = NULL, filename = ? WHERE mailbox = ? AND uid = ?",
                    (rel, f.id, uid),
                )
                u.index.log(f.id, manifest.delete(uid))
                self._journal.promoted(u, f.name, uid, rel)
                self._patch(u, f, uid, blob=None, filename=rel)
        finally:
            maildir.unlink_quiet(tmp)
        self.tier1.sync_file(f, rel)
        return True

    def place_blob(
        self,
        u: UserHandle,
        f: Folder,
        allocate: Allocate,
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
            uid, modseq = allocate(c, size)
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
            self.log_put(u, c, f.id, uid)
            info = MessageInfo(uid, size, flags, internaldate, modseq, filename, blob, tz)
            self._journal.added(u, f.name, info)
        return info

    # -- tier-2 manifests (mailgw.store.manifest) ---------------------------------------

    def log_put(self, u: UserHandle, c: sqlite3.Connection, folder_id: int, uid: int) -> None:
        """Queue the manifest record of tier-2 message ``uid`` as the transaction has it."""
        row = c.execute(
            "SELECT uid, blob, size, flags, internaldate, internaldate_tz, base, filename"
            " FROM messages WHERE mailbox = ? AND uid = ? AND blob IS NOT NULL",
            (folder_id, uid),
        ).fetchone()
        if row is not None:
            u.index.log(folder_id, put_record(row))

    def log_delete(self, u: UserHandle, folder_id: int, uid: int) -> None:
        """Queue the manifest record of tier-2 message ``uid`` leaving the folder."""
        u.index.log(folder_id, manifest.delete(uid))

    def log_flags(self, u: UserHandle, folder_id: int, uid: int, flags: str) -> None:
        """Queue the manifest record of tier-2 message ``uid``'s new flags (as text)."""
        u.index.log(folder_id, manifest.set_flags(uid, flags))

    def before_commit(self, u: UserHandle, c: sqlite3.Connection) -> None:
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

    def manifest_path(self, u: UserHandle, name: str) -> str:
        return os.path.join(self.tier1.folder_path(u, name), manifest.LOG_NAME)

    def _append_manifest(
        self,
        u: UserHandle,
        c: sqlite3.Connection,
        row: Sequence[Any],
        records: list[dict[str, Any]],
    ) -> None:
        fid, name, uidvalidity, uidnext, modseq, gen, size, base, uid_mark, modseq_mark = row
        path = self.manifest_path(u, str(name))
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
            self.rewrite_manifest(c, fid, path, uidvalidity, uidnext, modseq)
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

    def rewrite_manifest(
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
                    out.write(manifest.encode(put_record(row)))
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

    def rewrite_folder_manifest(self, c: sqlite3.Connection, f: Folder) -> None:
        """Write the folder's manifest afresh when it has one or holds tier-2 messages."""
        row = c.execute(
            "SELECT uidvalidity, uidnext, highestmodseq, t2_log_gen FROM mailboxes WHERE id = ?",
            (f.id,),
        ).fetchone()
        has_tier2 = c.execute(
            "SELECT 1 FROM messages WHERE mailbox = ? AND blob IS NOT NULL LIMIT 1", (f.id,)
        ).fetchone()
        if row is not None and (row[3] is not None or has_tier2):
            path = os.path.join(f.path, manifest.LOG_NAME)
            self.rewrite_manifest(c, f.id, path, int(row[0]), int(row[1]), int(row[2]))

    def start_manifests(self, u: UserHandle) -> None:
        """Once per index: write the manifest of every folder that has tier-2 messages but
        none yet (an index from before manifests existed)."""
        with u.index.write() as c:
            rows = c.execute(
                "SELECT id, name, uidvalidity, uidnext, highestmodseq FROM mailboxes"
                " WHERE t2_log_gen IS NULL AND id IN"
                " (SELECT DISTINCT mailbox FROM messages WHERE blob IS NOT NULL)"
            ).fetchall()
            for fid, name, uidvalidity, uidnext, modseq in rows:
                path = self.manifest_path(u, str(name))
                if os.path.isdir(os.path.dirname(path)):
                    self.rewrite_manifest(c, fid, path, uidvalidity, uidnext, modseq)
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('tier2_manifests', '1')")

    def restore_manifest(
        self, c: sqlite3.Connection, u: UserHandle, folder_id: int, name: str, folder_path: str
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

    def check(
        self,
        c: sqlite3.Connection,
        u: UserHandle,
        f: Folder,
        tier2: dict[int, tuple[Any, ...]],
        report: StoreCheck,
    ) -> bool:
        """True (and the folder in ``report.manifests``) when the folder's manifest does not
        say what the index does of its tier-2 messages ``tier2`` (uid -> (blob, size, flags,
        internaldate, zone)); in a write transaction."""
        box = c.execute(
            "SELECT t2_log_gen, t2_log_size FROM mailboxes WHERE id = ?", (f.id,)
        ).fetchone()
        gen, size = box[0], int(box[1])
        if gen is None and not tier2:
            return False
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
            return True
        return False
