"""IMAP renderings of a parsed message: BODYSTRUCTURE, ENVELOPE, BODY[section] and
BINARY[section] slices.

The parse itself is ``mailgw.mime`` (protocol-neutral: webmail and policy checks use it too);
this module turns its tree into IMAP's syntax, so it lives with IMAP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailgw.mime.addresses import AddressItem, parse_address_list
from mailgw.mime.structure import MessageStructure, Part, find_part
from mailgw.mime.text import decode_transfer

__all__ = [
    "imap_string",
    "body_structure",
    "envelope",
    "Section",
    "parse_section",
    "section",
    "header_fields",
    "partial",
    "binary_section",
    "binary_text",
    "UnknownTransferEncoding",
]

_NEEDS_LITERAL = re.compile(rb"[\r\n\x80-\xff]")
_MAX_QUOTED_ESCAPES = 8


def imap_string(value: bytes | None) -> bytes:
    """Render ``value`` as an IMAP nstring: ``NIL``, a quoted string, or a literal
    ``{n}\\r\\n...`` when it holds CR, LF, 8-bit bytes or many quotes/backslashes.
    NUL bytes (not allowed in IMAP strings) are dropped."""
    if value is None:
        return b"NIL"
    if b"\x00" in value:
        value = value.replace(b"\x00", b"")
    escapes = value.count(b'"') + value.count(b"\\")
    if escapes > _MAX_QUOTED_ESCAPES or _NEEDS_LITERAL.search(value):
        return b"{%d}\r\n%s" % (len(value), value)
    if escapes:
        value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + value + b'"'


def _root(msg: MessageStructure | Part) -> Part:
    return msg.root if isinstance(msg, MessageStructure) else msg


def _params(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(imap_string(k) + b" " + imap_string(v) for k, v in params) + b")"


def _disposition(p: Part) -> bytes:
    if p.disposition is None:
        return b"NIL"
    return b"(" + imap_string(p.disposition) + b" " + _params(p.disposition_params) + b")"


def _language(p: Part) -> bytes:
    if not p.language:
        return b"NIL"
    if len(p.language) == 1:
        return imap_string(p.language[0])
    return b"(" + b" ".join(imap_string(lang) for lang in p.language) + b")"


def _body(out: bytearray, p: Part, extended: bool) -> None:
    if p.parts:
        out += b"("
        for child in p.parts:
            _body(out, child, extended)
        out += b" " + imap_string(p.subtype)
        if extended:
            out += b" %s %s %s %s" % (
                _params(p.params),
                _disposition(p),
                _language(p),
                imap_string(p.location),
            )
        out += b")"
        return
    out += b"(%s %s %s %s %s %s %d" % (
        imap_string(p.type),
        imap_string(p.subtype),
        _params(p.params),
        imap_string(p.content_id),
        imap_string(p.description),
        imap_string(p.encoding),
        p.size,
    )
    if p.message is not None:
        out += b" " + envelope(p.message) + b" "
        _body(out, p.message, extended)
        out += b" %d" % p.lines
    elif p.type.lower() == b"text":
        out += b" %d" % p.lines
    if extended:
        out += b" %s %s %s %s" % (
            imap_string(p.md5),
            _disposition(p),
            _language(p),
            imap_string(p.location),
        )
    out += b")"


def body_structure(msg: MessageStructure | Part, extended: bool = True) -> bytes:
    """The FETCH BODYSTRUCTURE value (RFC 3501 §7.4.2), or BODY with ``extended=False``."""
    out = bytearray()
    _body(out, _root(msg), extended)
    return bytes(out)


def _address_list(items: list[AddressItem]) -> bytes:
    if not items:
        return b"NIL"
    out = bytearray(b"(")
    for a in items:
        out += b"(%s %s %s %s)" % (
            imap_string(a.name),
            imap_string(a.route),
            imap_string(a.mailbox),
            imap_string(a.host),
        )
    out += b")"
    return bytes(out)


def _first_addresses(p: Part, name: bytes) -> list[AddressItem]:
    value = p.header(name)
    return parse_address_list(value) if value else []


def envelope(msg: MessageStructure | Part) -> bytes:
    """The FETCH ENVELOPE value (RFC 3501 §7.4.2) from the first occurrence of each field.

    Sender and Reply-To default to From when absent or empty; values are the raw header
    bytes (unfolded), obsolete source routes as the at-domain-list, groups as ``(NIL NIL "name" NIL)`` ...
    ``(NIL NIL NIL NIL)``.
    """
    p = _root(msg)
    frm = _first_addresses(p, b"from")
    sender = _first_addresses(p, b"sender") or frm
    reply_to = _first_addresses(p, b"reply-to") or frm
    return b"(%s %s %s %s %s %s %s %s %s %s)" % (
        imap_string(p.header(b"date") or None),
        imap_string(p.header(b"subject")),
        _address_list(frm),
        _address_list(sender),
        _address_list(reply_to),
        _address_list(_first_addresses(p, b"to")),
        _address_list(_first_addresses(p, b"cc")),
        _address_list(_first_addresses(p, b"bcc")),
        imap_string(p.header(b"in-reply-to") or None),
        imap_string(p.header(b"message-id") or None),
    )


@dataclass(frozen=True, slots=True)
class Section:
    """A parsed section spec: part ``path``, ``kind`` (``""``, ``HEADER``, ``TEXT``,
    ``MIME``, ``HEADER.FIELDS``, ``HEADER.FIELDS.NOT``) and upper-cased ``fields``."""

    path: tuple[int, ...]
    kind: str
    fields: tuple[bytes, ...] = ()


_PATH_RE = re.compile(rb"([1-9][0-9]{0,9}(?:\.[1-9][0-9]{0,9})*)(\.|\Z)")
_FIELD_TOKEN = re.compile(rb'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


def parse_section(spec: str | bytes) -> Section:
    """Parse a BODY[...] section spec such as ``1.2.MIME`` or ``HEADER.FIELDS (A B)``.

    Raises ValueError on a syntax error (the caller answers BAD).
    """
    s = spec.encode("latin-1") if isinstance(spec, str) else spec
    s = s.strip()
    path: tuple[int, ...] = ()
    m = _PATH_RE.match(s)
    if m is not None:
        path = tuple(int(x) for x in m.group(1).split(b"."))
        rest = s[m.end() :]
        if m.group(2) == b"." and not rest:
            raise ValueError("section ends with a dot")
    elif s[:1].isdigit():
        raise ValueError("bad section part number")
    else:
        rest = s
    upper = rest.upper()
    if upper in (b"", b"HEADER", b"TEXT"):
        return Section(path, upper.decode("ascii"))
    if upper == b"MIME":
        if not path:
            raise ValueError("MIME needs a part number")
        return Section(path, "MIME")
    for kind in (b"HEADER.FIELDS.NOT", b"HEADER.FIELDS"):
        if upper.startswith(kind):
            lst = rest[len(kind) :].strip()
            if not (lst.startswith(b"(") and lst.endswith(b")")):
                raise ValueError("HEADER.FIELDS needs a parenthesized list")
            inner = lst[1:-1]
            names: list[bytes] = []
            pos = 0
            while pos < len(inner):
                fm = _FIELD_TOKEN.match(inner, pos)
                if fm is None:
                    if inner[pos:].strip():
                        raise ValueError("bad header field name")
                    break
                name = fm.group(1) if fm.group(1) is not None else fm.group(2)
                names.append(re.sub(rb"\\(.)", rb"\1", name).upper())
                pos = fm.end()
            if not names:
                raise ValueError("empty header field list")
            return Section(path, kind.decode("ascii"), tuple(names))
    raise ValueError(f"unknown section {spec!r}")


def header_fields(
    part: MessageStructure | Part, raw: bytes, names: tuple[bytes, ...] | list[bytes], exclude: bool
) -> bytes:
    """The fields of ``part``'s header whose names are (``exclude=False``) or are not
    (``exclude=True``) in ``names`` (case-insensitive), original bytes and order,
    followed by the empty line."""
    p = _root(part)
    wanted = {n.lower() for n in names}
    out = bytearray()
    for f in p.fields:
        if (f.name.lower() in wanted) != exclude:
            out += raw[f.start : f.end]
            if raw[f.end - 1 : f.end] != b"\n":
                out += b"\r\n"
    out += b"\r\n"
    return bytes(out)


def section(msg: MessageStructure | Part, raw: bytes, spec: str | bytes | Section) -> bytes:
    """The bytes of BODY[``spec``] sliced from ``raw`` (the stored message).

    Nonexistent parts, and HEADER/TEXT of parts that are not message/rfc822, give
    ``b""`` (RFC 3501 §6.4.5). Raises ValueError on a malformed spec.
    """
    sec = spec if isinstance(spec, Section) else parse_section(spec)
    root = _root(msg)
    if sec.path:
        p = find_part(root, sec.path)
        if p is None:
            return b""
        if sec.kind == "":
            return raw[p.body_start : p.end]
        if sec.kind == "MIME":
            return raw[p.start : p.body_start]
        if p.message is None:
            return b""
        target = p.message
    else:
        target = root
        if sec.kind == "":
            return (
                raw
                if target.start == 0 and target.end == len(raw)
                else raw[target.start : target.end]
            )
    if sec.kind == "HEADER":
        return raw[target.start : target.body_start]
    if sec.kind == "TEXT":
        return raw[target.body_start : target.end]
    return header_fields(target, raw, sec.fields, sec.kind == "HEADER.FIELDS.NOT")


class UnknownTransferEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding this server cannot undo (the
    FETCH fails with ``NO [UNKNOWN-CTE]``, RFC 3516 4.3)."""


