"""Decoded views of a parsed message for search, webmail and policy: headers, dates, text."""

from __future__ import annotations

import binascii
import calendar
import re
from collections.abc import Iterator
from email.utils import parsedate_tz

from mailgw.mime.addresses import MISSING_DOMAIN, MISSING_MAILBOX, parse_address_list
from mailgw.mime.headers import decode_bytes, decode_header_value
from mailgw.mime.structure import MessageStructure, Part

__all__ = [
    "header_values",
    "addresses",
    "parse_date",
    "date",
    "decode_transfer",
    "decode_quoted_printable",
    "text_parts",
]


def _root(msg: MessageStructure | Part) -> Part:
    return msg.root if isinstance(msg, MessageStructure) else msg


def header_values(msg: MessageStructure | Part, name: str | bytes) -> list[bytes]:
    """Every value of header ``name`` (case-insensitive) in order, unfolded and stripped,
    still raw bytes (no RFC 2047 decoding)."""
    return [f.unfolded() for f in _root(msg).header_fields(name)]


def addresses(msg: MessageStructure | Part, name: str | bytes) -> list[tuple[str, str, str]]:
    """Mailboxes of every ``name`` header as (display name, local part, domain) texts.

    Display names are RFC 2047 decoded; group markers are dropped (members kept);
    a missing name, local part or domain is ``""``.
    """
    out: list[tuple[str, str, str]] = []
    for value in header_values(msg, name):
        for item in parse_address_list(value):
            if item.host is None:
                continue
            local = b"" if item.mailbox == MISSING_MAILBOX else item.mailbox or b""
            host = b"" if item.host == MISSING_DOMAIN else item.host
            display = decode_header_value(item.name) if item.name else ""
            out.append((display, decode_bytes(local), decode_bytes(host)))
    return out


_COMMENT_RE = re.compile(rb"\([^()]*\)")
_MILITARY = {chr(c): 0 for c in range(ord("A"), ord("Z") + 1) if chr(c) != "J"}


def _date_text(value: bytes | str) -> str:
    """An RFC 5322 date with comments (nested up to 4 deep) removed and spaces normalised."""
    v = value.encode("latin-1", "replace") if isinstance(value, str) else value
    for _ in range(4):
        stripped = _COMMENT_RE.sub(b" ", v)
        if stripped == v:
            break
        v = stripped
    return " ".join(v.decode("latin-1").split()).replace(" ,", ",")


def date_offset(value: bytes | str) -> int:
    """The zone offset in seconds east of UTC written in an RFC 5322 date (named zones
    too); 0 when it is missing, unknown, military or the date is invalid."""
    text = _date_text(value)
    try:
        parsed = parsedate_tz(text) if text else None
    except (ValueError, IndexError, TypeError):
        return 0
    if parsed is None or parsed[9] is None or abs(parsed[9]) >= 24 * 3600:
        return 0
    return int(parsed[9])


def parse_date(value: bytes | str) -> float | None:
    """Parse an RFC 5322 date (obsolete forms too: 2-digit years, named and military
    zones, comments, missing weekday or seconds) into a POSIX timestamp; None if invalid.
    A missing or unknown zone counts as UTC."""
    text = _date_text(value)
    if not text:
        return None
    words = text.split(" ")
    if len(words[-1]) == 1 and words[-1].upper() in _MILITARY:
        words[-1] = "+0000"  # RFC 5322 §4.3: military zones are treated as unknown
        text = " ".join(words)
    try:
        parsed = parsedate_tz(text)
    except (ValueError, IndexError, TypeError):
        return None
    if parsed is None:
        return None
    year, month, day, hour, minute, second = parsed[:6]
    if not (1 <= month <= 12 and 1 <= day <= 31 and 0 <= hour <= 23 and 0 <= minute <= 59):
        return None
    try:
        ts = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 1, 0))
    except (OverflowError, ValueError):
        return None
    return float(ts - (parsed[9] or 0))


def date(msg: MessageStructure | Part) -> float | None:
    """The first Date header of the message as a POSIX timestamp, or None."""
    value = _root(msg).header(b"date")
    return parse_date(value) if value else None


_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def decode_transfer(data: bytes, encoding: bytes | str) -> bytes:
    """Undo a Content-Transfer-Encoding (base64 and quoted-printable, leniently);
    identity and unknown encodings return ``data`` unchanged."""
    enc = (encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding).lower()
    if enc == "base64":
        try:
            return binascii.a2b_base64(data)
        except (binascii.Error, ValueError):
            clean = _B64_JUNK.sub(b"", data)
            rem = len(clean) % 4
            clean = clean[:-1] if rem == 1 else clean + b"=" * ((4 - rem) % 4)
            try:
                return binascii.a2b_base64(clean)
            except (binascii.Error, ValueError):
                return b""
    if enc == "quoted-printable":
        return decode_quoted_printable(data)
    return data


_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_quoted_printable(data: bytes) -> bytes:
    """Undo quoted-printable (RFC 2045 6.7): ``=XX`` octets, ``=`` at a line's end joins it
    to the next (soft line break), whitespace ending an encoded line is transport padding
    and goes; hard line breaks (CRLF or bare LF) come out as CRLF. A malformed ``=`` is
    kept as it stands, as the RFC suggests for robustness."""
    out = bytearray()
    lines = data.split(b"\n")
    last = len(lines) - 1
    for n, line in enumerate(lines):
        if n < last or line.endswith(b"\r"):
            line = line[:-1] if line.endswith(b"\r") else line
            hard = True
        else:
            hard = False  # the data ends without a line break
        line = line.rstrip(b" \t")
        if line.endswith(b"="):
            line = line[:-1]
            hard = False
        out += _QP_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), line)
        if hard and n < last:
            out += b"\r\n"
    return bytes(out)


def text_parts(
    msg: MessageStructure | Part, raw: bytes, max_bytes: int | None = None
) -> Iterator[tuple[Part, str]]:
    """Each text/* leaf part (encapsulated messages included) with its decoded text:
    transfer encoding undone, charset applied with replacement (unknown charsets:
    UTF-8, else Latin-1). ``max_bytes`` bounds the decoded octets used per part."""
    for p in _root(msg).walk():
        if p.parts or p.message is not None or p.opaque or p.type.lower() != b"text":
            continue
        data = decode_transfer(raw[p.body_start : p.end], p.encoding)
        if max_bytes is not None:
            data = data[:max_bytes]
        yield p, decode_bytes(data, p.charset)
