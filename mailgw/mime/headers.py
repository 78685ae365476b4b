"""Header-level parsing over bytes: header blocks with offsets, MIME parameters, RFC 2047/2231."""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

__all__ = [
    "HeaderField",
    "HeaderBlock",
    "parse_header_block",
    "unfold",
    "parse_content_type",
    "parse_disposition",
    "parse_params",
    "merge_rfc2231",
    "decode_param",
    "decode_header_value",
    "decode_bytes",
    "lookup_codec",
]

_WSP = b" \t"


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field exactly as stored.

    ``name`` is the field name as sent (without the colon, trailing blanks removed),
    ``value`` the bytes after the colon up to (excluding) the field's final line break,
    folding kept; ``start``/``end`` are offsets of the whole field in the raw message,
    ``end`` including the final line break.
    """

    name: bytes
    value: bytes
    start: int
    end: int

    @property
    def key(self) -> bytes:
        """The lower-cased field name, for case-insensitive matching."""
        return self.name.lower()

    def unfolded(self) -> bytes:
        """The value unfolded (line breaks before blanks removed) and stripped."""
        return unfold(self.value)


@dataclass(slots=True)
class HeaderBlock:
    """A parsed header block: fields in order, and where the header and body start."""

    fields: list[HeaderField]
    start: int
    body_start: int
    truncated: bool = False
    malformed: list[int] = field(default_factory=list)
    """Offsets of the lines inside the header that are neither a field nor a continuation
    (no colon, or an invalid field name): skipped here, but other parsers may end the header
    there or read them otherwise, so policy checks refuse them."""


_FOLD_RE = re.compile(rb"\r?\n(?=[ \t])")


def unfold(value: bytes) -> bytes:
    """Remove folding line breaks (CRLF or LF before a blank) and strip surrounding blanks."""
    if b"\n" in value:
        value = _FOLD_RE.sub(b"", value)
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    return value.strip(b" \t\r\n")


def _valid_name(name: bytes) -> bool:
    if not name:
        return False
    return all(33 <= c <= 126 and c != 58 for c in name)


def parse_header_block(raw: bytes, start: int, end: int, max_fields: int) -> HeaderBlock:
    """Parse the header block of the entity ``raw[start:end]``.

    The header ends after the first empty line (CRLF or bare LF), which belongs to the
    header. Lines that are not fields (no colon, bad name) are skipped but stay in the
    header bytes (their offsets in ``malformed``). When the first line is not a field, the
    header is empty and the entity is all body; without an empty line, the entity is all
    header. Only the first ``max_fields`` fields are indexed.
    """
    fields: list[HeaderField] = []
    truncated = False
    pos = start
    cur_start = -1  # start of the field being collected, or -1
    cur_colon = -1
    find = raw.find
    first_is_field: bool | None = None
    malformed: list[int] = []

    def close(next_pos: int) -> None:
        # the current field ends just before ``next_pos`` (start of the following line)
        nonlocal truncated, cur_start
        if cur_start < 0:
            return
        if len(fields) >= max_fields:
            truncated = True
        else:
            e = next_pos
            if e > cur_colon + 1 and raw[e - 1] == 10:
                e -= 1
                if e > cur_colon + 1 and raw[e - 1] == 13:
                    e -= 1
            name = raw[cur_start:cur_colon].rstrip(_WSP)
            fields.append(HeaderField(name, raw[cur_colon + 1 : e], cur_start, next_pos))
        cur_start = -1

    while pos < end:
        nl = find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        if nl >= 0 and (nl == pos or (nl == pos + 1 and raw[pos] == 13)):
            close(pos)  # empty line: end of the header
            return HeaderBlock(fields, start, line_end, truncated, malformed)
        c = raw[pos]
        if (c == 32 or c == 9) and cur_start >= 0:
            pos = line_end  # continuation line
            continue
        close(pos)
        content_end = line_end if nl < 0 else nl
        colon = find(b":", pos, content_end)
        is_field = colon > pos and _valid_name(raw[pos:colon].rstrip(_WSP))
        if is_field:
            cur_start, cur_colon = pos, colon
        if first_is_field is None:
            if not is_field:
                break  # no header at all: the entity is all body
            first_is_field = True
        elif not is_field:
            malformed.append(pos)
        pos = line_end
    if first_is_field:
        close(end)
        return HeaderBlock(fields, start, end, truncated, malformed)
    return HeaderBlock([], start, start, False)


# --- MIME parameters ------------------------------------------------------------------

_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')


def _skip_cfws(v: bytes, i: int) -> int:
    n = len(v)
    while i < n:
        c = v[i]
        if c in (32, 9, 13, 10):
            i += 1
        elif c == 40:  # comment, possibly nested
            depth = 0
            while i < n:
                c = v[i]
                if c == 92:
                    i += 2
                    continue
                if c == 40:
                    depth += 1
                elif c == 41:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def _token(v: bytes, i: int) -> tuple[bytes, int]:
    n = len(v)
    j = i
    while j < n:
        c = v[j]
        if c <= 32 or c == 127 or c in _TSPECIALS:
            break
        j += 1
    return v[i:j], j


def _quoted(v: bytes, i: int) -> tuple[bytes, int]:
    """Parse a quoted string starting at the quote ``v[i]``; unclosed runs to the end."""
    out = bytearray()
    n = len(v)
    i += 1
    while i < n:
        c = v[i]
        if c == 34:
            return bytes(out), i + 1
        if c == 92 and i + 1 < n:
            out.append(v[i + 1])
            i += 2
            continue
        if c not in (13, 10):
            out.append(c)
        i += 1
    return bytes(out), n


def _value(v: bytes, i: int) -> tuple[bytes, int]:
    if i < len(v) and v[i] == 34:
        return _quoted(v, i)
    # lenient: a token, or anything up to the next ';' (8-bit names, spaces)
    j = v.find(b";", i)
    if j < 0:
        j = len(v)
    return v[i:j].strip(b" \t\r\n"), j


def parse_params(v: bytes, i: int, max_params: int = 256) -> list[tuple[bytes, bytes]]:
    """Parse ``; attr=value`` pairs from ``v[i:]`` (names as sent, values unquoted)."""
    params: list[tuple[bytes, bytes]] = []
    n = len(v)
    while i < n and len(params) < max_params:
        i = _skip_cfws(v, i)
        if i >= n:
            break
        if v[i] != 59:  # ';'
            # junk: skip to the next ';'
            j = v.find(b";", i)
            if j < 0:
                break
            i = j
        i = _skip_cfws(v, i + 1)
        name, i = _token(v, i)
        i = _skip_cfws(v, i)
        if not name or i >= n or v[i] != 61:  # '='
            continue
        i = _skip_cfws(v, i + 1)
        value, i = _value(v, i)
        params.append((name, value))
    return params


def merge_rfc2231(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Join RFC 2231 continuations, keeping first-come order and the first duplicate.

    ``name*0*=utf-8''a%20; name*1=b`` becomes ``name*`` = ``utf-8''a%20b`` (the extended
    form, still encoded, as IMAP servers send it); plain continuations become ``name``.
    """
    if not any(b"*" in name for name, _ in params):
        out: list[tuple[bytes, bytes]] = []
        seen: set[bytes] = set()
        for name, value in params:
            k = name.lower()
            if k not in seen:
                seen.add(k)
                out.append((name, value))
        return out
    order: list[bytes] = []
    simple: dict[bytes, tuple[bytes, bytes]] = {}
    pieces: dict[bytes, dict[int, tuple[bool, bytes]]] = {}
    names: dict[bytes, bytes] = {}
    for name, value in params:
        base, star, rest = name.partition(b"*")
        k = base.lower()
        if not star:
            if k not in simple and k not in pieces:
                simple[k] = (name, value)
                order.append(k)
            continue
        if k in simple:
            continue
        if rest == b"":  # name*=charset'lang'value
            idx, ext = 0, True
        else:
            num, star2, tail = rest.partition(b"*")
            if not num.isdigit() or tail or len(num) > 3:
                continue
            idx, ext = int(num), bool(star2)
        if k not in pieces:
            pieces[k] = {}
            names[k] = base
            order.append(k)
        pieces[k].setdefault(idx, (ext, value))
    out = []
    for k in order:
        if k in simple:
            out.append(simple[k])
            continue
        segs = pieces[k]
        joined = bytearray()
        extended = any(ext for ext, _ in segs.values())
        i = 0
        while i in segs:
            ext, value = segs[i]
            if extended and not ext:
                # an unencoded segment inside an extended value: percent-encode it
                value = b"".join(
                    bytes([c])
                    if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122)
                    else b"%%%02X" % c
                    for c in value
                )
                if i == 0:
                    value = b"''" + value
            joined += value
            i += 1
        out.append((names[k] + (b"*" if extended else b""), bytes(joined)))
    return out


