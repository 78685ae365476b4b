"""Mailbox names on the IMAP wire: modified UTF-7 (RFC 3501 5.1.3), or UTF-8 once the client
enabled UTF8=ACCEPT (RFC 6855) or IMAP4rev2 (RFC 9051 5.1); ``INBOX`` in any case.

The store names folders in Unicode (``Entwürfe``); this is the one place that turns such a
name into what the client sends and receives. Quoting (atom, quoted string, literal) is
``wire.mailbox_name``'s; the mUTF-7 codec itself is ``mailgw.model.mutf7`` (the store uses
it too, for its on-disk names).
"""

from __future__ import annotations

import unicodedata

from mailgw.model.mutf7 import mutf7_decode, mutf7_encode

__all__ = ["InvalidName", "from_wire", "to_wire"]

INBOX = "INBOX"


class InvalidName(ValueError):
    """Octets that cannot be a mailbox name in the session's encoding (a NO, not a BAD:
    the argument is well-formed, it names no possible mailbox)."""


def to_wire(name: str, utf8: bool = False) -> bytes:
    """The octets of ``name`` on the wire, before quoting: ``INBOX``, UTF-8 when ``utf8``,
    else modified UTF-7 (7-bit ASCII)."""
    if name.upper() == INBOX:
        return b"INBOX"
    if utf8:
        return name.encode("utf-8")
    return mutf7_encode(name).encode("ascii")


def from_wire(raw: bytes, utf8: bool = False) -> str:
    """A mailbox name as sent; ``INBOX`` (and an ``INBOX/`` prefix) in any case becomes
    ``INBOX``. With ``utf8`` the name is taken in Unicode normalisation form C.
    :class:`InvalidName` when the octets are not valid in the session's encoding."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidName("Mailbox name is not valid UTF-8") from e
    if utf8:
        # RFC 9051 5.1 / RFC 6855 3: names are Net-Unicode; a de-normalised one is taken
        # in Unicode normalisation form C.
        text = unicodedata.normalize("NFC", text)
    else:
        if not text.isascii():
            raise InvalidName("Mailbox name is not valid mUTF-7 (8-bit data sent)")
        try:
            text = mutf7_decode(text)
        except ValueError as e:
            raise InvalidName("Mailbox name is not valid mUTF-7") from e
    if text.upper() == INBOX:
        return INBOX
    if text[:6].upper() == "INBOX/":
        return INBOX + text[5:]
    return text
