"""Modified UTF-7 (RFC 3501 5.1.3): the 7-bit encoding of mailbox names.

A plain text codec, shared by two users that do not import each other: IMAP, where it is
the wire form of mailbox names (``mailgw.imap.names``), and the store, where it is the
on-disk form of Maildir++ folder names (Dovecot's layout, ``mailgw.store.names``).
"""

from __future__ import annotations

import base64

__all__ = ["mutf7_decode", "mutf7_encode"]


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
