"""BINARY[section] decoding (RFC 3516) and quoted-printable decoding (RFC 2045 6.7)."""

from __future__ import annotations

import base64

import pytest

from mailgw.imap.render import UnknownTransferEncoding, binary_section
from mailgw.mime import decode_quoted_printable, decode_transfer, parse


def _multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(
        b"--b\r\nContent-Transfer-Encoding: %s\r\n\r\n%s\r\n" % (cte.encode(), data)
        for cte, data in parts
    )
    return (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + body
        + (b"--b--\r\n")
    )


def test_quoted_printable_soft_breaks_escapes_and_padding() -> None:
    encoded = b"hello\r\nb=61r\r\nfoo=09bar\r\nfoo\t =09=\r\nb\r\nfoo bar   \r\nfoo=\r\n b\r\n"
    assert decode_quoted_printable(encoded) == (
        b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\n"
    )
    # Bare LF line ends come out as CRLF; malformed escapes stay as written.
    assert decode_quoted_printable(b"a=3D=ZZ\nb=4") == b"a==ZZ\r\nb=4"
    # No line break at the end: none added; trailing white space still goes.
    assert decode_quoted_printable(b"x=20 \t") == b"x "
    assert decode_transfer(b"a=3Db", "Quoted-Printable") == b"a=b"


def test_binary_sections_decode_each_leaf() -> None:
    raw = _multipart(
        ("base64", base64.encodebytes(b"abc\x00def")),
        ("quoted-printable", b"caf=C3=A9=\r\n!"),
        ("8bit", b"caf\xc3\xa9"),
        ("BINARY", b"a\x00b"),
    )
    msg = parse(raw)
    assert binary_section(msg, raw, (1,)) == b"abc\x00def"
    assert binary_section(msg, raw, (2,)) == "café!".encode()
    assert binary_section(msg, raw, (3,)) == b"caf\xc3\xa9"
    assert binary_section(msg, raw, (4,)) == b"a\x00b"
    assert binary_section(msg, raw, (9,)) == b""
    assert binary_section(msg, raw, (1, 1)) == b""
    # A multipart whole message carries no encoding of its own: as stored.
    assert binary_section(msg, raw, ()) == raw


def test_binary_of_a_single_part_message_and_of_message_rfc822() -> None:
    raw = b"Subject: s\r\nContent-Transfer-Encoding: base64\r\n\r\naGkA\r\n"
    msg = parse(raw)
    assert binary_section(msg, raw, (1,)) == b"hi\x00"
    assert binary_section(msg, raw, ()) == raw[: raw.index(b"\r\n\r\n") + 4] + b"hi\x00"
    inner = b"Subject: in\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n"
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b--\r\n"
    )
    msg = parse(raw)
    assert binary_section(msg, raw, (1,)) == inner  # the encapsulated message, as stored
    assert binary_section(msg, raw, (1, 1)) == b"hi"  # its body, decoded


def test_unknown_transfer_encoding_is_an_error() -> None:
    raw = _multipart(("x-uuencode", b"begin 644 f\r\nend"))
    with pytest.raises(UnknownTransferEncoding, match="x-uuencode"):
        binary_section(parse(raw), raw, (1,))
