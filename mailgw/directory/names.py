"""Which local parts may name a mailbox (the subset of RFC 5321 dot-atoms mailgw accepts), and
which words may name a group.

A user's local part and an alias source are a dot-atom (RFC 5321 4.1.2; UTF-8 allowed as in
RFC 6531) of at most 64 octets, without ``/`` (atext allows it, but the local part names
the user's Maildir directory ``mail/DOMAIN/LOCAL``). The address parser already refuses
quoted local parts, empty atoms (``..``, a leading or trailing dot), spaces, control
characters and NUL; domains are LDH labels (IDNA A-labels) checked by
``mailgw.model.address.normalise_domain``.
"""

from __future__ import annotations

import re

from mailgw.model.address import MAX_LOCAL_PART

# Characters RFC 5322 atext allows that a mailbox local part may not hold here.
FORBIDDEN = frozenset("/")


def check_local_part(local: str) -> None:
    """ValueError (saying why) when ``local`` cannot name a mailbox."""
    if not local:
        raise ValueError("empty local part")
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        raise ValueError(f"local part longer than {MAX_LOCAL_PART} octets")
    for ch in local:
        if ch in FORBIDDEN:
            raise ValueError(f"{ch!r} is not allowed in a mailbox name")
        if ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) < 0xA0:
            raise ValueError("control characters are not allowed in a mailbox name")
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError("lone surrogates are not allowed in a mailbox name")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError("a mailbox name's dots must separate non-empty atoms")


_GROUP = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def group_name(name: str) -> str:
    """``name`` lower-cased; ValueError unless it is 1-64 letters, digits, ``.``, ``_`` or
    ``-``, a letter or digit first (``finance``, ``board.eu``)."""
    group = name.strip().lower()
    if not _GROUP.fullmatch(group):
        raise ValueError(
            f"bad group name {name!r} (1-64 letters, digits, . _ -; a letter or digit first)"
        )
    return group
