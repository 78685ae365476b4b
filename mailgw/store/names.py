"""Mailbox and user names: validation and their Maildir++ paths.

Folder names are IMAP style (``/`` separates levels, ``INBOX`` is case-insensitive). On disk a
folder ``Archive/2024`` is the Maildir++ directory ``.Archive.2024`` and every level is stored in
IMAP modified UTF-7 (RFC 3501 5.1.3, the codec in ``mailgw.model.mutf7``), as Dovecot does
by default, so ``Entwürfe`` is ``.Entw&APw-rfe``.
"""

from __future__ import annotations

import os

from mailgw.interfaces import InvalidMailbox
from mailgw.model.mutf7 import mutf7_decode, mutf7_encode

MAX_NAME_BYTES = 255
INBOX = "INBOX"
SEPARATOR = "/"

# '.' is the Maildir++ level separator on disk; '%' and '*' are IMAP LIST wildcards.
_FORBIDDEN_CHARS = frozenset(".%*")


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
