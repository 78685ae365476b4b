"""The real type of an attachment by its first bytes (magic numbers), and what a zip holds.

``sniff(data)`` names the type of a file from its start: ``exe`` (MZ: Windows programs and
DLLs), ``elf``, ``macho``, ``script`` (``#!``), ``zip``, ``ooxml`` (a zip holding
``[Content_Types].xml``: docx, xlsx, pptx), ``jar``, ``rar``, ``7z``, ``gzip``, ``bzip2``,
``xz``, ``cab``, ``ole`` (old Office, MSI), ``pdf``, ``rtf``, ``png``, ``jpeg``, ``gif``,
``bmp``, ``tiff``, ``webp``, ``iso``, ``html``; else ``unknown``.

``zip_members(data)`` reads a zip archive's central directory without extracting anything
big: each member's name, whether it is encrypted (general-purpose flag bit 0, or the
strong-encryption bit 6, or AES method 99), and, when it is stored or deflated and not
encrypted, the type of its first bytes (at most ``MEMBER_HEAD`` bytes decompressed).
Archives inside archives are looked into down to ``max_depth``. Bounded: at most
``max_members`` members; a damaged archive gives what could be read (``damaged``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MEMBER_HEAD = 4096
"""Bytes of a zip member decompressed to sniff its type."""

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"MZ", 0, "exe"),
    (b"\x7fELF", 0, "elf"),
    (b"\xfe\xed\xfa\xce", 0, "macho"),
    (b"\xfe\xed\xfa\xcf", 0, "macho"),
    (b"\xce\xfa\xed\xfe", 0, "macho"),
    (b"\xcf\xfa\xed\xfe", 0, "macho"),
    (b"\xca\xfe\xba\xbe", 0, "macho"),
    (b"#!", 0, "script"),
    (b"Rar!\x1a\x07", 0, "rar"),
    (b"7z\xbc\xaf\x27\x1c", 0, "7z"),
    (b"\x1f\x8b", 0, "gzip"),
    (b"BZh", 0, "bzip2"),
    (b"\xfd7zXZ\x00", 0, "xz"),
    (b"MSCF", 0, "cab"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", 0, "ole"),
    (b"%PDF-", 0, "pdf"),
    (b"{\\rtf", 0, "rtf"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"CD001", 0x8001, "iso"),
)

TYPES = frozenset(
    {t for _, _, t in _MAGIC} | {"zip", "ooxml", "jar", "webp", "html", "unknown", "encrypted"}
)
"""Every type name ``sniff`` gives (and ``encrypted``, for encrypted zip members)."""

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_EMPTY = b"PK\x05\x06"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"


def sniff(data: bytes) -> str:
    """The type name of a file starting with ``data`` (see the module docstring)."""
    if data.startswith((_ZIP_LOCAL, _ZIP_EMPTY)):
        return _zip_kind(data)
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<script")):
        return "html"
    return "unknown"


def _zip_kind(data: bytes) -> str:
    window = data[: MEMBER_HEAD * 16]
    if b"[Content_Types].xml" in window:
        return "ooxml"
    if b"META-INF/MANIFEST.MF" in window:
        return "jar"
    return "zip"


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One member of a zip archive (``path``: archive names joined with ``/``)."""

    name: str
    encrypted: bool
    type: str
    """Its sniffed type; ``unknown`` when it could not be read (encrypted, other method)."""


@dataclass(frozen=True, slots=True)
class ZipListing:
    members: tuple[ZipMember, ...]
    damaged: bool
    truncated: bool
    """More members than ``max_members`` (or nesting deeper than ``max_depth``)."""

    @property
    def encrypted(self) -> bool:
        return any(m.encrypted for m in self.members)


def zip_members(data: bytes, max_members: int = 1000, max_depth: int = 2) -> ZipListing:
    """The members of the zip archive ``data`` (see the module docstring)."""
    out: list[ZipMember] = []
    state = {"damaged": False, "truncated": False}
    _walk_zip(data, "", out, state, max_members, max_depth)
    return ZipListing(tuple(out), state["damaged"], state["truncated"])