def decode_param(name: bytes, value: bytes) -> tuple[bytes, str]:
    """Decode one merged parameter into (lower-cased base name, text).

    Extended (``name*``) values are RFC 2231 ``charset'lang'%xx``; plain values may hold
    RFC 2047 encoded-words (common for filenames) or raw 8-bit text.
    """
    if name.endswith(b"*"):
        base = name[:-1].lower()
        parts = value.split(b"'", 2)
        if len(parts) == 3:
            charset, _lang, text = parts
        else:
            charset, text = b"us-ascii", value
        data = unquote_to_bytes(text)
        return base, decode_bytes(data, charset.decode("ascii", "replace"))
    return name.lower(), decode_header_value(value)


def _parse_type_value(v: bytes) -> tuple[bytes, bytes, int] | None:
    i = _skip_cfws(v, 0)
    typ, i = _token(v, i)
    i = _skip_cfws(v, i)
    if not typ or i >= len(v) or v[i] != 47:  # '/'
        return None
    i = _skip_cfws(v, i + 1)
    sub, i = _token(v, i)
    if not sub:
        return None
    return typ, sub, i


def parse_content_type(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """Parse a Content-Type value into (type, subtype, merged params); None when invalid."""
    parsed = _parse_type_value(unfold(value))
    if parsed is None:
        return None
    typ, sub, i = parsed
    return typ, sub, merge_rfc2231(parse_params(unfold(value), i))


def parse_disposition(value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """Parse a Content-Disposition value into (disposition, merged params); None if empty."""
    v = unfold(value)
    i = _skip_cfws(v, 0)
    disp, i = _token(v, i)
    if not disp:
        return None
    return disp, merge_rfc2231(parse_params(v, i))


# --- charsets and RFC 2047 ------------------------------------------------------------

_CODEC_ALIASES = {
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "latin-1",
    "unknown-8bit": "latin-1",
    "x-user-defined": "latin-1",
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
}


def lookup_codec(charset: str) -> str | None:
    """A Python codec name for a MIME charset, or None when unknown."""
    cs = charset.strip().strip('"').lower()
    cs = cs.split("*", 1)[0]  # RFC 2231 language suffix
    cs = _CODEC_ALIASES.get(cs, cs)
    if cs in ("us-ascii", "ascii", "ansi_x3.4-1968"):
        return "ascii"
    try:
        return codecs.lookup(cs).name
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode ``data`` in ``charset`` with replacement of invalid sequences. Without a
    charset, with an unknown one or with US-ASCII (8-bit data mislabelled as ASCII is
    common): UTF-8 when valid, else Latin-1. Never raises."""
    codec = lookup_codec(charset) if charset else None
    if codec is not None and codec != "ascii":
        return data.decode(codec, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_EW_RE = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BLANK_RE = re.compile(rb"[ \t\r\n]*\Z")


def _ew_bytes(enc: bytes, text: bytes) -> bytes | None:
    if enc in (b"B", b"b"):
        t = text.rstrip(b"=")
        t += b"=" * (-len(t) % 4)
        try:
            return base64.b64decode(t)
        except (binascii.Error, ValueError):
            try:
                return binascii.a2b_base64(text + b"==")
            except (binascii.Error, ValueError):
                return None
    return binascii.a2b_qp(text.replace(b"_", b" "))


def decode_header_value(value: bytes) -> str:
    """Decode a header value to text: unfold, decode RFC 2047 encoded-words (adjacent
    words in one charset are joined before decoding, whitespace between them dropped;
    malformed words stay literal), other bytes as UTF-8, or Latin-1 when not valid UTF-8."""
    v = unfold(value)
    if b"=?" not in v:
        return decode_bytes(v)
    out: list[str] = []
    pending: bytearray | None = None
    pending_cs = ""
    pos = 0

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(decode_bytes(bytes(pending), pending_cs))
            pending = None

    for m in _EW_RE.finditer(v):
        gap = v[pos : m.start()]
        data = _ew_bytes(m.group(2), m.group(3))
        if data is None:
            continue  # malformed: leave it in the literal text
        if gap and not (pending is not None and _BLANK_RE.match(gap)):
            flush()
            out.append(decode_bytes(gap))
        charset = m.group(1).decode("ascii", "replace")
        if pending is not None and charset.lower() == pending_cs.lower():
            pending += data
        else:
            flush()
            pending = bytearray(data)
            pending_cs = charset
        pos = m.end()
    flush()
    if pos < len(v):
        out.append(decode_bytes(v[pos:]))
    return "".join(out)
