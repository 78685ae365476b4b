"""The message structure parser: a tree of MIME parts with byte offsets into the raw message."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mailgw.mime.headers import (
    HeaderField,
    decode_param,
    parse_content_type,
    parse_disposition,
    parse_header_block,
    unfold,
)

__all__ = ["Limits", "DEFAULT_LIMITS", "Part", "MessageStructure", "parse", "find_part"]

_MAX_DEPTH_CAP = 200  # keeps recursion far below Python's limit whatever the config says


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while parsing (hostile input must stay cheap).

    ``max_depth``: containers (multipart, message/rfc822) nested deeper are opaque leaves;
    ``max_parts``: parts beyond this count are dropped; ``max_header_fields``: fields of
    one header block beyond this count are not indexed (their bytes are still served).
    """

    max_depth: int = 50
    max_parts: int = 5000
    max_header_fields: int = 20_000


DEFAULT_LIMITS = Limits()

_INTEREST = {
    b"content-type": "ct",
    b"content-transfer-encoding": "cte",
    b"content-id": "id",
    b"content-description": "desc",
    b"content-md5": "md5",
    b"content-disposition": "disp",
    b"content-language": "lang",
    b"content-location": "loc",
}
_IDENTITY_ENCODINGS = (b"7bit", b"8bit", b"binary")


