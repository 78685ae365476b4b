"""IMAP sequence sets (RFC 3501 9, RFC 5182 ``$``): parsing, resolution, UID-set formatting."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

MAX_NUMBER = 4294967295  # nz-number / uniqueid are 32-bit (RFC 3501 9)
STAR = 0  # marker for "*" inside a range: the largest number in use

# A resolved set: sorted, disjoint, non-adjacent inclusive ranges.
Ranges = list[tuple[int, int]]


class SequenceError(ValueError):
    """A sequence set that is not valid syntax (``0``, ``4294967296``, ``1:``, ``,``...)."""


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A parsed sequence set.

    ``ranges`` holds ``(low, high)`` pairs as written, each end a number or ``STAR`` (0) for
    ``*``; ``saved`` is true when the set contains ``$`` (the SEARCHRES saved result).
    """

    ranges: tuple[tuple[int, int], ...]
    saved: bool = False

    def __str__(self) -> str:
        def one(n: int) -> str:
            return "*" if n == STAR else str(n)

        parts = [one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges]
        if self.saved:
            parts.append("$")
        return ",".join(parts)

    @property
    def uses_star(self) -> bool:
        """True when ``*`` appears anywhere in the set."""
        return any(STAR in r for r in self.ranges)

    def largest_number(self) -> int:
        """The largest explicit number written (0 when there are none), for the
        "sequence number out of range" check a session does for message sequence numbers."""
        return max((n for r in self.ranges for n in r), default=0)


def _number(text: str, whole: str) -> int:
    if text == "*":
        return STAR
    if not text or not text.isascii() or not text.isdigit():
        raise SequenceError(f"invalid sequence set: {whole!r}")
    if text[0] == "0":
        raise SequenceError(f"sequence numbers start at 1: {whole!r}")
    if len(text) > 10 or int(text) > MAX_NUMBER:
        raise SequenceError(f"sequence number too large: {whole!r}")
    return int(text)


def parse_sequence_set(text: str | bytes, allow_saved: bool = True) -> SequenceSet:
    """Parse ``1,3:5,7:*,$``; SequenceError when invalid (``0``, over 4294967295, empty
    elements, ``$`` when ``allow_saved`` is false)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as e:
            raise SequenceError("sequence set is not ASCII") from e
    if not text or len(text) > 100_000:
        raise SequenceError("empty or oversized sequence set")
    ranges: list[tuple[int, int]] = []
    saved = False
    for element in text.split(","):
        if element == "$":
            if not allow_saved:
                raise SequenceError("$ is not allowed here")
            saved = True
            continue
        lo_text, colon, hi_text = element.partition(":")
        lo = _number(lo_text, text)
        hi = _number(hi_text, text) if colon else lo
        ranges.append((lo, hi))
    return SequenceSet(tuple(ranges), saved)


def looks_like_sequence_set(text: str) -> bool:
    """True when ``text`` parses as a sequence set (used to tell SEARCH keys from sets)."""
    try:
        parse_sequence_set(text)
    except SequenceError:
        return False
    return True


def merge_ranges(pairs: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and merge inclusive ``(low, high)`` pairs into disjoint, non-adjacent ranges."""
    out: Ranges = []
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def resolve(
    seqset: SequenceSet, max_value: int, saved: Iterable[tuple[int, int]] | None = None
) -> Ranges:
    """The set as disjoint inclusive ranges within ``1..max_value``.

    ``*`` stands for ``max_value`` (the highest sequence number, or the highest UID in use);
    ``b:a`` equals ``a:b``; numbers beyond ``max_value`` are dropped, so ``1:*`` with
    ``max_value`` 0 is empty. ``saved`` supplies the ranges ``$`` refers to (nothing when None).
    Costs O(k log k) in the number of elements written, never in the size of the ranges.
    """
    pairs: list[tuple[int, int]] = []
    for lo, hi in seqset.ranges:
        a = max_value if lo == STAR else lo
        b = max_value if hi == STAR else hi
        if a > b:
            a, b = b, a
        b = min(b, max_value)
        if a <= b and b >= 1:
            pairs.append((max(a, 1), b))
    if seqset.saved and saved is not None:
        pairs.extend((max(lo, 1), min(hi, max_value)) for lo, hi in saved if lo <= max_value)
    return merge_ranges(pairs)


def iter_ranges(ranges: Iterable[tuple[int, int]]) -> Iterator[int]:
    """Every number in ``ranges``, lazily."""
    for lo, hi in ranges:
        yield from range(lo, hi + 1)


def count(ranges: Iterable[tuple[int, int]]) -> int:
    """How many numbers ``ranges`` hold."""
    return sum(hi - lo + 1 for lo, hi in ranges)


def contains(ranges: Sequence[tuple[int, int]], value: int) -> bool:
    """Whether ``value`` is in the resolved, sorted ``ranges`` (binary search)."""
    i = bisect.bisect_right(ranges, (value, MAX_NUMBER + 1)) - 1
    return i >= 0 and ranges[i][0] <= value <= ranges[i][1]


def select_sorted(ranges: Iterable[tuple[int, int]], values: Sequence[int]) -> Iterator[int]:
    """The members of the sorted ``values`` (e.g. the UIDs of a mailbox) inside ``ranges``,
    in order; O(k log n + matches) however large the ranges are."""
    for lo, hi in ranges:
        start = bisect.bisect_left(values, lo)
        stop = bisect.bisect_right(values, hi)
        yield from values[start:stop]  # a slice: one copy, no index per value


def select_uids(seqset: SequenceSet, uids: Sequence[int], saved: Ranges | None = None) -> list[int]:
    """The UIDs of the sorted ``uids`` a UID set names: ``*`` is the highest UID in use, and
    ``n:*`` always includes it even when ``n`` is larger (RFC 3501 6.4.8)."""
    if not uids:
        return []
    return list(select_sorted(resolve(seqset, uids[-1], saved), uids))


def format_uid_set(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1:3,5"``: consecutive ascending runs become ranges, the order of
    ``uids`` is kept (COPYUID pairs source and destination sets element by element)."""
    parts: list[str] = []
    run_start: int | None = None
    prev = 0
    for uid in uids:
        if run_start is not None and uid == prev + 1:
            prev = uid
            continue
        if run_start is not None:
            parts.append(str(run_start) if run_start == prev else f"{run_start}:{prev}")
        run_start = prev = uid
    if run_start is not None:
        parts.append(str(run_start) if run_start == prev else f"{run_start}:{prev}")
    return ",".join(parts)
