"""Mailbox-level commands' data: LIST/LSUB lines (CHILDREN, SPECIAL-USE), STATUS values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mailgw.imap import wire
from mailgw.imap.parser import ListMailboxes
from mailgw.imap.wire import compile_list_pattern

DELIMITER = "/"
CHILDINFO = b'("CHILDINFO" ("SUBSCRIBED"))'
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


def special_use(name: str) -> str | None:
    """The RFC 6154 attribute of a default folder (by name), or None."""
    return SPECIAL_USE.get(name)


def list_lines(
    command: ListMailboxes,
    names: list[str],
    subscribed: set[str],
    lsub: bool = False,
    utf8: bool = False,
    status: Any = None,
) -> list[bytes]:
    """The untagged LIST (or LSUB) responses for ``command`` over the existing mailboxes
    ``names``. ``status(name)`` returns the STATUS response of a mailbox for LIST-STATUS."""
    verb = b"LSUB" if lsub else b"LIST"
    if command.patterns == ("",) and not command.extended:
        # RFC 3501 6.3.8: the hierarchy delimiter and the root name of the reference.
        root = command.reference.split(DELIMITER, 1)[0] + DELIMITER if command.reference else ""
        return [wire.untagged(verb, b"(\\Noselect)", wire.quote(DELIMITER), wire.quote(root))]
    matchers = [compile_list_pattern(command.reference, pat, DELIMITER) for pat in command.patterns]

    def matches(name: str) -> bool:
        return any(m(name) for m in matchers)

    existing = set(names)
    parents = _parents(names)
    selection = command.selection
    returns = command.returns
    only_subscribed = "SUBSCRIBED" in selection or lsub
    only_special = "SPECIAL-USE" in selection
    recursive = "RECURSIVEMATCH" in selection and not lsub
    pool = existing | parents
    if only_subscribed:
        # RFC 3501 6.3.9 / RFC 5258 3.1: subscribed names are listed even when the mailbox
        # no longer exists; their parents may stand in for descendants (below).
        pool |= subscribed | _parents(subscribed)
    candidates = sorted(pool, key=lambda n: (n != "INBOX", n))
    out: list[bytes] = []
    for name in candidates:
        if not matches(name):
            continue
        attrs: list[str] = []
        extra = b""
        if only_subscribed and name not in subscribed:
            # Not selected itself: a parent of subscribed names. LSUB shows it as \Noselect
            # when `%` hides a subscribed descendant (RFC 3501 6.3.9); LIST (SUBSCRIBED
            # RECURSIVEMATCH) shows it with CHILDINFO (RFC 5258 3.5) in the same case.
            hidden = _hidden_descendant(name, subscribed, matches)
            if lsub and hidden:
                attrs.append("\\Noselect")
            elif recursive and hidden:
                extra = CHILDINFO
                if name not in existing:
                    attrs.append("\\NonExistent")
            else:
                continue
        elif name not in existing:
            if only_special:
                continue
            if not only_subscribed:
                # A hierarchy level implied by existing children (RFC 3501 6.3.8): \Noselect,
                # also in extended LIST; \NonExistent is for names kept by a selection option.
                attrs.append("\\Noselect")
            elif not lsub:
                attrs.append("\\NonExistent")
        elif recursive and only_subscribed and _hidden_descendant(name, subscribed, matches):
            extra = CHILDINFO
        use = special_use(name) if name in existing else None
        if only_special and use is None:
            continue
        if not lsub:
            attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        if ("SUBSCRIBED" in selection or "SUBSCRIBED" in returns) and name in subscribed:
            attrs.append("\\Subscribed")
        if use is not None and not lsub:
            attrs.append(use)
        out.append(
            wire.untagged(
                verb,
                wire.flag_list(attrs),
                wire.quote(DELIMITER),
                wire.mailbox_name(name, utf8),
                *((extra,) if extra else ()),
            )
        )
        if status is not None and "STATUS" in returns and name in existing:
            line = status(name)
            if line:
                out.append(line)
    return out


def _parents(names: Iterable[str]) -> set[str]:
    """Every proper ancestor of ``names`` (``a`` and ``a/b`` for ``a/b/c``)."""
    parents: set[str] = set()
    for name in names:
        parts = name.split(DELIMITER)
        for i in range(1, len(parts)):
            parents.add(DELIMITER.join(parts[:i]))
    return parents


def _hidden_descendant(name: str, subscribed: set[str], matches: Any) -> bool:
    """Whether a subscribed descendant of ``name`` is not matched by the patterns."""
    prefix = name + DELIMITER
    return any(s.startswith(prefix) and not matches(s) for s in subscribed)


def status_values(mailbox: Any, items: Iterable[str], recent: int) -> list[tuple[str, int]]:
    """``(item, value)`` pairs for STATUS from an opened store mailbox."""
    messages = mailbox.messages()
    out: list[tuple[str, int]] = []
    for item in items:
        if item == "MESSAGES":
            out.append((item, len(messages)))
        elif item == "RECENT":
            out.append((item, recent))
        elif item == "UIDNEXT":
            out.append((item, int(mailbox.uidnext)))
        elif item == "UIDVALIDITY":
            out.append((item, int(mailbox.uidvalidity)))
        elif item == "UNSEEN":
            out.append((item, sum(1 for m in messages if "\\Seen" not in m.flags)))
        elif item == "HIGHESTMODSEQ":
            out.append((item, int(mailbox.highestmodseq)))
        elif item == "SIZE":
            out.append((item, sum(m.size for m in messages)))
        elif item == "DELETED":
            out.append((item, sum(1 for m in messages if "\\Deleted" in m.flags)))
    return out


def status_line(name: str, values: list[tuple[str, int]], utf8: bool = False) -> bytes:
    return wire.untagged(
        b"STATUS",
        wire.mailbox_name(name, utf8),
        wire.plist(b"%s %d" % (k.encode("ascii"), v) for k, v in values),
    )


def select_list_line(name: str, names: Iterable[str], utf8: bool = False) -> bytes:
    """The ``* LIST (attributes) "/" name`` response an IMAP4rev2 SELECT/EXAMINE sends for
    the selected mailbox (RFC 9051 6.3.2): child and special-use attributes as LIST gives."""
    attrs = ["\\HasChildren" if name in _parents(names) else "\\HasNoChildren"]
    use = special_use(name)
    if use is not None:
        attrs.append(use)
    return wire.untagged(
        b"LIST", wire.flag_list(attrs), wire.quote(DELIMITER), wire.mailbox_name(name, utf8)
    )
