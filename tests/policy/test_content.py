"""Content facts for the rules: file types by magic bytes, zip listings (nested, encrypted,
damaged, bounded), the DLP number checks, and the bounded MIME scan."""

from __future__ import annotations

import io
import zipfile

import pytest

from mailgw.policy.content import (
    Attachment,
    ContentLimits,
    card_numbers,
    cn_id_numbers,
    cn_id_valid,
    content_facts,
    luhn_valid,
)
from mailgw.policy.filetypes import sniff, zip_members


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"MZ\x90\x00", "exe"),
        (b"\x7fELF\x02", "elf"),
        (b"\xcf\xfa\xed\xfe", "macho"),
        (b"#!/bin/sh\n", "script"),
        (b"Rar!\x1a\x07\x00", "rar"),
        (b"7z\xbc\xaf\x27\x1c", "7z"),
        (b"\x1f\x8b\x08", "gzip"),
        (b"BZh91AY", "bzip2"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"MSCF\0\0", "cab"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
        (b"%PDF-1.7", "pdf"),
        (b"{\\rtf1", "rtf"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"GIF89a", "gif"),
        (b"BM6\0", "bmp"),
        (b"II*\x00", "tiff"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "webp"),
        (b"\0" * 0x8001 + b"CD001", "iso"),
        (b"  <!DOCTYPE html><html>", "html"),
        (b"just text", "unknown"),
        (b"", "unknown"),
    ],
)
def test_sniff(data: bytes, kind: str) -> None:
    assert sniff(data) == kind


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def test_zip_kinds_and_members() -> None:
    assert sniff(make_zip({"a.txt": b"x"})) == "zip"
    assert sniff(make_zip({"[Content_Types].xml": b"<x/>"})) == "ooxml"
    assert sniff(make_zip({"META-INF/MANIFEST.MF": b"M"})) == "jar"
    listing = zip_members(
        make_zip({"x.exe": b"MZ" + b"\0" * 50, "n.txt": b"hi"}, zipfile.ZIP_STORED)
    )
    assert [(m.name, m.type, m.encrypted) for m in listing.members] == [
        ("x.exe", "exe", False),
        ("n.txt", "unknown", False),
    ]
    assert not listing.damaged and not listing.truncated and not listing.encrypted


def test_nested_zips_are_bounded() -> None:
    inner = make_zip({"bin/tool": b"\x7fELF" + b"\0" * 20})
    middle = make_zip({"inner.zip": inner})
    outer = make_zip({"middle.zip": middle})
    names = {m.name: m.type for m in zip_members(outer, max_depth=3).members}
    assert names == {
        "middle.zip": "zip",
        "middle.zip/inner.zip": "zip",
        "middle.zip/inner.zip/bin/tool": "elf",
    }
    shallow = zip_members(outer, max_depth=1)
    assert [m.name for m in shallow.members] == ["middle.zip"] and shallow.truncated
    many = make_zip({f"f{i}.txt": b"x" for i in range(50)})
    capped = zip_members(many, max_members=10)
    assert len(capped.members) == 10 and capped.truncated


def test_damaged_zips() -> None:
    z = make_zip({"a.exe": b"MZ" + b"\0" * 50, "b.txt": b"x"}, zipfile.ZIP_STORED)
    cut = z[: len(z) // 2]  # no central directory: the local headers are read
    listing = zip_members(cut)
    assert listing.damaged and listing.members and listing.members[0].type == "exe"
    garbage = zip_members(b"PK\x03\x04" + b"\xff" * 10)
    assert garbage.damaged
    broken = bytearray(z)
    pos = broken.find(b"PK\x01\x02")
    broken[pos : pos + 4] = b"XXXX"
    assert zip_members(bytes(broken)).damaged


def test_encryption_flags() -> None:
    z = bytearray(make_zip({"s.txt": b"secret"}))
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        z[z.find(sig) + offset] |= 1
    listing = zip_members(bytes(z))
    assert listing.encrypted and listing.members[0].type == "unknown"


def test_cn_id_and_cards() -> None:
    assert cn_id_valid("11010519491231002X") and cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021")
    assert not cn_id_valid("1101051949123100")
    assert cn_id_numbers("a 11010519491231002X b 110105194912310021 c") == ["11010519491231002X"]
    assert cn_id_numbers("911010519491231002X9") == []  # part of a longer number
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    found = card_numbers("4111-1111-1111-1111, 5500 0000 0000 0004 and 0000000000000000")
    assert found == ["4111111111111111", "5500000000000004"]
    assert card_numbers("order 123456789012") == []  # 12 digits


def test_content_facts_bounds() -> None:
    msg = (
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-A: 1\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello text\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="A.B.Exe"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n"
    )
    f = content_facts(msg)
    assert f.subject == "café" and ("x-a", "1") in f.headers
    assert f.text.strip() == "hello text"
    [a] = f.attachments
    assert (a.name, a.extension, a.type) == ("A.B.Exe", "exe", "exe")
    assert not f.mime_truncated and not f.scan_truncated
    small = content_facts(msg, ContentLimits(max_scan=100, max_text=3))
    assert small.scan_truncated and small.size == len(msg)
    assert Attachment("dir/file", "x/y", "unknown").extension == ""
    assert Attachment("c:\\x\\y.TXT", "x/y", "unknown").extension == "txt"
