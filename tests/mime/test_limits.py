"""Hostile shapes stay bounded: deep nesting, huge header counts, many parts."""

from __future__ import annotations

import pytest

from mailgw.imap.render import body_structure, envelope, section
from mailgw.mime import parse, text_parts


def _nested_multipart(levels: int) -> bytes:
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(levels)
    )
    tail = b"".join(b"\r\n--b%d--" % i for i in reversed(range(levels)))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\nleaf" + tail + b"\r\n"


@pytest.mark.timeout(10)
def test_hundred_mime_levels_are_cut_at_the_depth_limit() -> None:
    raw = _nested_multipart(100)
    msg = parse(raw)
    assert msg.truncated
    depths = [p.depth for p in msg.walk()]
    assert max(depths) == 50
    deepest = [p for p in msg.walk() if p.depth == 50][0]
    assert deepest.opaque and deepest.content_type == "application/octet-stream"
    bs = body_structure(msg)
    assert bs.count(b'"mixed"') == 50
    assert b'"application" "octet-stream" NIL NIL NIL "7bit"' in bs
    assert section(msg, raw, ".".join(["1"] * 50)).startswith(b"--b50\r\n")
    assert section(msg, raw, ".".join(["1"] * 52)) == b""
    assert list(text_parts(msg, raw)) == []


@pytest.mark.timeout(10)
def test_hundred_message_rfc822_levels() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 100 + b"Subject: core\r\n\r\ncore"
    msg = parse(raw)
    assert msg.truncated
    assert max(p.depth for p in msg.walk()) == 50
    assert body_structure(msg).count(b'"rfc822"') == 50


@pytest.mark.timeout(10)
def test_ten_thousand_to_headers() -> None:
    to = b"".join(b"To: User %d <user%d@example.org>\r\n" % (i, i) for i in range(10_000))
    raw = b"From: a@example.com\r\n" + to + b"Subject: many\r\n\r\nbody\r\n"
    msg = parse(raw)
    assert len(msg.fields) == 10_002
    env = envelope(msg)
    assert env == (
        b'(NIL "many" ((NIL NIL "a" "example.com")) ((NIL NIL "a" "example.com")) '
        b'((NIL NIL "a" "example.com")) (("User 0" NIL "user0" "example.org")) NIL NIL NIL NIL)'
    )
    assert len(section(msg, raw, "HEADER.FIELDS (TO)")) == len(to) + 2
    assert section(msg, raw, "HEADER.FIELDS.NOT (TO)") == (
        b"From: a@example.com\r\nSubject: many\r\n\r\n"
    )


@pytest.mark.timeout(10)
def test_ten_thousand_addresses_in_one_header() -> None:
    to = b", ".join(b'"N %d" <u%d@x.org>' % (i, i) for i in range(10_000))
    raw = b"To: " + to + b"\r\nCc: grp:" + b"a@b.c," * 10_000 + b";\r\n\r\n"
    env = envelope(parse(raw))
    assert env.count(b' NIL "u') == 10_000
    assert env.count(b'(NIL NIL "a" "b.c")') == 10_000


@pytest.mark.timeout(10)
def test_many_parts_are_capped() -> None:
    body = b"".join(b"--p\r\n\r\n%d\r\n" % i for i in range(20_000))
    raw = b"Content-Type: multipart/mixed; boundary=p\r\n\r\n" + body + b"--p--\r\n"
    msg = parse(raw)
    assert msg.part_count == 5000 and msg.truncated
    assert len(msg.root.parts) == 4999
    assert len(body_structure(msg)) < 400_000


@pytest.mark.timeout(10)
def test_pathological_lines_stay_linear() -> None:
    # many near-boundary lines, an enormous folded header and deeply nested comments
    near = b"--bound-not-quite\r\n" * 50_000
    fold = b"X-Long: start\r\n" + b" more\r\n" * 50_000
    comments = b"(" * 20_000 + b"x" + b")" * 20_000
    raw = (
        fold
        + b"From: "
        + comments
        + b" a@b.c\r\n"
        + b"Content-Type: multipart/mixed; boundary=bound\r\n\r\n"
        + b"--bound\r\n\r\n"
        + near
        + b"--bound--\r\n"
    )
    msg = parse(raw)
    assert len(msg.root.parts) == 1
    assert msg.root.parts[0].size == len(near) - 2
    assert b'"a" "b.c"' in envelope(msg)
