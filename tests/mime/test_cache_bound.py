"""The parsed-message cache is bounded in bytes (issue 10): its own accounting stays under the
bound, heavy structures are not kept, and its estimate is not below what the memory holds."""

from __future__ import annotations

import tracemalloc

import pytest

from mailgw.mime import StructureCache, parse
from mailgw.mime.cache import structure_weight

SIMPLE = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: hello\r\n\r\nbody\r\n"


def folded(size: int) -> bytes:
    """A message whose Subject is folded over ``size`` bytes (the MX accepts such headers)."""
    line = b" " + b"x" * 70 + b"\r\n"
    return b"From: a@x.test\r\nSubject: start\r\n" + line * (size // len(line)) + b"\r\nbody\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        SIMPLE,
        folded(200_000),
        b"".join(b"X-H%d: value %d\r\n" % (i, i) for i in range(2000)) + b"\r\nbody",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"".join(
            b"--b\r\nContent-Type: text/plain; charset=utf-8; name=a%d\r\n"
            b"Content-Disposition: attachment; filename=a%d.txt\r\n\r\nhi\r\n" % (i, i)
            for i in range(300)
        )
        + b"--b--\r\n",
    ],
    ids=["simple", "folded", "many-fields", "many-parts"],
)
def test_weight_is_an_upper_estimate(raw: bytes) -> None:
    tracemalloc.start()
    try:
        structure = parse(raw)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    weight = structure_weight(structure)
    assert held <= weight <= 2 * held + 4096, (held, weight)


def test_byte_bound_evicts_least_recently_used() -> None:
    cache = StructureCache(max_entries=10_000, max_bytes=200_000, max_entry_bytes=100_000)
    structures = [parse(folded(30_000)) for _ in range(20)]
    weight = structure_weight(structures[0])
    for i, s in enumerate(structures):
        assert cache.put(("alice", "INBOX", 1, i), s)
        assert cache.bytes <= cache.max_bytes
        if i == 1:
            cache.get(("alice", "INBOX", 1, 0))  # 0 is now more recent than 1
    kept = cache.max_bytes // weight
    assert len(cache) == kept
    assert cache.bytes == kept * weight
    assert ("alice", "INBOX", 1, 19) in cache
    assert ("alice", "INBOX", 1, 1) not in cache


def test_heavy_structures_are_parsed_but_not_kept() -> None:
    # The case: MX messages with huge folded headers and one FETCH 1:* ENVELOPE.
    cache = StructureCache(max_entries=4096, max_bytes=32 << 20, max_entry_bytes=1 << 20)
    raw = folded(2_000_000)
    for uid in range(1, 21):
        structure = cache.get_or_parse(("alice", "INBOX", 1, uid), raw)
        assert structure.header(
            "Subject",
        ).startswith(b"start")  # type: ignore[union-attr]
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.refused == 20
    # an ordinary message is kept
    cache.get_or_parse(("alice", "INBOX", 1, 21), SIMPLE)
    assert ("alice", "INBOX", 1, 21) in cache
    assert cache.bytes == structure_weight(parse(SIMPLE))


def test_discard_and_discard_if_keep_the_accounting() -> None:
    cache = StructureCache(max_entries=100, max_bytes=1 << 20)
    for user in ("alice", "bob"):
        for uid in range(5):
            cache.put((user, "INBOX", 1, uid), parse(SIMPLE))
    one = structure_weight(parse(SIMPLE))
    assert cache.bytes == 10 * one
    cache.discard(("alice", "INBOX", 1, 0))
    cache.discard(("alice", "INBOX", 1, 0))  # twice: no effect
    assert cache.bytes == 9 * one
    assert cache.discard_if(lambda key: key[0] == "bob") == 5  # type: ignore[index]
    assert cache.bytes == 4 * one and len(cache) == 4
    cache.put(("alice", "INBOX", 1, 1), parse(SIMPLE))  # replacing is not counted twice
    assert cache.bytes == 4 * one
    cache.clear()
    assert cache.bytes == 0


def test_invalid_bounds() -> None:
    with pytest.raises(ValueError):
        StructureCache(max_bytes=0)
    with pytest.raises(ValueError):
        StructureCache(max_entry_bytes=0)


def test_a_kept_header_block_is_weighed_and_served() -> None:
    cache = StructureCache()
    raw = SIMPLE
    structure = cache.get_or_parse("k", raw)
    assert cache.get_header("k") is None  # parsed for a structure only: no header kept
    without = cache.bytes
    again = cache.get_or_parse("k", raw, keep_header=True)  # the same entry gains it
    assert again is structure and len(cache) == 1
    header = raw[: raw.index(b"\r\n\r\n") + 4]
    assert cache.get_header("k") == (structure, header)
    assert cache.bytes == without + len(header)
    cache.discard("k")
    assert cache.bytes == 0 and cache.get_header("k") is None


def test_a_header_block_counts_toward_the_bounds() -> None:
    raw = folded(50_000)
    structure_only = structure_weight(parse(raw))
    cache = StructureCache(max_entry_bytes=structure_only + 1000)
    cache.get_or_parse("big", raw, keep_header=True)  # with its 50 KB header: too heavy
    assert "big" not in cache and cache.refused == 1
    cache.get_or_parse("big", raw)  # the structure alone fits
    assert "big" in cache and cache.get_header("big") is None
    bounded = StructureCache(max_bytes=3 * len(raw))
    for n in range(10):
        bounded.get_or_parse(n, raw, keep_header=True)
    assert bounded.bytes <= 3 * len(raw) and len(bounded) < 10


def test_demoted_entries_are_evicted_first_and_keep_their_order() -> None:
    raw = SIMPLE
    weight = structure_weight(parse(raw))
    cache = StructureCache(max_bytes=weight * 4)
    for key in ("a1", "b1", "a2", "b2"):
        cache.get_or_parse(key, raw)
    assert cache.demote_if(lambda key: str(key).startswith("b")) == 2
    assert list(cache._entries) == ["b1", "b2", "a1", "a2"]
    cache.get_or_parse("c1", raw)  # room for one more: the first demoted goes
    assert list(cache._entries) == ["b2", "a1", "a2", "c1"]
    assert cache.bytes <= weight * 4
