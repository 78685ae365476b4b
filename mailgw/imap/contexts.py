"""ESEARCH / ESORT result lines and live search contexts (RFC 4731, RFC 5267).

A SEARCH or SORT with ``RETURN (... UPDATE)`` leaves a :class:`SearchContext` behind: the
session re-evaluates it when the mailbox changed and tells the client what left and joined
the result with ``* ESEARCH (TAG "t") REMOVEFROM (...)`` / ``ADDTO (...)``. A SEARCH
context is unordered (position 0, as Dovecot sends); a SORT context gives each message's
position in the sorted result (CONTEXT=SORT), pairs processed from left to right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailgw.imap import wire
from mailgw.imap.parser import SearchKey
from mailgw.imap.sequence import format_uid_set

MAX_CONTEXTS = 32  # live contexts per selected mailbox; more get NOUPDATE


def esearch_line(
    tag: str,
    uid: bool,
    returns: Sequence[str],
    numbers: Sequence[int],
    modseq: int | None = None,
    partial: tuple[int, int] | None = None,
) -> bytes:
    """``* ESEARCH (TAG "t") [UID] MIN n MAX n ALL set PARTIAL (lo:hi set) COUNT n MODSEQ n``
    for a result in its order (ascending for SEARCH, sorted for SORT: MIN and MAX are the
    first and last of it, ALL keeps the order, RFC 5267 3.1/3.2)."""
    parts = [b"* ESEARCH (TAG " + wire.quote(tag) + b")"]
    if uid:
        parts.append(b"UID")
    if numbers:
        if "MIN" in returns:
            parts.append(b"MIN %d" % numbers[0])
        if "MAX" in returns:
            parts.append(b"MAX %d" % numbers[-1])
        if "ALL" in returns:
            parts.append(b"ALL " + format_uid_set(numbers).encode("ascii"))
    if partial is not None and "PARTIAL" in returns:
        lo, hi = partial
        window = numbers[lo - 1 : hi]
        found = format_uid_set(window).encode("ascii") if window else b"NIL"
        parts.append(b"PARTIAL (%d:%d " % (lo, hi) + found + b")")
    if "COUNT" in returns:
        parts.append(b"COUNT %d" % len(numbers))
    if modseq is not None and numbers:
        parts.append(b"MODSEQ %d" % modseq)
    return b" ".join(parts) + b"\r\n"


@dataclass(slots=True)
class SearchContext:
    """A live SEARCH (``criteria`` None) or SORT result: ``uids`` in result order."""

    tag: str
    key: SearchKey
    uid: bool
    criteria: tuple[tuple[str, bool], ...] | None
    uids: list[int] = field(default_factory=list)
    mark: tuple[int, int, int] | None = None  # the mailbox state it was last evaluated in


def update_lines(
    context: SearchContext,
    now: Sequence[int],
    exists: Callable[[int], bool],
    old_number: Callable[[int], int],
    new_number: Callable[[int], int],
) -> tuple[bytes | None, bytes | None]:
    """What changed in ``context``'s result (``now``, the new result as UIDs in order), as
    Dovecot sends it: a ``REMOVEFROM`` line for the expunged messages (numbered with
    ``old_number``: it goes before the EXPUNGE responses) and one line with ``REMOVEFROM``
    for the others and ``ADDTO`` (numbered with ``new_number``, after them). ``exists(uid)``
    tells whether a message is still in the mailbox. Sort positions (CONTEXT=SORT) are taken
    in order: removals from the last position to the first, then additions from the first
    to the last, each position valid at the moment its pair is applied."""
    current = set(now)
    removed = [(i, u) for i, u in enumerate(context.uids) if u not in current]
    expunged = [(i, u) for i, u in removed if not exists(u)]
    before = None
    if expunged:
        before = _line(context, [(b"REMOVEFROM", _pairs(context, expunged, old_number, True))])
    gone = {u for _i, u in expunged}
    kept = [u for u in context.uids if u not in gone]
    others = [(i, u) for i, u in enumerate(kept) if u not in current]
    known = set(kept)
    added = [(i, u) for i, u in enumerate(now) if u not in known]
    parts = []
    if others:
        parts.append((b"REMOVEFROM", _pairs(context, others, new_number, True)))
    if added:
        parts.append((b"ADDTO", _pairs(context, added, new_number, False)))
    context.uids = list(now)
    return before, _line(context, parts) if parts else None


def _pairs(
    context: SearchContext,
    items: list[tuple[int, int]],
    number: Callable[[int], int],
    backwards: bool,
) -> bytes:
    if context.criteria is None:  # unordered: position 0 and one set
        return b"0 " + format_uid_set(sorted(number(u) for _i, u in items)).encode("ascii")
    ordered = reversed(items) if backwards else iter(items)
    return b" ".join(b"%d %d" % (i + 1, number(u)) for i, u in ordered)


def _line(context: SearchContext, parts: list[tuple[bytes, bytes]]) -> bytes:
    head = b"* ESEARCH (TAG " + wire.quote(context.tag) + b")"
    if context.uid:
        head += b" UID"
    body = b" ".join(what + b" (" + items + b")" for what, items in parts)
    return head + b" " + body + b"\r\n"
