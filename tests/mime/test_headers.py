"""RFC 2047 decoding, MIME parameters and RFC 2231, charsets."""

from __future__ import annotations

import base64

import pytest

from mailgw.mime import decode_bytes, decode_header_value, parse_address_list
from mailgw.mime.headers import (
    decode_param,
    lookup_codec,
    merge_rfc2231,
    parse_content_type,
    parse_disposition,
    parse_header_block,
    unfold,
)


def _b(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"plain ascii", "plain ascii"),
        (b"=?utf-8?q?caf=C3=A9?=", "café"),
        (b"=?UTF-8?Q?a_b?= =?utf-8?q?c?=", "a bc"),
        (b"=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),
        (b"Re: =?iso-8859-1?q?Gr=FC=DFe?= from =?utf-8?b?w6k=?= !", "Re: Grüße from é !"),
        (b"=?utf-8?b?5pc=?= =?utf-8?b?" + _b(b"\xa5\xe6\x9c\xac") + b"?=", "日本"),
        (b"=?utf-8?b?w6k?=", "é"),
        (b"=?utf-8*en?q?hi?=", "hi"),
        (b"=?gb2312?b?" + _b("中文".encode("gb2312")) + b"?=", "中文"),
        (b"=?bogus-charset?q?abc?=", "abc"),
        (b"=?utf-8?q?unterminated", "=?utf-8?q?unterminated"),
        (b"=?utf-8?x?not-an-encoding?=", "=?utf-8?x?not-an-encoding?="),
        (b"=?utf-8?b?" + _b(b"\xff") + b"?=", "\ufffd"),
        ("Grüße".encode(), "Grüße"),
        (b"Gr\xfc\xdfe", "Grüße"),
        (b"word=?utf-8?q?x?=word", "wordxword"),
        (b"=?utf-8?q?a?= plain =?iso-8859-1?q?=E9?=", "a plain é"),
    ],
)
def test_decode_header_value(value: bytes, expected: str) -> None:
    assert decode_header_value(value) == expected


def test_decode_bytes_and_codecs() -> None:
    assert decode_bytes(b"\xe9t\xe9", "iso-8859-1") == "été"
    assert decode_bytes("été".encode(), "us-ascii") == "été"
    assert decode_bytes(b"\xe9t\xe9", "no-such-charset") == "été"
    assert decode_bytes(b"\x82\xa0", "shift_jis") == "あ"
    assert decode_bytes(b"\xff\xfe", "shift_jis") == "\ufffd\ufffd"
    assert lookup_codec('"ISO-8859-1"') == "iso8859-1"
    assert lookup_codec("ks_c_5601-1987") == "cp949"
    assert lookup_codec("US-ASCII") == "ascii"
    assert lookup_codec("x-nothing") is None
    assert lookup_codec("\x00") is None


def test_unfold() -> None:
    assert unfold(b" a\r\n\tb\n c\r\n") == b"a\tb c"
    assert unfold(b"  x  ") == b"x"


def test_parse_content_type_forms() -> None:
    assert parse_content_type(b' text/plain ; charset="utf-8" (comment) ; format=flowed') == (
        b"text",
        b"plain",
        [(b"charset", b"utf-8"), (b"format", b"flowed")],
    )
    assert parse_content_type(b'text/plain; name="a \\"q\\" b"') == (
        b"text",
        b"plain",
        [(b"name", b'a "q" b')],
    )
    # duplicates: first wins; junk and valueless parameters are skipped
    assert parse_content_type(b"a/b; x=1; X=2; junk; y; =3; z=unquoted value") == (
        b"a",
        b"b",
        [(b"x", b"1"), (b"z", b"unquoted value")],
    )
    assert parse_content_type(b"text (comment (nested)) / html") == (b"text", b"html", [])
    assert parse_content_type(b'a/b; n="unclosed') == (b"a", b"b", [(b"n", b"unclosed")])
    assert parse_content_type(b"a/b garbage; n=1") == (b"a", b"b", [(b"n", b"1")])
    assert parse_content_type(b"a/b; n=1 x") == (b"a", b"b", [(b"n", b"1 x")])
    assert parse_content_type(b"") is None


