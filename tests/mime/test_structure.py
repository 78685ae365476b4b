"""The part tree: boundaries, defaults, malformed input, offsets."""

from __future__ import annotations

from mailgw.imap.render import body_structure, section
from mailgw.mime import Limits, find_part, parse
from tests.mime.fixtures import FORWARDED, MIXED_ALTERNATIVE, RFC2231, crlf


def test_tree_shape_and_offsets() -> None:
    msg = parse(MIXED_ALTERNATIVE)
    root = msg.root
    assert msg.size == len(MIXED_ALTERNATIVE)
    assert msg.part_count == 5
    assert not msg.truncated
    assert [p.content_type for p in msg.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]
    alt, pdf = root.parts
    assert MIXED_ALTERNATIVE[alt.start : alt.body_start] == (
        b'Content-Type: multipart/alternative; boundary="alt-1"\r\n\r\n'
    )
    assert pdf.filename == "q1.pdf"
    assert pdf.disposition == b"attachment"
    assert pdf.disposition_param("size") == "12"
    assert pdf.language == [b"de", b"en"]
    assert pdf.location == b"http://example.com/reports/q1.pdf"
    assert pdf.md5 == b"Q2hlY2sgSW50ZWdyaXR5IQ=="
    assert alt.parts[0].charset == "utf-8"
    assert alt.parts[0].encoding == b"quoted-printable"
    assert find_part(msg, [1, 2]) is alt.parts[1]
    assert find_part(msg, [3]) is None
    assert find_part(msg, [2, 1]) is None
    assert msg.header("message-id") == b"<q1@example.com>"
    assert root.header("X-Missing") is None
    assert "multipart/mixed" in repr(msg)


def test_message_rfc822_is_parsed() -> None:
    msg = parse(FORWARDED)
    fwd = msg.root.parts[1]
    assert fwd.message is not None
    assert fwd.message.start == fwd.body_start and fwd.message.end == fwd.end
    assert fwd.message.header("subject") == b"report"
    assert [p.content_type for p in fwd.message.parts] == ["text/plain", "text/html"]
    assert fwd.description == b"forwarded message"


def test_rfc2231_decoded_names() -> None:
    msg = parse(RFC2231)
    a, b = msg.root.parts
    assert a.param("name") == "报告 Q1.txt"
    assert a.filename == "Grüße.txt"
    assert b.param("name") == "long name.txt"
    assert b.filename == "äöü.txt"
    assert b.param("missing") is None


def test_missing_close_delimiter_and_trailing_whitespace() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=zz\n\n"
        "--zz  \t\n"
        "Content-Type: text/plain\n\none\n"
        "--zz\n"
        "\ntwo\n"
    )
    msg = parse(raw)
    assert [section(msg, raw, n) for n in ("1", "2")] == [b"one", b"two\r\n"]
    assert msg.root.parts[1].fields == []


def test_longer_boundary_is_not_ours() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=abc\n\n"
        "--abc\n\nfirst\n--abcdef\nstill first\n"
        "--abc--\n"
    )
    msg = parse(raw)
    assert section(msg, raw, "1") == b"first\r\n--abcdef\r\nstill first"
    assert len(msg.root.parts) == 1


def test_nested_multipart_missing_its_close_delimiter() -> None:
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=outer\n\n"
        "--outer\n"
        "Content-Type: multipart/alternative; boundary=inner\n\n"
        "--inner\n\nA\n"
        "--outer\n"
        "Content-Type: text/plain\n\nB\n"
        "--outer--\n"
    )
    msg = parse(raw)
    assert section(msg, raw, "1.1") == b"A"
    assert section(msg, raw, "2") == b"B"


def test_bare_lf_message() -> None:
    raw = (
        b"From: a@example.com\nSubject: lf\nContent-Type: multipart/mixed; boundary=q\n\n"
        b"--q\nContent-Type: text/plain\n\nhello\nworld\n--q--\n"
    )
    msg = parse(raw)
    assert msg.header("subject") == b"lf"
    assert section(msg, raw, "1") == b"hello\nworld"
    assert section(msg, raw, "1.MIME") == b"Content-Type: text/plain\n\n"
    assert msg.root.parts[0].lines == 2
    assert section(msg, raw, "HEADER.FIELDS (SUBJECT)") == b"Subject: lf\n\r\n"


def test_multipart_without_boundary_falls_back_to_text() -> None:
    raw = crlf("Content-Type: multipart/mixed\n\nsome text\n")
    assert body_structure(parse(raw), extended=False) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 1)'
    )
    raw2 = crlf("Content-Type: multipart/mixed; boundary=nowhere\n\nno delimiters here\n")
    msg2 = parse(raw2)
    assert msg2.root.content_type == "text/plain" and msg2.root.defaulted