_IDENTITY = frozenset({b"7bit", b"8bit", b"binary"})
_DECODED = frozenset({b"base64", b"quoted-printable"})


def _decoded_body(p: Part, raw: bytes) -> bytes:
    body = raw[p.body_start : p.end]
    if p.parts or p.message is not None or p.opaque:
        return body  # a container: its own encoding can only be an identity one
    encoding = p.encoding.strip().lower()
    if encoding in _IDENTITY:
        return body
    if encoding in _DECODED:
        return decode_transfer(body, encoding)
    raise UnknownTransferEncoding(encoding.decode("latin-1"))


def binary_text(msg: MessageStructure | Part, raw: bytes, path: tuple[int, ...]) -> bytes:
    """BINARY[``path``.TEXT] (accepted beyond RFC 3516's part-number grammar, as Dovecot
    does): the body of the message (``path`` empty) or of the message/rfc822 part at
    ``path``, decoded when it is a single encoded part; ``b""`` for a part that is not a
    message. UnknownTransferEncoding as ``binary_section``."""
    target = _root(msg)
    if path:
        p = find_part(target, path)
        if p is None or p.message is None:
            return b""
        target = p.message
    return _decoded_body(target, raw)


def binary_section(msg: MessageStructure | Part, raw: bytes, path: tuple[int, ...]) -> bytes:
    """BINARY[``path``] (RFC 3516): the part's body with its Content-Transfer-Encoding
    (base64, quoted-printable; 7bit/8bit/binary are already raw) undone. Multipart and
    message/rfc822 parts, which carry no encoding of their own, come as stored. The empty
    path is the whole message: its header as stored and its body decoded when it is a
    single encoded part. A nonexistent part gives ``b""``; an encoding this server does
    not know raises UnknownTransferEncoding."""
    root = _root(msg)
    if not path:
        return raw[root.start : root.body_start] + _decoded_body(root, raw)
    p = find_part(root, path)
    if p is None:
        return b""
    return _decoded_body(p, raw)


def partial(data: bytes, origin: int, count: int | None = None) -> bytes:
    """The ``<origin.count>`` slice of fetched data (empty when ``origin`` is past the end)."""
    if origin < 0 or (count is not None and count < 0):
        raise ValueError("negative partial range")
    if origin >= len(data):
        return b""
    return data[origin:] if count is None else data[origin : origin + count]
