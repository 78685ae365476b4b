"""Tier-2 pack files: small blobs appended to shared files and found through an SQLite index.

A loose blob takes at least one file-system block (4 KiB) however small it is; a header blob
of 1-2 KiB compresses to a few hundred bytes. Blobs up to ``FileBlobStore.pack_max`` bytes
are therefore appended, as records, to ``packs/pack-<n>.pack`` and located through
``packs/index.sqlite`` (digest -> pack, offset, length, logical size, mtime).

A record is ``MAGIC``, the 32-byte sha256, the frame length (big endian), then one zstd
frame with checksum. Records are only ever appended; a pack is never modified in place.

Ordering (crash safety): a writer holds the store's lock (a thread lock and ``flock`` on
``packs/lock``, so threads and processes take turns), appends the record, fsyncs the pack
and only then commits the index row (WAL, ``synchronous=FULL``) and returns, so the blob is
durable before any manifest refers to it. A crash between the two leaves dead bytes in the
pack, never an index row pointing at bytes that are not on disk. ``repack`` copies the live
records of a sealed pack whose live fraction fell below a threshold into the current pack
(fsynced), switches their rows in one transaction, and only then unlinks the old pack: a
crash before the switch leaves the old rows valid, after it a pack without live rows that
the next ``repack`` removes. Readers ``pread`` the one record (never the whole pack) and
look the row up again when a repack removed the pack under them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard
from twisted.logger import Logger

from mailgw.store import maildir

log = Logger()

MAGIC = b"MGP1"
RECORD = struct.Struct(">4s32sI")
# A pack takes appends until it is this large; then the next one is started.
PACK_TARGET = 64 << 20
# ``repack`` rewrites a sealed pack whose live records are less than this fraction of it.
REPACK_LIVE = 0.5
_PACK_RE = re.compile(r"^pack-(\d{8})\.pack$")


class PackError(Exception):
    """A packed blob's record does not read back as written (raised as BlobCorrupt)."""


@dataclass
class PackStats:
    """Packs on disk: files, their bytes, the bytes of live records, live records."""

    packs: int = 0
    bytes: int = 0
    live_bytes: int = 0
    blobs: int = 0


@dataclass(frozen=True)
class Location:
    """Where a packed blob's record is: pack number, offset, frame length, logical size."""

    pack: int
    offset: int
    length: int
    size: int