def test_invalid_content_type_falls_back() -> None:
    for value in ("garbage", "text/", "/plain", ";;;", "text plain"):
        raw = crlf(f"Content-Type: {value}\n\nx")
        root = parse(raw).root
        assert (root.content_type, root.params) == ("text/plain", [(b"charset", b"us-ascii")])


def test_digest_default_is_message_rfc822() -> None:
    raw = crlf(
        "Content-Type: multipart/digest; boundary=d\n\n"
        "--d\n\nSubject: one\n\nfirst\n"
        "--d\nContent-Type: text/plain\n\nsecond\n"
        "--d--\n"
    )
    msg = parse(raw)
    first, second = msg.root.parts
    assert first.content_type == "message/rfc822"
    assert first.message is not None and first.message.header("subject") == b"one"
    assert second.content_type == "text/plain"
    assert section(msg, raw, "1.TEXT") == b"first"


def test_encoded_message_rfc822_is_a_leaf() -> None:
    raw = crlf(
        "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeAoK\n"
    )
    root = parse(raw).root
    assert root.message is None
    assert body_structure(parse(raw), extended=False) == (
        b'("message" "rfc822" NIL NIL NIL "base64" 18)'
    )


def test_top_level_message_rfc822() -> None:
    raw = crlf("Content-Type: message/rfc822\n\nSubject: inner\n\nbody\n")
    msg = parse(raw)
    assert section(msg, raw, "1") == crlf("Subject: inner\n\nbody\n")
    assert section(msg, raw, "1.HEADER") == crlf("Subject: inner\n\n")
    assert section(msg, raw, "1.1") == b"body\r\n"


def test_header_without_blank_line_and_garbage_lines() -> None:
    raw = crlf("Subject: only header\nnot a field line\nX-A: 1\n continued\n")
    msg = parse(raw)
    assert [f.name for f in msg.fields] == [b"Subject", b"X-A"]
    assert msg.fields[1].value == b" 1\r\n continued"
    assert msg.root.body_start == len(raw)
    no_header = crlf("just a body line\n\nmore\n")
    msg2 = parse(no_header)
    assert msg2.fields == [] and msg2.root.body_start == 0
    assert section(msg2, no_header, "TEXT") == no_header


def test_header_field_name_forms() -> None:
    raw = b"Subject : spaced\r\n: no name\r\nBad Name: x\r\nX-Empty:\r\n\r\n"
    fields = parse(raw).fields
    assert [(f.name, f.value) for f in fields] == [(b"Subject", b" spaced"), (b"X-Empty", b"")]
    assert fields[0].key == b"subject"
    assert fields[0].start == 0 and fields[0].end == len(b"Subject : spaced\r\n")


def test_empty_parts_and_boundary_at_end() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=e\n\n--e\n--e\n\nx\n--e")
    msg = parse(raw)
    assert len(msg.root.parts) == 2
    assert section(msg, raw, "1") == b""
    assert section(msg, raw, "2") == b"x"


def test_header_field_limit() -> None:
    raw = b"".join(b"X-N: %d\r\n" % i for i in range(50)) + b"Subject: late\r\n\r\nbody"
    msg = parse(raw, Limits(max_header_fields=10))
    assert len(msg.fields) == 10
    assert msg.truncated and msg.root.header_truncated
    assert msg.header("subject") is None
    assert section(msg, raw, "HEADER") == raw[: raw.index(b"body")]


def test_part_count_limit() -> None:
    body = "".join(f"--p\nContent-Type: text/plain\n\npart {i}\n" for i in range(20))
    raw = crlf("Content-Type: multipart/mixed; boundary=p\n\n" + body + "--p--\n")
    msg = parse(raw, Limits(max_parts=6))
    assert len(msg.root.parts) == 5
    assert msg.part_count == 6 and msg.truncated
    assert section(msg, raw, "5") == b"part 4"
    assert section(msg, raw, "6") == b""


def test_depth_limit_makes_opaque_leaves() -> None:
    inner = "Content-Type: message/rfc822\n\nContent-Type: multipart/mixed; boundary=x\n\n--x\n\nhi\n--x--\n"
    raw = crlf(inner)
    msg = parse(raw, Limits(max_depth=1))
    enc = msg.root.message
    assert enc is not None and enc.opaque and enc.content_type == "application/octet-stream"
    assert msg.truncated
    shallow = parse(raw, Limits(max_depth=0)).root
    assert shallow.opaque and shallow.message is None
    assert body_structure(parse(raw), extended=False).startswith(b'("message" "rfc822"')