def test_rfc2231_merging() -> None:
    params = [
        (b"title*2", b"c"),
        (b"title*0", b"a"),
        (b"title*1", b"b"),
        (b"gap*0", b"x"),
        (b"gap*2", b"z"),
        (b"plain", b"p"),
        (b"plain*", b"utf-8''ignored"),
        (b"big*1000", b"ignored"),
        (b"bad*x", b"ignored"),
        (b"ext*0*", b"utf-8'en'%C3%A9"),
        (b"ext*1", b"t e"),
    ]
    assert merge_rfc2231(params) == [
        (b"title", b"abc"),
        (b"gap", b"x"),
        (b"plain", b"p"),
        (b"ext*", b"utf-8'en'%C3%A9t%20e"),
    ]
    assert decode_param(b"ext*", b"utf-8'en'%C3%A9t%20e") == (b"ext", "ét e")
    assert decode_param(b"Name*", b"no-quotes%21") == (b"name", "no-quotes!")
    assert decode_param(b"NAME", b"=?utf-8?q?x=C3=A9?=") == (b"name", "xé")
    # an unencoded first segment of an extended value gets an empty charset prefix
    assert merge_rfc2231([(b"n*0", b"a b"), (b"n*1*", b"%41")]) == [(b"n*", b"''a%20b%41")]


def test_address_list_forms() -> None:
    items = parse_address_list(
        b'"Last, First" <first@x.org>, plain@y.org (Comment Name), '
        b"Group: a@g.org, <b@g.org>;, =?utf-8?q?J=C3=B6rg?= <j@z.org>, "
        b'"quoted local"@q.org, <@r1,@r2:routed@r.org>, @only-domain, <>, '
        b"first.last @ example.com, [broken, nodomain, Unclosed: u@u.org"
    )
    got = [(i.name, i.mailbox, i.host) for i in items]
    assert got == [
        (b"Last, First", b"first", b"x.org"),
        (b"Comment Name", b"plain", b"y.org"),
        (None, b"Group", None),
        (None, b"a", b"g.org"),
        (None, b"b", b"g.org"),
        (None, None, None),
        (b"=?utf-8?q?J=C3=B6rg?=", b"j", b"z.org"),
        (None, b"quoted local", b"q.org"),
        (None, b"routed", b"r.org"),
        (None, b"MISSING_MAILBOX", b"only-domain"),
        (None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"),
        (None, b"first.last", b"example.com"),
        (None, b"[broken, nodomain, Unclosed: u@u.org", b"MISSING_DOMAIN"),
    ]
    assert items[2].is_group_start and items[5].is_group_end
    assert not items[0].is_group_start and not items[0].is_group_end
    assert parse_address_list(b"") == []
    assert parse_address_list(b" , ,, ") == []


def test_address_list_unclosed_group_and_limits() -> None:
    items = parse_address_list(b"team: a@b.c, d@e.f")
    assert [i.mailbox for i in items] == [b"team", b"a", b"d", None]
    many = b", ".join(b"u%d@x.org" % i for i in range(50))
    assert len(parse_address_list(many, max_items=10)) == 10
    nested = parse_address_list(b"a@b.c (one (two) three), x@y.z ((unclosed comment")
    assert [(i.name, i.mailbox) for i in nested] == [
        (b"one (two) three", b"a"),
        (b"(unclosed comment", b"x"),
    ]
    names = parse_address_list(b'Mr. John Q. Public <jqp@x.org>, "a\\"b" <c@d.e>')
    assert [i.name for i in names] == [b"Mr. John Q. Public", b'a"b']


def test_malformed_base64_word_stays_literal_and_dispositions() -> None:
    assert decode_header_value(b"=?utf-8?b?abcde?= x") == "=?utf-8?b?abcde?= x"
    assert parse_disposition(b"  ; filename=x") is None
    assert parse_disposition(b'attachment (a \\) b); filename="a\\\\b"') == (
        b"attachment",
        [(b"filename", b"a\\b")],
    )


def test_header_block_records_lines_that_are_not_fields() -> None:
    raw = b"From: a@x\r\nno colon\r\n\tcontinued\r\nbad name: y\r\nTo: b@x\r\n\r\nbody\r\n"
    block = parse_header_block(raw, 0, len(raw), 100)
    assert [f.name for f in block.fields] == [b"From", b"To"]
    assert [raw[o : raw.index(b"\r\n", o)] for o in block.malformed] == [
        b"no colon",
        b"\tcontinued",
        b"bad name: y",
    ]
    assert raw[block.body_start :] == b"body\r\n"
    clean = b"From: a@x\r\n\tfolded\r\nTo: b@x\r\n\r\n"
    assert parse_header_block(clean, 0, len(clean), 100).malformed == []
