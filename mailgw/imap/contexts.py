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


def removals(
    context: SearchContext, now: Sequence[int], number_of: Callable[[int], int]
) -> tuple[bytes | None, set[int]]:
    """The ``REMOVEFROM`` line for the messages of ``context`` no longer in ``now`` (the new
    result), numbered with ``number_of`` (the client's numbering before this update), and
    the UIDs removed. Sort positions are given from the last to the first, so each is the
    position at the moment it is removed."""
    current = set(now)
    gone = [(i, u) for i, u in enumerate(context.uids) if u not in current]
    if not gone:
        return None, set()
    if context.criteria is None:
        items = b"0 " + format_uid_set(sorted(number_of(u) for _i, u in gone)).encode("ascii")
    else:
        items = b" ".join(b"%d %d" % (i + 1, number_of(u)) for i, u in reversed(gone))
    return _line(context, b"REMOVEFROM", items), {u for _i, u in gone}


def additions(
    context: SearchContext, now: Sequence[int], number_of: Callable[[int], int]
) -> bytes | None:
    """The ``ADDTO`` line for the messages of ``now`` that were not in the result; sort
    positions ascending, each the message's position once it is inserted."""
    before = set(context.uids)
    new = [(i, u) for i, u in enumerate(now) if u not in before]
    if not new:
        return None
    if context.criteria is None:
        items = b"0 " + format_uid_set(sorted(number_of(u) for _i, u in new)).encode("ascii")
    else:
        items = b" ".join(b"%d %d" % (i + 1, number_of(u)) for i, u in new)
    return _line(context, b"ADDTO", items)


def _line(context: SearchContext, what: bytes, items: bytes) -> bytes:
    head = b"* ESEARCH (TAG " + wire.quote(context.tag) + b")"
    if context.uid:
        head += b" UID"
    return head + b" " + what + b" (" + items + b")\r\n"
