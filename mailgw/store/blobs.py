"""Tier-2 blob store: content-addressed (sha256), zstandard-compressed files ``ab/cd/<hash>.zst``.

A blob is named by the sha256 of the bytes it holds, so identical bytes are stored once. A
message is stored as two blobs, its header block (up to and including the blank line that ends
it) and its body (``put_message``): copies of one announcement delivered over SMTP differ in
their trace headers (Return-Path, Delivered-To, Received) but share the body blob. The
index refers to a message by ``<header digest>:<header size>+<body digest>``, or by one
digest for a message kept whole (no body, a header block over ``HEADER_MAX``, or migrated
before the split); reads concatenate the parts (``open_message``). The directory can sit on
another, larger and slower mount. Writes go to ``tmp/``, are fsynced, renamed into place
and the directory is fsynced; a blob is never modified in place. Every read recomputes the
hash: a damaged blob raises ``BlobCorrupt`` and never returns wrong bytes. The interface
(put/get/open/exists/delete/iter_refs/stat) is small enough for an object store later.
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

SUFFIX = ".zst"
CHUNK = 1 << 20
# Reads of blobs up to this size stay in memory; larger ones spill to a temporary file.
SPOOL_MAX = 8 << 20
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A header block longer than this (no blank line found) is not split: the message stays whole.
HEADER_MAX = 1 << 20
# Separates the part digests of a message reference.
PART_SEP = "+"


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
    """Blobs in a directory tree ``root/ab/cd/<sha256>.zst`` (zstd frames with checksum)."""

    def __init__(self, root: str, level: int = 6) -> None:
        self.root = os.path.abspath(root)
        self.level = level
        os.makedirs(os.path.join(self.root, "tmp"), mode=0o700, exist_ok=True)

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
        return os.path.exists(self.path(ref))

    def stat(self, ref: BlobRef | str) -> tuple[int, float]:
        """(bytes on disk, mtime). BlobNotFound when missing."""
        try:
            st = os.stat(self.path(ref))
        except FileNotFoundError:
            raise BlobNotFound(check_digest(ref)) from None
        return st.st_size, st.st_mtime

    def delete(self, ref: BlobRef | str) -> bool:
        """Remove a blob; False when it did not exist."""
        path = self.path(ref)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        maildir.fsync_dir(os.path.dirname(path))
        return True

    def iter_refs(self) -> Iterator[str]:
        """The digests of all stored blobs (any order)."""
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
