"""A stored message as the webmail shows it: decoded header fields, the text and HTML
bodies, the attachments (RFC 2047 / 2231 names decoded), read with ``mailgw.mime``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailgw.mime import (
    addresses,
    decode_bytes,
    decode_header_value,
    decode_transfer,
    header_values,
    parse,
    parse_date,
)
from mailgw.mime.structure import MessageStructure, Part

_REPLY_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|sv|回复|答复|转发)\s*(\[\d+\])?\s*[:：]\s*)+", re.I)
_MSGID = re.compile(r"<[^<>\s]+>")


def header_text(msg: MessageStructure | Part, name: str) -> str:
    """The first ``name`` field, unfolded and RFC 2047 decoded ("" when absent)."""
    values = header_values(msg, name)
    return decode_header_value(values[0]).strip() if values else ""


def address_list(msg: MessageStructure | Part, name: str) -> list[tuple[str, str]]:
    """(display name, address) of each mailbox in the ``name`` fields."""
    return [
        (n, f"{local}@{domain}" if domain else local) for n, local, domain in addresses(msg, name)
    ]


def format_addresses(items: list[tuple[str, str]]) -> str:
    """``Name <addr>, addr`` for showing."""
    return ", ".join(f"{n} <{a}>" if n else a for n, a in items)


def base_subject(subject: str) -> str:
    """The subject without reply/forward prefixes, for threading and sorting."""
    return _REPLY_PREFIX.sub("", subject).strip()


def message_ids(text: str) -> list[str]:
    """The ``<id>`` tokens of a Message-ID / References / In-Reply-To value."""
    return _MSGID.findall(text)


@dataclass
class Attachment:
    """One downloadable part: its section number (``1.2``), name, type and decoded size."""

    section: str
    filename: str
    content_type: str
    size: int
    content_id: str = ""


@dataclass
class MessageView:
    """What the read page shows of a message."""

    subject: str
    sender: list[tuple[str, str]]
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    reply_to: list[tuple[str, str]]
    date: float | None
    date_text: str
    message_id: str
    references: list[str]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def _section(path: list[int]) -> str:
    return ".".join(str(n) for n in path) or "1"


def _leaves(part: Part, path: list[int], out: list[tuple[list[int], Part]]) -> None:
    if part.parts:
        for i, child in enumerate(part.parts, 1):
            _leaves(child, [*path, i], out)
    else:
        out.append((path or [1], part))


def _decoded(raw: bytes, part: Part) -> bytes:
    return decode_transfer(raw[part.body_start : part.end], part.encoding)


def read_message(raw: bytes) -> MessageView:
    """Parse ``raw`` into a ``MessageView``: the first text/plain and text/html bodies not
    marked as attachments, and every other leaf as an attachment."""
    msg = parse(raw)
    date_text = header_text(msg, "Date")
    view = MessageView(
        subject=header_text(msg, "Subject"),
        sender=address_list(msg, "From"),
        to=address_list(msg, "To"),
        cc=address_list(msg, "Cc"),
        reply_to=address_list(msg, "Reply-To"),
        date=parse_date(date_text) if date_text else None,
        date_text=date_text,
        message_id=(message_ids(header_text(msg, "Message-ID")) or [""])[0],
        references=message_ids(header_text(msg, "References")),
    )
    leaves: list[tuple[list[int], Part]] = []
    _leaves(msg.root, [], leaves)
    for path, part in leaves:
        ctype = f"{part.type.decode('latin-1')}/{part.subtype.decode('latin-1')}".lower()
        disposition = (part.disposition or b"").decode("latin-1").lower()
        name = part.filename
        is_body = disposition != "attachment" and not name
        if is_body and ctype == "text/plain" and view.text is None:
            view.text = decode_bytes(_decoded(raw, part), part.charset)
            continue
        if is_body and ctype == "text/html" and view.html is None:
            view.html = decode_bytes(_decoded(raw, part), part.charset)
            continue
        if ctype.startswith("multipart/"):
            continue
        cid = (part.content_id or b"").decode("latin-1").strip().strip("<>")
        size = len(_decoded(raw, part))
        if not name:
            ext = {"text/plain": ".txt", "text/html": ".html", "message/rfc822": ".eml"}.get(
                ctype, ".bin"
            )
            name = f"part-{_section(path)}{ext}"
        view.attachments.append(Attachment(_section(path), name, ctype, size, cid))
    return view


def attachment_data(raw: bytes, section: str) -> tuple[Attachment, bytes] | None:
    """The attachment at ``section`` (as listed by ``read_message``) and its decoded bytes;
    None when there is no such attachment."""
    for att in read_message(raw).attachments:
        if att.section == section:
            msg = parse(raw)
            leaves: list[tuple[list[int], Part]] = []
            _leaves(msg.root, [], leaves)
            for path, part in leaves:
                if _section(path) == section:
                    return att, _decoded(raw, part)
    return None


def inline_images(raw: bytes) -> dict[str, str]:
    """Content-ID (without brackets) -> section of each part that has one."""
    return {a.content_id: a.section for a in read_message(raw).attachments if a.content_id}


_DROP = re.compile(r"<(script|style|head|title)\b.*?</\1\s*>", re.I | re.S)
_BREAK = re.compile(r"<\s*(br|/p|/div|/tr|/li|/h[1-6])\b[^>]*>", re.I)


def html_to_text(text: str) -> str:
    """Readable plain text of an HTML body (for quoting a reply and for search): scripts and
    styles dropped, line breaks kept, tags removed, entities decoded."""
    import html as html_module

    text = _DROP.sub(" ", text)
    text = _BREAK.sub("\n", text)
    text = html_module.unescape(re.sub(r"<[^>]*>", "", text))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def view_text(view: MessageView) -> str:
    """The message's text: its plain text, else its HTML as text ("" without either)."""
    if view.text is not None:
        return view.text
    return html_to_text(view.html) if view.html is not None else ""


def body_text(raw: bytes) -> str:
    """The searchable text of a message: its plain text, else its HTML as text."""
    return view_text(read_message(raw))
