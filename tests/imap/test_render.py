"""BODYSTRUCTURE, ENVELOPE, section slices and IMAP string quoting."""

from __future__ import annotations

import pytest

from mailgw.imap.render import (
    Section,
    body_structure,
    envelope,
    header_fields,
    imap_string,
    parse_section,
    partial,
    section,
)
from mailgw.mime import parse
from tests.mime.fixtures import (
    FORWARDED,
    MIXED_ALTERNATIVE,
    RFC2231,
    crlf,
    rfc3501_multipart,
    rfc3501_sample,
)


def test_rfc3501_sample_envelope_and_body() -> None:
    raw = rfc3501_sample()
    msg = parse(raw)
    assert envelope(msg) == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        b'NIL NIL "<B27397-0100000@cac.washington.edu>")'
    )
    assert body_structure(msg, extended=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)'
    )
    assert body_structure(msg) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92 NIL NIL NIL NIL)'
    )


def test_rfc3501_multipart_example_round_trips() -> None:
    msg = parse(rfc3501_multipart())
    assert body_structure(msg, extended=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")'
    )
    assert body_structure(msg).endswith(
        b'"BASE64" 4554 73 NIL NIL NIL NIL) "MIXED" ("BOUNDARY" "----- =_aaaaaaaaaa0") NIL NIL NIL)'
    )


def test_mixed_alternative_attachment_bodystructure() -> None:
    msg = parse(MIXED_ALTERNATIVE)
    assert body_structure(msg) == (
        b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 36 2 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "8bit" 20 1 NIL NIL NIL NIL)'
        b' "alternative" ("boundary" "alt-1") NIL NIL NIL)'
        b'("application" "pdf" ("name" "q1.pdf") NIL NIL "base64" 16 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("attachment" ("filename" "q1.pdf" "size" "12")) '
        b'("de" "en") "http://example.com/reports/q1.pdf")'
        b' "mixed" ("boundary" "mixed-1") NIL NIL NIL)'
    )
    assert body_structure(msg, extended=False) == (
        b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 36 2)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "8bit" 20 1) "alternative")'
        b'("application" "pdf" ("name" "q1.pdf") NIL NIL "base64" 16) "mixed")'
    )


def test_envelope_keeps_encoded_words_raw() -> None:
    env = envelope(parse(MIXED_ALTERNATIVE))
    assert env == (
        b'("Tue, 3 Mar 2026 10:00:00 +0100" "=?UTF-8?B?UXVhcnRhbHNiZXJpY2h0?= Q1" '
        b'(("=?UTF-8?Q?Alice_M=C3=BCller?=" NIL "alice" "example.com")) '
        b'(("=?UTF-8?Q?Alice_M=C3=BCller?=" NIL "alice" "example.com")) '
        b'(("=?UTF-8?Q?Alice_M=C3=BCller?=" NIL "alice" "example.com")) '
        b'(("Bob" NIL "bob" "example.org")) NIL NIL NIL "<q1@example.com>")'
    )


def test_message_rfc822_attachment_with_multipart() -> None:
    msg = parse(FORWARDED)
    bs = body_structure(msg, extended=False)
    assert bs == (
        b'(("text" "plain" NIL NIL NIL "7bit" 10 1)'
        b'("message" "rfc822" NIL NIL "forwarded message" "7bit" 295 '
        b'(NIL "report" (("Eve" NIL "eve" "example.com")) (("Eve" NIL "eve" "example.com")) '
        b'(("Eve" NIL "eve" "example.com")) ((NIL NIL "carol" "example.net")) NIL NIL NIL '
        b'"<inner@example.com>") '
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 1)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 1) "alternative") 15) "mixed")'
    )
    assert section(msg, FORWARDED, "2.HEADER").startswith(b"From: Eve <eve@example.com>\r\n")
    assert section(msg, FORWARDED, "2.HEADER").endswith(b"boundary=inner\r\n\r\n")
    assert section(msg, FORWARDED, "2.TEXT").startswith(b"--inner\r\n")
    assert section(msg, FORWARDED, "2.1") == b"plain"
    assert section(msg, FORWARDED, "2.2") == b"<b>html</b>"
    assert (
        section(msg, FORWARDED, "2.2.MIME") == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    )
    assert section(msg, FORWARDED, "2.3") == b""
    assert section(msg, FORWARDED, "2.1.1") == b""
    assert section(msg, FORWARDED, "2.HEADER.FIELDS (subject)") == b"Subject: report\r\n\r\n"
    assert section(msg, FORWARDED, "2.MIME") == (
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded message\r\n\r\n"
    )
    # HEADER/TEXT of a part that is not message/rfc822 does not exist
    assert section(msg, FORWARDED, "1.HEADER") == b""
    assert section(msg, FORWARDED, "1.TEXT") == b""


