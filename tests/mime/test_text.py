"""Decoded views: header values, addresses, dates, text parts; and the structure cache."""

from __future__ import annotations

import base64
import calendar

import pytest

from mailgw.mime import (
    StructureCache,
    addresses,
    date,
    decode_transfer,
    header_values,
    parse,
    parse_date,
    text_parts,
)
from tests.mime.fixtures import FORWARDED, MIXED_ALTERNATIVE, crlf

T1996 = calendar.timegm((1996, 7, 17, 9, 23, 25, 0, 0, 0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)", T1996),
        (b"17 Jul 96 02:23:25 PDT", T1996),
        ("Wed, 17 Jul 1996 09:23:25 Z", T1996),
        (b"Wed, 17 Jul 1996 09:23:25 +0000 (comment (nested))", T1996),
        (b"Wed , 17 Jul 1996  09:23:25   GMT", T1996),
        (b"Wed, 17 Jul 1996 09:23 GMT", T1996 - 25),
        (b"Wed, 17 Jul 1996 09:23:25", T1996),
        (b"1 Jan 70 00:00:00 +0000", 0.0),
        (b"1 Jan 49 00:00:00 +0000", calendar.timegm((2049, 1, 1, 0, 0, 0, 0, 0, 0))),
        (b"Thu, 1 Jan 2026 12:00:60 +0100", calendar.timegm((2026, 1, 1, 11, 0, 59, 0, 0, 0))),
        (b"", None),
        (b"(only a comment)", None),
        (b"not a date at all", None),
        (b"Wed, 32 Jul 1996 09:23:25 +0000", None),
        (b"Wed, 17 Jul 1996 25:00:00 +0000", None),
        (b"Wed, 17 Foo 1996 09:00:00 +0000", None),
        (b"1 Jan 99999999999 00:00:00 +0000", None),
    ],
)
def test_parse_date(value: bytes | str, expected: float | None) -> None:
    assert parse_date(value) == expected


def test_date_and_header_values() -> None:
    msg = parse(crlf("Date: Wed, 17 Jul 1996 02:23:25 -0700\nReceived: a\nReceived: b\n c\n\n"))
    assert date(msg) == T1996
    assert header_values(msg, "received") == [b"a", b"b c"]
    assert header_values(msg.root, b"X-None") == []
    assert date(parse(b"Subject: x\r\n\r\n")) is None


def test_addresses_decoded() -> None:
    msg = parse(MIXED_ALTERNATIVE)
    assert addresses(msg, "from") == [("Alice Müller", "alice", "example.com")]
    raw = crlf("To: Team: a@x.org, nodomain;, =?iso-8859-1?q?J=F6rg?= <j@y.org>\nTo: k@z.org\n\n")
    assert addresses(parse(raw), "To") == [
        ("", "a", "x.org"),
        ("", "nodomain", ""),
        ("Jörg", "j", "y.org"),
        ("", "k", "z.org"),
    ]


def test_text_parts_decode_transfer_and_charset() -> None:
    texts = [
        (p.content_type, t) for p, t in text_parts(parse(MIXED_ALTERNATIVE), MIXED_ALTERNATIVE)
    ]
    assert texts == [
        ("text/plain", "Grüße, Bob!\r\nSiehe Anhang."),
        ("text/html", "<p>Grüße, Bob!</p>"),
    ]
    inner = [t for _, t in text_parts(parse(FORWARDED), FORWARDED)]
    assert inner == ["See below.", "plain", "<b>html</b>"]


def test_text_parts_lenient_and_bounded() -> None:
    body = base64.b64encode("Grüße aus Köln".encode("iso-8859-1")).rstrip(b"=")
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: BASE64\r\n\r\n" + body + b"\r\n"
        b"--b\r\nContent-Type: text/plain; charset=x-unknown-thing\r\n\r\nna\xc3\xafve\r\n"
        b"--b\r\nContent-Type: image/png\r\n\r\nPNG\r\n--b--\r\n"
    )
    texts = [t for _, t in text_parts(parse(raw), raw)]
    assert texts == ["Grüße aus Köln", "naïve"]
    assert [t for _, t in text_parts(parse(raw), raw, max_bytes=4)] == ["Grüß", "naï"]


@pytest.mark.parametrize(
    ("data", "encoding", "expected"),
    [
        (b"aGVsbG8=", "base64", b"hello"),
        (b"aGVs\r\nbG8", b"Base64", b"hello"),
        (b"a GV*sbG8", "base64", b"hello"),
        (b"aGVsbG8=aGk=", "base64", b"hello"),
        (b"x", "base64", b""),
        (b"caf=C3=A9 =\r\nlong", "quoted-printable", "café long".encode()),
        (b"as is", "8bit", b"as is"),
        (b"begin 644 x", "x-uuencode", b"begin 644 x"),
    ],
)
def test_decode_transfer(data: bytes, encoding: bytes | str, expected: bytes) -> None:
    assert decode_transfer(data, encoding) == expected


def test_structure_cache_lru() -> None:
    cache = StructureCache(max_entries=2)
    a = cache.get_or_parse("a", b"Subject: a\r\n\r\n")
    assert cache.get_or_parse("a", b"ignored on a hit") is a
    cache.get_or_parse("b", b"Subject: b\r\n\r\n")
    assert cache.get("a") is a  # a is now most recently used
    cache.get_or_parse("c", b"Subject: c\r\n\r\n")
    assert "b" not in cache and "a" in cache and "c" in cache
    assert len(cache) == 2
    assert cache.get("b") is None
    assert (cache.hits, cache.misses) == (2, 4)
    cache.put("d", a)
    assert "a" not in cache
    cache.discard("d")
    cache.discard("never")
    assert "d" not in cache and len(cache) == 1
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        StructureCache(0)
