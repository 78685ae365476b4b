"""Tier-2 blob store: content-addressed (sha256), zstandard-compressed files ``ab/cd/<hash>.zst``.

A blob is named by the sha256 of the bytes it holds, so identical bytes are stored once. A
message is stored as two blobs, its header block (up to and including the blank line that ends
it) and its body (``put_message``): copies of one announcement delivered over SMTP differ in
their trace headers (Return-Path, Delivered-To, Received) but share the body blob. The
index refers to a message by ``<header digest>:<header size>+<body digest>``, or by one
digest for a message kept whole (no body, a header block over ``HEADER_MAX``, or migrated
before the split); reads concatenate the parts (``open_message``). The directory can sit on
another, larger and slower mount. Blobs up to ``pack_max`` bytes (header blobs, small
bodies) are appended to pack files with an index (``mailgw.store.packs``) instead of taking a
file-system block each; larger ones are loose files: written to ``tmp/``, fsynced, renamed
into place and the directory fsynced. Loose blobs of a store written before packs stay
readable (``pack_loose`` moves them). A blob is never modified in place. Every read
recomputes the hash: a damaged blob raises ``BlobCorrupt`` and never returns wrong bytes. The
interface (put/get/open/exists/delete/iter_refs/stat) is small enough for an object store
later.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any, BinaryIO, cast

import zstandard
from zope.interface import implementer

from mailgw.interfaces import IBlobStore
from mailgw.model.blob import BlobRef
from mailgw.store import maildir
from mailgw.store.packs import RECORD, REPACK_LIVE, PackError, PackStore

SUFFIX = ".zst"
CHUNK = 1 << 20
# Reads of blobs up to this size stay in memory; larger ones spill to a temporary file.
SPOOL_MAX = 8 << 20
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A header block longer than this (no blank line found) is not split: the message stays whole.
HEADER_MAX = 1 << 20
# Separates the part digests of a message reference.
PART_SEP = "+"
# Blobs up to this many bytes go into pack files (``[store] tier2_pack_max``).
PACK_MAX = 16 << 10


class BlobError(Exception):
    """A tier-2 blob cannot be read as stored (an integrity problem, not a missing UID)."""


class BlobCorrupt(BlobError):
    """A stored blob does not decompress or its bytes do not match its hash."""


class BlobNotFound(BlobError):
    """No blob with that reference."""


def check_digest(ref: BlobRef | str) -> str:
    """The hex digest of ``ref``; ValueError when it is not 64 lower-case hex digits."""
    digest = ref.digest if isinstance(ref, BlobRef) else ref
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"not a blob reference: {digest!r}")
    return digest


@implementer(IBlobStore)
class FileBlobStore:
    """Blobs in a directory tree ``root/ab/cd/<sha256>.zst`` (zstd frames with checksum),
    those up to ``pack_max`` bytes in ``root/packs`` (0: no new blob is packed; packed ones
    stay readable)."""

    def __init__(self, root: str, level: int = 6, pack_max: int = PACK_MAX) -> None:
        self.root = os.path.abspath(root)
        self.level = level
        self.pack_max = pack_max
        os.makedirs(os.path.join(self.root, "tmp"), mode=0o700, exist_ok=True)
        self.packs = PackStore(os.path.join(self.root, "packs"))

    def close(self) -> None:
        """Close the pack index."""
        self.packs.close()

    def path(self, ref: BlobRef | str) -> str:
        """The file of a blob (whether it exists or not)."""
        digest = check_digest(ref)
        return os.path.join(self.root, digest[:2], digest[2:4], digest + SUFFIX)

    def put(self, data: bytes | BinaryIO) -> BlobRef:
        """Store bytes (or a binary file's remaining bytes) and return their reference.

        When the blob exists already nothing is written, but its mtime is refreshed so that
        a concurrent ``gc`` (which spares young blobs) does not remove it before the caller
        records the reference. OSError when the blob cannot be written durably."""
        src: BinaryIO = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        if self.pack_max > 0:
            first = _read_up_to(src, self.pack_max + 1)
            if len(first) <= self.pack_max:
                return self._put_small(bytes(first))
            src = cast(BinaryIO, _Prefixed(first, src))
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"), suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
                with cctx.stream_writer(out, closefd=False) as writer:
                    while True:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
                        size += len(chunk)
                        writer.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            ref = BlobRef(digest.hexdigest(), size)
            final = self.path(ref)
            if os.path.exists(final):
                os.utime(final)
                maildir.unlink_quiet(tmp)
                return ref
            parent = os.path.dirname(final)
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
                maildir.fsync_dir(os.path.dirname(parent))
                maildir.fsync_dir(self.root)
            os.rename(tmp, final)
            maildir.fsync_dir(parent)
        except BaseException:
            maildir.unlink_quiet(tmp)
            raise
        return ref

    def _put_small(self, data: bytes) -> BlobRef:
        ref = BlobRef(hashlib.sha256(data).hexdigest(), len(data))
        loose = self.path(ref)
        if os.path.exists(loose) and not self.packs.locate(ref.digest):
            with contextlib.suppress(FileNotFoundError):
                os.utime(loose)
                return ref
        self.packs.put(ref.digest, data, self.level)
        return ref

    def open(self, ref: BlobRef | str) -> BinaryIO:
        """A binary file with the blob's bytes, verified against its hash before it is
        returned. BlobNotFound when missing, BlobCorrupt when damaged."""
        digest = check_digest(ref)
        out = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)  # noqa: SIM115 - returned
        try:
            self._decompress_into(digest, out)
        except BaseException:
            out.close()
            raise
        out.seek(0)
        return cast(BinaryIO, out)

    def get(self, ref: BlobRef | str) -> bytes:
        """The blob's bytes (verified). BlobNotFound when missing, BlobCorrupt when damaged."""
        digest = check_digest(ref)
        out = io.BytesIO()
        self._decompress_into(digest, out)
        return out.getvalue()

    def _decompress_into(self, digest: str, out: IO[bytes]) -> None:
        try:
            packed = self.packs.read(digest)
        except PackError as e:
            raise BlobCorrupt(str(e)) from None
        if packed is not None:
            out.write(packed)
            return
        path = self.path(digest)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        hasher = hashlib.sha256()
        with fh:
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
                while True:
                    chunk = reader.read(CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
            except zstandard.ZstdError as e:
                raise BlobCorrupt(f"blob {digest}: cannot decompress: {e}") from None
        if hasher.hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest}: content hash is {hasher.hexdigest()}")

    def exists(self, ref: BlobRef | str) -> bool:
        return self.packs.locate(check_digest(ref)) is not None or os.path.exists(self.path(ref))

    def stat(self, ref: BlobRef | str) -> tuple[int, float]:
        """(bytes on disk, mtime). BlobNotFound when missing."""
        packed = self.packs.stat(check_digest(ref))
        if packed is not None:
            return packed
        try:
            st = os.stat(self.path(ref))
        except FileNotFoundError:
            raise BlobNotFound(check_digest(ref)) from None
        return st.st_size, st.st_mtime

    def delete(self, ref: BlobRef | str, older_than: float | None = None) -> bool:
        """Remove a blob (a packed one's space comes back at ``repack``); with
        ``older_than``, only when its mtime is not after it (``gc``: a ``put`` that just
        refreshed it keeps it). False when nothing was removed."""
        path = self.path(ref)
        packed = self.packs.delete(check_digest(ref), older_than)
        try:
            if older_than is not None and os.stat(path).st_mtime > older_than:
                return packed
            os.unlink(path)
        except FileNotFoundError:
            return packed
        maildir.fsync_dir(os.path.dirname(path))
        return True

    def where(self, ref: BlobRef | str) -> tuple[str, int, int]:
        """(file, offset, length) of the bytes holding a blob as stored: its pack record or
        its loose file. BlobNotFound when missing."""
        digest = check_digest(ref)
        loc = self.packs.locate(digest)
        if loc is not None:
            return self.packs.pack_path(loc.pack), loc.offset, RECORD.size + loc.length
        try:
            return self.path(digest), 0, os.path.getsize(self.path(digest))
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def touch(self, ref: BlobRef | str, mtime: float) -> None:
        """Set a blob's mtime (what ``gc``'s grace compares). BlobNotFound when missing."""
        digest = check_digest(ref)
        if not self.packs.touch(digest, mtime):
            try:
                os.utime(self.path(digest), (mtime, mtime))
            except FileNotFoundError:
                raise BlobNotFound(digest) from None

    def repack(self, min_live: float = REPACK_LIVE) -> tuple[int, int]:
        """Rewrite the packs mostly made of deleted blobs (``PackStore.repack``): (packs
        removed, bytes reclaimed)."""
        return self.packs.repack(min_live)

    def pack_loose(self, limit: int | None = None) -> tuple[int, int]:
        """Move loose blobs of up to ``pack_max`` bytes (a store from before packs) into
        packs: each is read (verified), packed durably, and only then unlinked, so a crash
        leaves it in one place or both (reads prefer the pack). Damaged blobs stay loose for
        ``verify`` to report. Returns (blobs packed, bytes on disk freed); at most ``limit``
        blobs when given."""
        moved = freed = 0
        for digest in self._loose_refs():
            if limit is not None and moved >= limit:
                break
            path = self.path(digest)
            try:
                st = os.stat(path)
                if self.packs.locate(digest) is None:
                    data = self.get(digest)
                    if len(data) > self.pack_max:
                        continue
                    self.packs.put(digest, data, self.level)
                    self.packs.touch(digest, st.st_mtime)
            except (BlobError, FileNotFoundError):
                continue
            maildir.unlink_quiet(path)
            maildir.fsync_dir(os.path.dirname(path))
            moved += 1
            freed += st.st_blocks * 512
        return moved, freed

    def iter_refs(self) -> Iterator[str]:
        """The digests of all stored blobs (any order)."""
        packed = set(self.packs.digests())
        yield from packed
        for digest in self._loose_refs():
            if digest not in packed:
                yield digest

    def _loose_refs(self) -> Iterator[str]:
        for top in sorted(os.listdir(self.root)):
            if len(top) != 2:
                continue
            top_path = os.path.join(self.root, top)
            with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                for sub in sorted(os.listdir(top_path)):
                    sub_path = os.path.join(top_path, sub)
                    with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                        for name in os.listdir(sub_path):
                            digest = name[: -len(SUFFIX)]
                            if name.endswith(SUFFIX) and _DIGEST_RE.match(digest):
                                yield digest

    def clean_tmp(self, max_age: float = 3600.0) -> int:
        """Remove temporary files of crashed writers older than ``max_age`` seconds."""
        removed = 0
        limit = time.time() - max_age
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < limit:
                    os.unlink(path)
                    removed += 1
        return removed


# -- messages as header + body blobs ------------------------------------------------------------


def ref_parts(ref: str, size: int) -> list[tuple[str, int]]:
    """The parts of a message reference, in message order, as (digest, logical size), for a
    message of ``size`` bytes: ``[(header, n), (body, size - n)]`` for
    ``<header digest>:<n>+<body digest>``, ``[(whole, size)]`` for one digest. ValueError when
    the reference is malformed."""
    parts = ref.split(PART_SEP)
    if len(parts) == 1:
        return [(check_digest(parts[0]), size)]
    head, sep, head_size = parts[0].partition(":")
    if len(parts) != 2 or not sep or not head_size.isdigit() or int(head_size) > size:
        raise ValueError(f"not a message reference: {ref!r}")
    return [(check_digest(head), int(head_size)), (check_digest(parts[1]), size - int(head_size))]


def split_ref(ref: str) -> list[str]:
    """The blob digests of a message reference, in message order (``ref_parts``)."""
    return [digest for digest, _size in ref_parts(ref, 1 << 62)]


def _read_up_to(src: BinaryIO, n: int) -> bytes:
    """``n`` bytes of ``src``, fewer only at its end (a stream may return short reads)."""
    out = bytearray()
    while len(out) < n:
        chunk = src.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class _Prefixed:
    """A binary reader of ``head`` then the rest of ``src`` (a header already read)."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        self._head = head
        self._src = src

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0 or size >= len(self._head):
                head, self._head = self._head, b""
                rest = self._src.read(-1 if size < 0 else size - len(head))
                return head + rest
            head, self._head = self._head[:size], self._head[size:]
            return head
        return self._src.read(size)


def read_header(src: BinaryIO, limit: int = HEADER_MAX) -> tuple[bytes, bool]:
    """Read ``src`` up to and including the blank line ending the header block. Returns
    (bytes read, True) when that line was found, (bytes read, False) at end of file or once
    more than ``limit`` bytes were read without finding it."""
    header = bytearray()
    while len(header) <= limit:
        line = src.readline(limit + 1 - len(header))
        if not line:
            return bytes(header), False
        header += line
        if line in (b"\r\n", b"\n"):
            return bytes(header), True
    return bytes(header), False


def put_message(blobs: Any, src: BinaryIO) -> tuple[str, int]:
    """Store the message read from ``src`` into ``blobs`` (an ``IBlobStore``) as a header
    blob and a body blob (each deduplicated on its own); a message without a body (or with a
    header block over ``HEADER_MAX``) as one blob. Returns (message reference, logical
    size). OSError as ``put``."""
    header, found = read_header(src, HEADER_MAX)
    first = src.read(CHUNK) if found else b""
    if not found or not first:
        whole = blobs.put(_Prefixed(header + first, src))
        return whole.digest, whole.size
    head = blobs.put(header)
    body = blobs.put(_Prefixed(first, src))
    return f"{head.digest}:{head.size}{PART_SEP}{body.digest}", head.size + body.size


class _Concat(io.RawIOBase):
    """A read-only raw stream over several binary files, one after the other."""

    def __init__(self, files: list[IO[bytes]]) -> None:
        self._files = files
        self._index = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._index < len(self._files):
            data = self._files[self._index].read(len(view))
            if data:
                view[: len(data)] = data
                return len(data)
            self._index += 1
        return 0

    def close(self) -> None:
        for fh in self._files:
            fh.close()
        super().close()


def open_message(blobs: Any, ref: str) -> BinaryIO:
    """A binary file of the message ``ref`` (its parts concatenated, each verified before
    this returns). BlobNotFound/BlobCorrupt as ``open``; ValueError for a bad reference."""
    parts = split_ref(ref)
    if len(parts) == 1:
        return cast(BinaryIO, blobs.open(parts[0]))
    files: list[IO[bytes]] = []
    try:
        for part in parts:
            files.append(cast(IO[bytes], blobs.open(part)))
    except BaseException:
        for fh in files:
            fh.close()
        raise
    return cast(BinaryIO, io.BufferedReader(_Concat(files), CHUNK))
