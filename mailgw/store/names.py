"""Mailbox and user names: validation, IMAP modified UTF-7, and their Maildir++ paths.

Folder names are IMAP style (``/`` separates levels, ``INBOX`` is case-insensitive). On disk a
folder ``Archive/2024`` is the Maildir++ directory ``.Archive.2024`` and every level is stored in
IMAP modified UTF-7 (RFC 3501 5.1.3), as Dovecot does by default, so ``Entwürfe`` is
``.Entw&APw-rfe``.
"""

from __future__ import annotations

import base64
import os

from mailgw.interfaces import InvalidMailbox

MAX_NAME_BYTES = 255
INBOX = "INBOX"
SEPARATOR = "/"

# '.' is the Maildir++ level separator on disk; '%' and '*' are IMAP LIST wildcards.
_FORBIDDEN_CHARS = frozenset(".%*")


def mutf7_encode(text: str) -> str:
    """Encode ``text`` in IMAP modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(text: str) -> str:
    """Decode IMAP modified UTF-7; ValueError when ``text`` is not valid."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise ValueError(f"not modified UTF-7: {text!r}")
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError(f"unterminated modified UTF-7 shift: {text!r}")
        if end == i + 1:
            out.append("&")
        else:
            b64 = text[i + 1 : end].replace(",", "/")
            try:
                raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                out.append(raw.decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"bad modified UTF-7: {text!r}") from e
        i = end + 1
    return "".join(out)


def normalize_folder(name: str) -> str:
    """Validate an IMAP folder name and return its canonical form (``INBOX`` upper-cased).

    ValueError for: empty names, leading/trailing or doubled ``/``, NUL and control characters,
    ``.`` (the on-disk separator, so also ``..``), ``%`` and ``*``, more than 255 bytes of
    UTF-8, or an on-disk directory name over 255 bytes.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("empty mailbox name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValueError("mailbox name longer than 255 bytes")
    parts = name.split(SEPARATOR)
    if any(not p for p in parts):
        raise ValueError(f"mailbox name {name!r} has an empty level")
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F or ch in _FORBIDDEN_CHARS:
            raise ValueError(f"mailbox name {name!r} contains {ch!r}")
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError(f"mailbox name {name!r} contains a lone surrogate")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    canonical = SEPARATOR.join(parts)
    if len(folder_dirname(canonical)) > MAX_NAME_BYTES:
        raise ValueError(f"mailbox name {name!r} is too long on disk")
    return canonical


def folder_dirname(canonical: str) -> str:
    """Maildir++ directory name of a canonical folder name ("" for INBOX, the maildir root)."""
    if canonical == INBOX:
        return ""
    return "." + ".".join(mutf7_encode(p) for p in canonical.split(SEPARATOR))


def folder_from_dirname(entry: str) -> str | None:
    """Folder name of a Maildir++ directory entry (``.Sent`` -> ``Sent``), None if it is not
    one (``.``, ``..``, hidden files of other programs, undecodable or invalid names)."""
    if not entry.startswith(".") or entry in (".", ".."):
        return None
    try:
        name = SEPARATOR.join(mutf7_decode(p) for p in entry[1:].split("."))
        canonical = normalize_folder(name)
    except ValueError:
        return None
    if canonical == INBOX or folder_dirname(canonical) != entry:
        return None
    return canonical


def user_dir(root: str, user: str) -> str:
    """The maildir of ``local@domain``: ``root/domain/local`` (lower-cased). ValueError when
    the name has no ``@`` or a part is empty, hidden (leading ``.``) or holds ``/`` or NUL
    (``InvalidMailbox``, a ValueError)."""
    local, sep, domain = user.rpartition("@")
    if not sep:
        raise InvalidMailbox(f"user name {user!r} is not local@domain")
    for part in (local, domain):
        if not part or part.startswith(".") or "/" in part or "\x00" in part:
            raise InvalidMailbox(f"invalid user name {user!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidMailbox(f"user name {user!r} is too long")
    return os.path.join(root, domain.lower(), local.lower())