def test_rfc2231_params_are_merged_for_imap() -> None:
    msg = parse(RFC2231)
    bs = body_structure(msg)
    assert (
        b'("application" "octet-stream" ("name*" "utf-8\'\'%E6%8A%A5%E5%91%8A%20Q1%2Etxt") '
        b'NIL NIL "7bit" 4 NIL ("attachment" ("filename*" "iso-8859-1\'de\'Gr%FC%DFe.txt")) NIL NIL)'
    ) in bs
    assert b'("text" "plain" ("name" "long name.txt") NIL NIL "7bit" 4 1 NIL ' in bs


def test_sections_of_a_single_part_message() -> None:
    raw = crlf("Subject: hi\nFrom: a@b\n\nline one\nline two\n")
    msg = parse(raw)
    assert section(msg, raw, "") is raw
    assert section(msg, raw, "HEADER") == b"Subject: hi\r\nFrom: a@b\r\n\r\n"
    assert section(msg, raw, "TEXT") == b"line one\r\nline two\r\n"
    assert section(msg, raw, "1") == b"line one\r\nline two\r\n"
    assert section(msg, raw, "1.MIME") == b"Subject: hi\r\nFrom: a@b\r\n\r\n"
    assert section(msg, raw, "2") == b""
    assert section(msg, raw, "1.1") == b""
    assert len(section(msg, raw, "HEADER")) + len(section(msg, raw, "TEXT")) == len(raw)


def test_header_fields_keep_order_case_and_folding() -> None:
    raw = crlf(
        "X-Custom: one\nsubject: Folded\n  continued\nFROM: a@b\nTo: c@d\nX-CUSTOM: two\n\nbody\n"
    )
    msg = parse(raw)
    assert section(msg, raw, 'HEADER.FIELDS (From "SUBJECT" x-custom)') == crlf(
        "X-Custom: one\nsubject: Folded\n  continued\nFROM: a@b\nX-CUSTOM: two\n\n"
    )
    assert section(msg, raw, "HEADER.FIELDS.NOT (subject x-custom)") == crlf(
        "FROM: a@b\nTo: c@d\n\n"
    )
    assert section(msg, raw, "header.fields (nothing)") == b"\r\n"
    assert header_fields(msg, raw, [b"TO"], exclude=False) == b"To: c@d\r\n\r\n"


def test_header_fields_of_header_without_final_newline() -> None:
    raw = b"Subject: no body"
    msg = parse(raw)
    assert section(msg, raw, "HEADER.FIELDS (SUBJECT)") == b"Subject: no body\r\n\r\n"
    assert section(msg, raw, "TEXT") == b""
    assert section(msg, raw, "HEADER") == raw


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", Section((), "")),
        ("header", Section((), "HEADER")),
        ("1.2.3", Section((1, 2, 3), "")),
        ("1.2.MIME", Section((1, 2), "MIME")),
        ("2.TEXT", Section((2,), "TEXT")),
        (b"HEADER.FIELDS (A b)", Section((), "HEADER.FIELDS", (b"A", b"B"))),
        ('4.HEADER.FIELDS.NOT ("X-A" x-b)', Section((4,), "HEADER.FIELDS.NOT", (b"X-A", b"X-B"))),
    ],
)
def test_parse_section(spec: str | bytes, expected: Section) -> None:
    assert parse_section(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "MIME",
        "0",
        "1.0",
        "1.",
        "FOO",
        "1.BAR",
        "HEADER.FIELDS",
        "HEADER.FIELDS ()",
        "HEADER.FIELDS (A",
        "HEADER.FIELDS (a (b))",
        "01",
    ],
)
def test_parse_section_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_section(spec)