def _walk_zip(
    data: bytes,
    prefix: str,
    out: list[ZipMember],
    state: dict[str, bool],
    max_members: int,
    depth: int,
) -> None:
    entries = _central_directory(data, state)
    for name, flags, method, csize, local_offset in entries:
        if len(out) >= max_members:
            state["truncated"] = True
            return
        encrypted = bool(flags & 0x41) or method == 99
        kind = "unknown"
        head = b""
        if not encrypted:
            head = _member_head(data, local_offset, method, csize, state)
            if head:
                kind = sniff(head)
        full = prefix + name
        out.append(ZipMember(full, encrypted, kind))
        if kind in ("zip", "ooxml", "jar") and not encrypted:
            if depth <= 1:
                state["truncated"] = True
                continue
            inner = _member_data(data, local_offset, method, csize, state)
            if inner:
                _walk_zip(inner, full + "/", out, state, max_members, depth - 1)


def _central_directory(data: bytes, state: dict[str, bool]) -> list[tuple[str, int, int, int, int]]:
    """(name, flags, method, compressed size, local header offset) of each entry."""
    end = data.rfind(_ZIP_END, max(0, len(data) - 65_557))
    if end < 0 or end + 22 > len(data):
        state["damaged"] = True
        return _scan_local_headers(data, state)
    count, size, offset = struct.unpack_from("<HII", data, end + 10)
    entries = []
    pos = offset
    for _ in range(count):
        if data[pos : pos + 4] != _ZIP_CENTRAL or pos + 46 > len(data):
            state["damaged"] = True
            break
        (flags, method) = struct.unpack_from("<HH", data, pos + 8)
        (csize,) = struct.unpack_from("<I", data, pos + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        (local,) = struct.unpack_from("<I", data, pos + 42)
        raw_name = data[pos + 46 : pos + 46 + name_len]
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        entries.append((name, flags, method, csize, local))
        pos += 46 + name_len + extra_len + comment_len
    return entries


def _scan_local_headers(
    data: bytes, state: dict[str, bool]
) -> list[tuple[str, int, int, int, int]]:
    """Without a central directory (a cut archive): the local headers, in order."""
    entries: list[tuple[str, int, int, int, int]] = []
    pos = data.find(_ZIP_LOCAL)
    while pos >= 0 and pos + 30 <= len(data) and len(entries) < 100_000:
        flags, method = struct.unpack_from("<HH", data, pos + 6)
        (csize,) = struct.unpack_from("<I", data, pos + 18)
        name_len, extra_len = struct.unpack_from("<HH", data, pos + 26)
        name = data[pos + 30 : pos + 30 + name_len].decode("utf-8", "replace")
        entries.append((name, flags, method, csize, pos))
        pos = data.find(_ZIP_LOCAL, pos + 30 + name_len + extra_len + (csize if csize else 0))
    return entries


def _member_start(data: bytes, local: int, state: dict[str, bool]) -> int:
    if data[local : local + 4] != _ZIP_LOCAL or local + 30 > len(data):
        state["damaged"] = True
        return -1
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    return local + 30 + int(name_len) + int(extra_len)


def _member_head(data: bytes, local: int, method: int, csize: int, state: dict[str, bool]) -> bytes:
    start = _member_start(data, local, state)
    if start < 0:
        return b""
    raw = data[start : start + (csize or len(data) - start)]
    if method == 0:
        return raw[:MEMBER_HEAD]
    if method == 8:
        try:
            return zlib.decompressobj(-15).decompress(raw[: MEMBER_HEAD * 64], MEMBER_HEAD)
        except zlib.error:
            state["damaged"] = True
    return b""


_INNER_LIMIT = 32 * 1024 * 1024
"""Largest nested archive decompressed to look inside (a bigger one is not opened)."""


def _member_data(data: bytes, local: int, method: int, csize: int, state: dict[str, bool]) -> bytes:
    start = _member_start(data, local, state)
    if start < 0:
        return b""
    raw = data[start : start + csize]
    if method == 0:
        return raw
    if method == 8:
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(raw, _INNER_LIMIT)
            if d.unconsumed_tail:
                state["truncated"] = True
                return b""
            return out
        except zlib.error:
            state["damaged"] = True
    return b""