class PackStore:
    """The packs and their index under ``root`` (``<tier2 dir>/packs``).

    Thread-safe; several processes may use the same directory (writers take turns under
    ``flock``; readers use SQLite's WAL snapshots)."""

    def __init__(self, root: str, target: int = PACK_TARGET) -> None:
        self.root = os.path.abspath(root)
        self.target = target
        created = not os.path.isdir(self.root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if created:
            maildir.fsync_dir(os.path.dirname(self.root))
        self._thread_lock = threading.RLock()
        self._depth = 0  # of ``locked`` in the thread holding it: flock once
        self._db_lock = threading.Lock()
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        path = os.path.join(self.root, "index.sqlite")
        # Why the index was rebuilt from the packs' records when it was opened ("": it was not).
        self.rebuilt_because = ""
        try:
            with self.locked():
                existed = os.path.exists(path)
                try:
                    self._db = self._open_index(path)
                except sqlite3.DatabaseError as e:
                    if isinstance(e, sqlite3.OperationalError):
                        raise  # locked, no permission...: not damage
                    # Unreadable: moved aside; the packs' records say it all again.
                    aside = f"{path}.corrupt-{int(time.time())}"
                    os.rename(path, aside)
                    for suffix in ("-wal", "-shm"):
                        maildir.unlink_quiet(path + suffix)
                    self._db = self._open_index(path)
                    self.rebuilt_because = f"{path} unreadable ({e}), moved to {aside}"
                if not existed and self._pack_files():
                    self.rebuilt_because = f"{path} was missing"
            if self.rebuilt_because:
                n = self.rebuild_index()
                log.warn(
                    "store: tier-2 pack index rebuilt from the packs ({n} blobs): {why}",
                    n=n,
                    why=self.rebuilt_because,
                )
        except sqlite3.Error as e:
            os.close(self._lock_fd)
            raise OSError(f"{path}: {e}") from None

    def _open_index(self, path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS blobs(digest BLOB PRIMARY KEY,"
                " pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,"
                " size INTEGER NOT NULL, mtime REAL NOT NULL) WITHOUT ROWID"
            )
            db.execute("CREATE TABLE IF NOT EXISTS packs(id INTEGER PRIMARY KEY)")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        os.close(self._lock_fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The writers' lock: this process's threads, then other processes (``flock``)."""
        with self._thread_lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    if self._depth == 1:
                        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                self._depth -= 1

    def pack_path(self, pack: int) -> str:
        return os.path.join(self.root, f"pack-{pack:08d}.pack")

    # -- the index ------------------------------------------------------------------------

    def locate(self, digest: str) -> Location | None:
        """Where the blob ``digest`` (hex) is packed, or None."""
        with self._db_lock:
            row = self._db.execute(
                "SELECT pack, offset, length, size FROM blobs WHERE digest = ?",
                (bytes.fromhex(digest),),
            ).fetchone()
        return None if row is None else Location(*row)

    def stat(self, digest: str) -> tuple[int, float] | None:
        """(bytes the record takes in its pack, mtime), or None when not packed."""
        with self._db_lock:
            row = self._db.execute(
                "SELECT length, mtime FROM blobs WHERE digest = ?", (bytes.fromhex(digest),)
            ).fetchone()
        return None if row is None else (RECORD.size + int(row[0]), float(row[1]))

    def touch(self, digest: str, mtime: float | None = None) -> bool:
        """Set a packed blob's mtime (now by default: ``gc`` spares young blobs); False when
        it is not packed."""
        with self._db_lock:
            cur = self._db.execute(
                "UPDATE blobs SET mtime = ? WHERE digest = ?",
                (time.time() if mtime is None else mtime, bytes.fromhex(digest)),
            )
            return cur.rowcount > 0

    def digests(self) -> Iterator[str]:
        """The hex digests of all packed blobs."""
        with self._db_lock:
            rows = self._db.execute("SELECT digest FROM blobs").fetchall()
        for (digest,) in rows:
            yield bytes(digest).hex()

    def delete(self, digest: str, older_than: float | None = None) -> bool:
        """Drop a blob's row (its bytes stay until ``repack``); with ``older_than``, only
        when its mtime is not after it, in the same statement (a ``put`` that refreshed it
        meanwhile wins). False when nothing was dropped."""
        with self._db_lock:
            cur = self._db.execute(
                "DELETE FROM blobs WHERE digest = ? AND mtime <= ?",
                (bytes.fromhex(digest), float("inf") if older_than is None else older_than),
            )
            return cur.rowcount > 0

    # -- writing --------------------------------------------------------------------------

    def put(self, digest: str, data: bytes, level: int) -> None:
        """Pack the blob ``data`` whose sha256 is ``digest`` (hex), durably, unless it is
        packed already (then its mtime is refreshed). OSError when it cannot be written."""
        if self.touch(digest):
            return
        frame = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
        record = RECORD.pack(MAGIC, bytes.fromhex(digest), len(frame)) + frame
        with self.locked():
            if self.touch(digest):  # another writer packed it meanwhile
                return
            pack, offset = self._append(record)
            self._commit_rows([(bytes.fromhex(digest), pack, offset, len(frame), len(data))])

    def _commit_rows(self, rows: list[tuple[bytes, int, int, int, int]]) -> None:
        now = time.time()
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO blobs(digest, pack, offset, length, size, mtime)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(*row, now) for row in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _current(self, need: int = 0) -> int:
        """The pack taking appends (under the lock); a new one when ``need`` more bytes
        would take the last one past ``target`` (unless it is empty)."""
        with self._db_lock:
            row = self._db.execute("SELECT MAX(id) FROM packs").fetchone()
        pack = row[0]
        if pack is not None:
            try:
                size = os.stat(self.pack_path(pack)).st_size
                if size == 0 or size + need <= self.target:
                    return int(pack)
            except FileNotFoundError:
                pass  # its row was committed by a writer that then crashed; start another
        pack = 1 + max([pack or 0, *self._pack_files()])
        fd = os.open(self.pack_path(pack), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        maildir.fsync_dir(self.root)
        with self._db_lock:
            self._db.execute("INSERT OR IGNORE INTO packs(id) VALUES (?)", (pack,))
        return pack

    def _append(self, record: bytes) -> tuple[int, int]:
        """Append ``record`` to the current pack and fsync it (under the lock): (pack, offset)."""
        pack = self._current(len(record))
        fd = os.open(self.pack_path(pack), os.O_WRONLY | os.O_APPEND)
        try:
            offset = os.fstat(fd).st_size
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return pack, offset

    # -- reading --------------------------------------------------------------------------

    def read(self, digest: str) -> bytes | None:
        """The packed blob's bytes, verified against ``digest``; None when not packed.
        PackError when its record is damaged or its pack is missing."""
        missing = -1
        for _attempt in range(3):
            loc = self.locate(digest)
            if loc is None:
                return None
            try:
                record = self._pread(loc)
            except FileNotFoundError:
                missing = loc.pack
                continue  # repacked meanwhile: look again
            return self._decode(digest, loc, record)
        raise PackError(f"blob {digest}: pack {missing} is missing")

    def _pread(self, loc: Location) -> bytes:
        fd = os.open(self.pack_path(loc.pack), os.O_RDONLY)
        try:
            return os.pread(fd, RECORD.size + loc.length, loc.offset)
        finally:
            os.close(fd)

    @staticmethod
    def _decode(digest: str, loc: Location, record: bytes) -> bytes:
        where = f"blob {digest} (pack {loc.pack} offset {loc.offset})"
        if len(record) != RECORD.size + loc.length:
            raise PackError(f"{where}: record truncated")
        magic, raw, length = RECORD.unpack_from(record)
        if magic != MAGIC or raw.hex() != digest or length != loc.length:
            raise PackError(f"{where}: record header damaged")
        try:
            data = zstandard.ZstdDecompressor().decompress(
                record[RECORD.size :], max_output_size=max(loc.size, 1)
            )
        except zstandard.ZstdError as e:
            raise PackError(f"{where}: cannot decompress: {e}") from None
        found = hashlib.sha256(data).hexdigest()
        if found != digest:
            raise PackError(f"{where}: content hash is {found}")
        return data

    # -- space ----------------------------------------------------------------------------

    def _pack_files(self) -> list[int]:
        packs = []
        for name in os.listdir(self.root):
            m = _PACK_RE.match(name)
            if m:
                packs.append(int(m.group(1)))
        return sorted(packs)

    def _live(self) -> dict[int, int]:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT pack, SUM(length) + COUNT(*) * ? FROM blobs GROUP BY pack", (RECORD.size,)
            ).fetchall()
        return {int(p): int(n) for p, n in rows}

    def scan(self, pack: int) -> Iterator[tuple[int, str, int, int, bool]]:
        """The records of pack ``pack`` in file order: (offset, hex digest, frame length,
        logical size, intact). A damaged record is skipped up to the next ``MAGIC``; a torn
        tail (a writer that crashed mid-append) ends the scan."""
        with open(self.pack_path(pack), "rb") as fh:
            data = fh.read()
        offset = 0
        while offset + RECORD.size <= len(data):
            magic, raw, length = RECORD.unpack_from(data, offset)
            end = offset + RECORD.size + length
            if magic != MAGIC or end > len(data):
                found = data.find(MAGIC, offset + 1)
                if found < 0:
                    return
                offset = found
                continue
            digest = raw.hex()
            loc = Location(pack, offset, length, 1 << 62)
            try:
                size = len(self._decode(digest, loc, data[offset:end]))
                intact = True
            except PackError:
                size, intact = 0, False
            yield offset, digest, length, size, intact
            offset = end

    def rebuild_index(self) -> int:
        """Index every intact record of every pack again (after the index was lost or
        damaged); a digest found more than once keeps its last copy. Records of deleted
        blobs come back as orphans (``gc`` removes them again). Returns the rows indexed."""
        with self.locked():
            rows: dict[bytes, tuple[int, int, int, int, float]] = {}
            packs = self._pack_files()
            for pack in packs:
                mtime = os.stat(self.pack_path(pack)).st_mtime
                for offset, digest, length, size, intact in self.scan(pack):
                    if intact:
                        rows[bytes.fromhex(digest)] = (pack, offset, length, size, mtime)
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("DELETE FROM blobs")
                    self._db.executemany(
                        "INSERT INTO blobs(digest, pack, offset, length, size, mtime)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        [(d, *r) for d, r in rows.items()],
                    )
                    self._db.executemany(
                        "INSERT OR IGNORE INTO packs(id) VALUES (?)", [(p,) for p in packs]
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        return len(rows)

    def stats(self) -> PackStats:
        """Pack files, their bytes, live bytes and live records."""
        out = PackStats()
        live = self._live()
        for pack in self._pack_files():
            with contextlib.suppress(FileNotFoundError):
                out.bytes += os.stat(self.pack_path(pack)).st_size
                out.packs += 1
        out.live_bytes = sum(live.values())
        with self._db_lock:
            out.blobs = int(self._db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0])
        return out

    def repack(self, min_live: float = REPACK_LIVE) -> tuple[int, int]:
        """Rewrite every sealed pack whose live records take less than ``min_live`` of it:
        live records go to the current pack (fsynced), their rows switch in one transaction,
        then the old pack is unlinked. Returns (packs removed, bytes reclaimed). A record
        that does not read back (damaged) is copied as it is: ``verify`` still reports it."""
        removed = reclaimed = 0
        with self.locked():
            current = self._current()
            live = self._live()
            for pack in self._pack_files():
                if pack >= current:
                    continue
                path = self.pack_path(pack)
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    continue
                if size and live.get(pack, 0) >= min_live * size:
                    continue
                moved = self._move_records(pack)
                os.unlink(path)
                maildir.fsync_dir(self.root)
                with self._db_lock:
                    self._db.execute("DELETE FROM packs WHERE id = ?", (pack,))
                removed += 1
                reclaimed += size - moved
        return removed, reclaimed

    def _move_records(self, pack: int) -> int:
        """Copy pack ``pack``'s live records to the current pack and switch their rows (under
        the lock). Returns the bytes copied."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT digest, offset, length, size FROM blobs WHERE pack = ? ORDER BY offset",
                (pack,),
            ).fetchall()
        if not rows:
            return 0
        copied = 0
        fd = os.open(self.pack_path(pack), os.O_RDONLY)
        try:
            batch: list[tuple[bytes, int, int]] = []  # (digest, old offset, new record)
            records = []
            for digest, offset, length, _size in rows:
                record = os.pread(fd, RECORD.size + length, offset)
                records.append(record)
                batch.append((bytes(digest), int(offset), len(record)))
        finally:
            os.close(fd)
        new_pack, base = self._append(b"".join(records))
        switches = []
        at = base
        for digest, old_offset, n in batch:
            switches.append((new_pack, at, digest, pack, old_offset))
            at += n
            copied += n
        self._switch(switches)
        return copied

    def _switch(self, switches: list[tuple[int, int, bytes, int, int]]) -> None:
        """Point the moved rows (new pack, new offset, digest, old pack, old offset) at their
        copies, in one transaction; a row deleted meanwhile stays deleted."""
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE blobs SET pack = ?, offset = ? WHERE digest = ? AND pack = ?"
                    " AND offset = ?",
                    switches,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