def test_partial() -> None:
    assert partial(b"0123456789", 2, 3) == b"234"
    assert partial(b"0123456789", 8, 10) == b"89"
    assert partial(b"0123456789", 10, 1) == b""
    assert partial(b"0123456789", 4) == b"456789"
    with pytest.raises(ValueError):
        partial(b"x", -1, 1)
    with pytest.raises(ValueError):
        partial(b"x", 0, -1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"NIL"),
        (b"", b'""'),
        (b"plain", b'"plain"'),
        (b'say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
        (b"caf\xc3\xa9", b"{5}\r\ncaf\xc3\xa9"),
        (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        (b'""""""""""', b'{10}\r\n""""""""""'),
        (b"nul\x00byte", b'"nulbyte"'),
    ],
)
def test_imap_string(value: bytes | None, expected: bytes) -> None:
    assert imap_string(value) == expected


def test_raw_utf8_headers_pass_through_as_literals() -> None:
    raw = crlf(
        "From: Jürgen Groß <juergen@example.de>\n"
        "To: 田中 <tanaka@example.jp>\n"
        "Subject: Grüße aus München\n"
        'Content-Type: text/plain; charset=utf-8; name="bericht_ü.txt"\n'
        "\n"
        "Hallo\n"
    )
    msg = parse(raw)
    env = envelope(msg)
    subject = "Grüße aus München".encode()
    assert b"{%d}\r\n%s" % (len(subject), subject) in env
    name = "Jürgen Groß".encode()
    assert b'(({%d}\r\n%s NIL "juergen" "example.de"))' % (len(name), name) in env
    assert "{6}\r\n田中".encode() in env
    name_param = "bericht_ü.txt".encode()
    assert b'"name" {%d}\r\n%s)' % (len(name_param), name_param) in body_structure(msg)


def test_envelope_groups_defaults_and_nil() -> None:
    raw = crlf(
        'From: "Doe, John" <john@example.com>\n'
        "Sender: \n"
        "Reply-To: replies@example.com\n"
        "To: undisclosed-recipients:;\n"
        'Cc: Team: ann@example.com, "Bob B" <bob@example.com>; , carl@example.com (Carl C)\n'
        "Bcc: <@relay.example:hidden@example.com>, broken\n"
        "In-Reply-To: <parent@example.com>\n"
        "\n"
    )
    env = envelope(parse(raw))
    assert env == (
        b'(NIL NIL (("Doe, John" NIL "john" "example.com")) '
        b'(("Doe, John" NIL "john" "example.com")) '
        b'((NIL NIL "replies" "example.com")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'((NIL NIL "Team" NIL)(NIL NIL "ann" "example.com")("Bob B" NIL "bob" "example.com")'
        b'(NIL NIL NIL NIL)("Carl C" NIL "carl" "example.com")) '
        b'((NIL "@relay.example" "hidden" "example.com")(NIL NIL "broken" "MISSING_DOMAIN")) '
        b'"<parent@example.com>" NIL)'
    )


def test_envelope_of_empty_message() -> None:
    assert envelope(parse(b"")) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert body_structure(parse(b"")) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
    )


def test_folded_subject_is_unfolded_not_a_literal() -> None:
    raw = crlf("Subject: a long\n subject line\n\nx")
    assert envelope(parse(raw)).startswith(b'(NIL "a long subject line" ')


def test_body_size_equals_stored_slices() -> None:
    for raw in (MIXED_ALTERNATIVE, FORWARDED, RFC2231, rfc3501_multipart()):
        msg = parse(raw)
        for part in msg.walk():
            assert part.size == len(raw[part.body_start : part.end])
        assert section(msg, raw, "HEADER") + section(msg, raw, "TEXT") == raw
