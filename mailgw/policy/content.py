"""What content rules look at, read once per message and bounded: ``ContentFacts``.

``content_facts(raw, limits)`` parses the message with ``mailgw.mime`` (its part and depth
limits) and gives the header fields (names and RFC 2047-decoded values), the decoded Subject,
the text of the text/* parts (transfer encoding and charset undone; at most
``max_text`` characters in all), and the attachments: every leaf part that has a file name or
is not text, with its name, extension, the type of its first bytes (``filetypes.sniff``) and,
for a zip archive, its members (names, types, encryption). Only the first ``max_scan``
bytes of the message are parsed (``scan_truncated`` says when more were there);
``mime_truncated`` says a parse limit cut the structure (too many parts, too deep).

The DLP patterns are here too: ``cn_id_numbers`` (PRC resident identity card numbers, 18
characters with the ISO 7064 MOD 11-2 check character of GB 11643) and ``card_numbers``
(payment card numbers, 13 to 19 digits, optionally grouped by spaces or dashes, passing the
Luhn check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailgw.mime import Limits, decode_header_value, decode_transfer, parse, text_parts
from mailgw.policy.filetypes import ZipMember, sniff, zip_members


@dataclass(frozen=True)
class ContentLimits:
    """Bounds of the content scan (``[policy]`` keys)."""

    max_scan: int = 10 * 1024 * 1024
    max_parts: int = 1000
    max_depth: int = 20
    max_text: int = 2 * 1024 * 1024
    max_zip_members: int = 1000


DEFAULT_CONTENT_LIMITS = ContentLimits()


@dataclass(frozen=True)
class Attachment:
    name: str
    """The file name ('' when the part has none)."""
    content_type: str
    type: str
    """The sniffed type of its decoded bytes (``filetypes``)."""
    members: tuple[ZipMember, ...] = ()
    encrypted: bool = False
    """An archive with an encrypted member."""

    @property
    def extension(self) -> str:
        base = self.name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        return base.rsplit(".", 1)[1].lower() if "." in base else ""


@dataclass
class ContentFacts:
    headers: list[tuple[str, str]] = field(default_factory=list)
    """Top-level header fields: (lower-case name, decoded unfolded value)."""
    subject: str = ""
    text: str = ""
    """The text parts' decoded text, joined by newlines (bounded)."""
    attachments: list[Attachment] = field(default_factory=list)
    size: int = 0
    part_count: int = 0
    scan_truncated: bool = False
    mime_truncated: bool = False


def content_facts(raw: bytes, limits: ContentLimits = DEFAULT_CONTENT_LIMITS) -> ContentFacts:
    """The facts of the message ``raw`` (see the module docstring)."""
    facts = ContentFacts(size=len(raw))
    if len(raw) > limits.max_scan:
        raw = raw[: limits.max_scan]
        facts.scan_truncated = True
    structure = parse(
        raw, Limits(max_depth=limits.max_depth, max_parts=limits.max_parts, max_header_fields=2000)
    )
    facts.part_count = structure.part_count
    facts.mime_truncated = structure.truncated
    for f in structure.fields:
        value = decode_header_value(f.unfolded())
        facts.headers.append((f.name.decode("latin-1").lower(), value))
        if f.key == b"subject" and not facts.subject:
            facts.subject = value
    texts: list[str] = []
    budget = limits.max_text
    for _, text in text_parts(structure, raw, max_bytes=limits.max_text):
        if budget <= 0:
            break
        texts.append(text[:budget])
        budget -= len(texts[-1])
    facts.text = "\n".join(texts)
    for part in structure.walk():
        if part.parts or part.message is not None and not part.opaque:
            continue
        name = part.filename or ""
        if not name and part.type.lower() == b"text" and part.disposition != b"attachment":
            continue
        body = decode_transfer(raw[part.body_start : part.end], part.encoding)
        kind = sniff(body[:65536])
        members: tuple[ZipMember, ...] = ()
        encrypted = False
        if kind in ("zip", "ooxml", "jar"):
            listing = zip_members(body, limits.max_zip_members)
            members = listing.members
            encrypted = listing.encrypted
        facts.attachments.append(Attachment(name, part.content_type, kind, members, encrypted))
    return facts


# -- DLP --------------------------------------------------------------------------------------

_CN_ID = re.compile(
    r"(?<![0-9A-Za-z])([1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
    r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx])(?![0-9A-Za-z])"
)
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def cn_id_valid(number: str) -> bool:
    """True for an 18-character PRC identity card number whose check character is right."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _CN_WEIGHTS, strict=True))
    return _CN_CHECK[total % 11] == number[17].upper()


def cn_id_numbers(text: str) -> list[str]:
    """The valid PRC identity card numbers in ``text``."""
    return [m for m in _CN_ID.findall(text) if cn_id_valid(m)]


_CARD = re.compile(r"(?<![0-9])([0-9](?:[ -]?[0-9]){12,18})(?![0-9])")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a digit string."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_numbers(text: str) -> list[str]:
    """The payment card numbers (13-19 digits, Luhn-valid, not all one digit) in ``text``."""
    out = []
    for m in _CARD.findall(text):
        digits = re.sub(r"[ -]", "", m)
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits):
            out.append(digits)
    return out
