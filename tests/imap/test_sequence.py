"""Sequence sets: parsing, validation, resolution of huge ranges, UID-set formatting."""

from __future__ import annotations

import pytest

from mailgw.imap.sequence import (
    MAX_NUMBER,
    STAR,
    SequenceError,
    SequenceSet,
    contains,
    count,
    format_uid_set,
    iter_ranges,
    looks_like_sequence_set,
    merge_ranges,
    parse_sequence_set,
    resolve,
    select_uids,
)


def test_parse_mixed_set() -> None:
    s = parse_sequence_set("1,3:5,7:*,$")
    assert s.ranges == ((1, 1), (3, 5), (7, STAR))
    assert s.saved
    assert s.uses_star
    assert str(s) == "1,3:5,7:*,$"
    assert s.largest_number() == 7


def test_parse_bytes_and_star_star() -> None:
    s = parse_sequence_set(b"*:*")
    assert s == SequenceSet(((STAR, STAR),))
    assert resolve(s, 9) == [(9, 9)]
    assert str(s) == "*"
    assert parse_sequence_set("*").ranges == ((STAR, STAR),)


@pytest.mark.parametrize(
    "text",
    ["0", "0:5", "1:0", "4294967296", "1:4294967296", "", ",", "1,", ",1", "1:", ":1", "a",
     "1:2:3", "-1", "1.5", "01", "1 2", "¹", "99999999999999999999", "$"],
)  # fmt: skip
def test_invalid_sets(text: str) -> None:
    allow_saved = text != "$"
    with pytest.raises(SequenceError):
        parse_sequence_set(text, allow_saved=allow_saved)


def test_non_ascii_bytes_rejected() -> None:
    with pytest.raises(SequenceError):
        parse_sequence_set(b"1:\xff")


def test_max_number_accepted() -> None:
    assert parse_sequence_set("4294967295").ranges == ((MAX_NUMBER, MAX_NUMBER),)
    assert looks_like_sequence_set("1:*")
    assert not looks_like_sequence_set("ALL")


def test_resolve_huge_range_is_cheap() -> None:
    ranges = resolve(parse_sequence_set("1:4294967295"), MAX_NUMBER)
    assert ranges == [(1, MAX_NUMBER)]
    assert count(ranges) == MAX_NUMBER
    assert contains(ranges, 4000000000)
    assert not contains(ranges, 0)
    it = iter_ranges(ranges)
    assert [next(it) for _ in range(3)] == [1, 2, 3]


def test_resolve_star_with_empty_mailbox() -> None:
    assert resolve(parse_sequence_set("1:*"), 0) == []
    assert resolve(parse_sequence_set("*"), 0) == []


def test_resolve_reversed_merged_and_clipped() -> None:
    s = parse_sequence_set("5:3,4,9:*,2,20")
    assert resolve(s, 10) == [(2, 5), (9, 10)]
    # n:* with n beyond the maximum still names the maximum (reversed range)
    assert resolve(parse_sequence_set("50:*"), 10) == [(10, 10)]


def test_resolve_saved_result() -> None:
    s = parse_sequence_set("1,$")
    assert resolve(s, 10, saved=[(4, 6), (20, 30)]) == [(1, 1), (4, 6)]
    assert resolve(s, 10) == [(1, 1)]


def test_merge_and_contains() -> None:
    assert merge_ranges([(5, 6), (1, 2), (3, 4), (8, 9)]) == [(1, 6), (8, 9)]
    assert merge_ranges([(1, 10), (2, 3)]) == [(1, 10)]
    ranges = [(1, 6), (8, 9)]
    assert contains(ranges, 6) and contains(ranges, 8)
    assert not contains(ranges, 7) and not contains(ranges, 10)


def test_select_uids() -> None:
    uids = [3, 7, 8, 100, 4000000000]
    assert select_uids(parse_sequence_set("1:*"), uids) == uids
    assert select_uids(parse_sequence_set("8:100"), uids) == [8, 100]
    assert select_uids(parse_sequence_set("4000000001:*"), uids) == [4000000000]
    assert select_uids(parse_sequence_set("1:4294967295"), uids) == uids
    assert select_uids(parse_sequence_set("1:*"), []) == []


def test_format_uid_set() -> None:
    assert format_uid_set([1, 2, 3, 5]) == "1:3,5"
    assert format_uid_set([]) == ""
    assert format_uid_set([7]) == "7"
    assert format_uid_set([1, 3, 4, 5, 9, 10]) == "1,3:5,9:10"
    # order is kept (COPYUID pairs element by element)
    assert format_uid_set([5, 6, 1, 2]) == "5:6,1:2"
    assert format_uid_set(range(1, 1_000_001)) == "1:1000000"