class Part:
    """One MIME entity: header and body offsets into the raw message, and its fields.

    ``start``..``body_start`` is the header block (including the empty line ending it),
    ``body_start``..``end`` the body. Multipart parts have ``parts`` (children); a
    message/rfc822 part has ``message`` (the encapsulated message's top entity, spanning
    this part's body). ``type``/``subtype``/parameter names and values are bytes as sent
    (parameters with RFC 2231 continuations merged). ``opaque`` marks a container not
    opened because of the limits (it then reads as application/octet-stream).
    """

    __slots__ = (
        "start",
        "body_start",
        "end",
        "fields",
        "type",
        "subtype",
        "params",
        "content_id",
        "description",
        "encoding",
        "md5",
        "disposition",
        "disposition_params",
        "language",
        "location",
        "parts",
        "message",
        "depth",
        "lines",
        "opaque",
        "defaulted",
        "header_truncated",
    )

    def __init__(self, start: int, body_start: int, end: int, fields: list[HeaderField]) -> None:
        self.start = start
        self.body_start = body_start
        self.end = end
        self.fields = fields
        self.type = b"text"
        self.subtype = b"plain"
        self.params: list[tuple[bytes, bytes]] = [(b"charset", b"us-ascii")]
        self.content_id: bytes | None = None
        self.description: bytes | None = None
        self.encoding = b"7bit"
        self.md5: bytes | None = None
        self.disposition: bytes | None = None
        self.disposition_params: list[tuple[bytes, bytes]] = []
        self.language: list[bytes] = []
        self.location: bytes | None = None
        self.parts: list[Part] = []
        self.message: Part | None = None
        self.depth = 0
        self.lines = 0
        self.opaque = False
        self.defaulted = True  # no valid Content-Type: text/plain; charset=us-ascii
        self.header_truncated = False

    def __repr__(self) -> str:
        return (
            f"<Part {self.content_type} header={self.start}:{self.body_start} "
            f"body={self.body_start}:{self.end} parts={len(self.parts)}>"
        )

    @property
    def size(self) -> int:
        """Size of the body in octets, as stored."""
        return self.end - self.body_start

    @property
    def content_type(self) -> str:
        """``type/subtype`` lower-cased, as text."""
        return (self.type + b"/" + self.subtype).decode("latin-1").lower()

    @property
    def is_multipart(self) -> bool:
        """True when this part was split into children."""
        return bool(self.parts)

    def header(self, name: str | bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), unfolded; None if absent."""
        key = (name.encode("ascii") if isinstance(name, str) else name).lower()
        for f in self.fields:
            if f.name.lower() == key:
                return f.unfolded()
        return None

    def header_fields(self, name: str | bytes) -> list[HeaderField]:
        """All fields named ``name`` (case-insensitive), in order."""
        key = (name.encode("ascii") if isinstance(name, str) else name).lower()
        return [f for f in self.fields if f.name.lower() == key]

    def param(self, name: str) -> str | None:
        """A Content-Type parameter, decoded (RFC 2231 / RFC 2047); None if absent."""
        return _lookup(self.params, name)

    def disposition_param(self, name: str) -> str | None:
        """A Content-Disposition parameter, decoded; None if absent."""
        return _lookup(self.disposition_params, name)

    @property
    def charset(self) -> str | None:
        """The charset parameter, or None."""
        return self.param("charset")

    @property
    def filename(self) -> str | None:
        """The attachment name: disposition ``filename``, else content-type ``name``."""
        return self.disposition_param("filename") or self.param("name")

    def walk(self) -> Iterator[Part]:
        """This part and every part below it (encapsulated messages included), depth
        first, without recursion."""
        stack: list[Part] = [self]
        while stack:
            p = stack.pop()
            yield p
            if p.message is not None:
                stack.append(p.message)
            stack.extend(reversed(p.parts))


def _lookup(params: list[tuple[bytes, bytes]], name: str) -> str | None:
    want = name.lower().encode("ascii")
    for k, v in params:
        base, text = decode_param(k, v)
        if base == want:
            return text
    return None


class MessageStructure:
    """The parse result of one message: ``root`` (the top entity), the total ``size``,
    how many parts were built, and whether a limit cut the structure (``truncated``)."""

    __slots__ = ("root", "size", "part_count", "truncated")

    def __init__(self, root: Part, size: int, part_count: int, truncated: bool) -> None:
        self.root = root
        self.size = size
        self.part_count = part_count
        self.truncated = truncated

    def __repr__(self) -> str:
        return f"<MessageStructure size={self.size} parts={self.part_count} root={self.root!r}>"

    @property
    def fields(self) -> list[HeaderField]:
        """The top-level header fields in order."""
        return self.root.fields

    def header(self, name: str | bytes) -> bytes | None:
        """The first top-level value of header ``name``, unfolded, or None."""
        return self.root.header(name)

    def walk(self) -> Iterator[Part]:
        """Every part of the message, depth first."""
        return self.root.walk()


class _State:
    __slots__ = ("raw", "limits", "count", "truncated")

    def __init__(self, raw: bytes, limits: Limits) -> None:
        self.raw = raw
        self.limits = limits
        self.count = 0
        self.truncated = False


def parse(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> MessageStructure:
    """Parse ``raw`` into a MessageStructure. Never raises on malformed input."""
    st = _State(raw, limits)
    root = _entity(st, 0, len(raw), 0, False)
    return MessageStructure(root, len(raw), st.count, st.truncated)


def _opaque(p: Part) -> None:
    p.type, p.subtype, p.params = b"application", b"octet-stream", []
    p.opaque = True
    p.parts = []
    p.message = None


def _entity(st: _State, start: int, end: int, depth: int, in_digest: bool) -> Part:
    raw = st.raw
    limits = st.limits
    st.count += 1
    hb = parse_header_block(raw, start, end, limits.max_header_fields)
    p = Part(start, hb.body_start, end, hb.fields)
    p.depth = depth
    p.header_truncated = hb.truncated
    if hb.truncated:
        st.truncated = True
    found: dict[str, bytes] = {}
    for f in hb.fields:
        slot = _INTEREST.get(f.name.lower())
        if slot is not None and slot not in found:
            found[slot] = f.value
    ct = parse_content_type(found["ct"]) if "ct" in found else None
    if ct is not None:
        p.type, p.subtype, p.params = ct
        p.defaulted = False
    elif in_digest and "ct" not in found:
        p.type, p.subtype, p.params = b"message", b"rfc822", []
        p.defaulted = False
    if "cte" in found:
        cte = unfold(found["cte"]).split(b";", 1)[0].split(b"(", 1)[0].strip()
        if cte:
            p.encoding = cte
    for slot, attr in (("id", "content_id"), ("desc", "description"), ("md5", "md5")):
        if slot in found:
            setattr(p, attr, unfold(found[slot]) or None)
    if "loc" in found:
        # RFC 2557: folded URLs are joined without the folding whitespace
        p.location = b"".join(unfold(found["loc"]).split()) or None
    if "lang" in found:
        langs = unfold(found["lang"]).replace(b",", b" ").split()
        p.language = [lang for lang in langs if not lang.startswith(b"(")]
    if "disp" in found:
        disp = parse_disposition(found["disp"])
        if disp is not None:
            p.disposition, p.disposition_params = disp
    ctype = p.type.lower()
    csub = p.subtype.lower()
    if ctype == b"multipart":
        if depth >= limits.max_depth or depth >= _MAX_DEPTH_CAP:
            st.truncated = True
            _opaque(p)
        else:
            bnd = next((v for k, v in p.params if k.lower() == b"boundary"), b"")
            if not bnd:
                _fallback_text(p)
            else:
                _split(st, p, bnd, depth, csub == b"digest")
                if not p.parts:
                    _fallback_text(p)
    elif ctype == b"message" and csub == b"rfc822":
        if p.encoding.lower() not in _IDENTITY_ENCODINGS:
            pass  # an encoded message/rfc822 is served as a leaf
        elif depth >= limits.max_depth or depth >= _MAX_DEPTH_CAP or st.count >= limits.max_parts:
            st.truncated = True
            _opaque(p)
        else:
            p.message = _entity(st, p.body_start, end, depth + 1, False)
    if p.type.lower() == b"text" or p.message is not None:
        # text lines: line breaks, plus a last line without one (its CRLF belongs to a
        # following boundary delimiter, RFC 2046 §5.1.1)
        p.lines = raw.count(b"\n", p.body_start, end)
        if end > p.body_start and raw[end - 1] != 10:
            p.lines += 1
    return p


def _fallback_text(p: Part) -> None:
    p.type, p.subtype, p.params = b"text", b"plain", [(b"charset", b"us-ascii")]
    p.defaulted = True
    p.parts = []


def _split(st: _State, p: Part, boundary: bytes, depth: int, digest: bool) -> None:
    """Split the body of multipart ``p`` at its delimiter lines (RFC 2046 §5.1.1)."""
    raw = st.raw
    find = raw.find
    delim = b"--" + boundary
    dlen = len(delim)
    body_start, end = p.body_start, p.end
    pos = body_start
    part_start = -1
    while True:
        d = find(delim, pos, end)
        if d < 0:
            break
        pos = d + 1
        if d != body_start and raw[d - 1] != 10:
            continue  # not at the start of a line
        after = d + dlen
        nl = find(b"\n", after, end)
        line_end = end if nl < 0 else nl + 1
        dashes = raw.startswith(b"--", after)
        if not dashes and raw[after:line_end].strip(b" \t\r\n"):
            continue  # a longer boundary that merely starts with ours
        # a delimiter on the very last line, without a line break, is a truncated close
        closing = dashes or nl < 0
        if part_start >= 0:
            pe = d
            if pe > part_start and raw[pe - 1] == 10:
                pe -= 1
                if pe > part_start and raw[pe - 1] == 13:
                    pe -= 1
            if not _child(st, p, part_start, pe, depth, digest):
                return
        if closing:
            return
        part_start = line_end
        pos = line_end
    if part_start >= 0:
        _child(st, p, part_start, end, depth, digest)  # close delimiter missing


def _child(st: _State, p: Part, start: int, end: int, depth: int, digest: bool) -> bool:
    if st.count >= st.limits.max_parts:
        st.truncated = True
        return False
    p.parts.append(_entity(st, start, end, depth + 1, digest))
    return True


def find_part(msg: MessageStructure | Part, path: list[int] | tuple[int, ...]) -> Part | None:
    """The part numbered ``path`` (IMAP section numbering, e.g. [1, 2] for ``1.2``).

    A non-multipart message has only part 1 (its body); a message/rfc822 part's
    subparts are those of the encapsulated message. Returns None when absent.
    """
    cur = msg.root if isinstance(msg, MessageStructure) else msg
    is_message = True
    for n in path:
        if not is_message and cur.message is not None:
            cur = cur.message
            is_message = True
        if cur.parts:
            if not 1 <= n <= len(cur.parts):
                return None
            cur = cur.parts[n - 1]
        elif is_message and n == 1:
            pass  # part 1 of a single-part message is its body
        else:
            return None
        is_message = False
    return cur
