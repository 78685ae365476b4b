"""A bounded LRU cache of parsed message structures, keyed by an opaque message key.

The bound is in bytes: each entry is charged an estimate of the memory its structure holds
(every part and header field, with the header bytes it keeps a copy of), so a few messages
with huge headers cannot hold hundreds of megabytes the way a count bound let them. An
entry heavier than ``max_entry_bytes`` is parsed for its caller but never kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from mailgw.mime.structure import DEFAULT_LIMITS, Limits, MessageStructure, parse

__all__ = ["StructureCache", "structure_weight"]

# Measured with tracemalloc on CPython 3.11 (rounded up): a Part with its lists and
# header values it parsed, a HeaderField with its two bytes objects, a parameter, the
# MessageStructure itself.
_PART_COST = 1100
_FIELD_COST = 180
_PARAM_COST = 150  # a (name, value) tuple of bytes in a part's parameter lists
_STRUCTURE_COST = 200


def structure_weight(structure: MessageStructure) -> int:
    """An upper estimate of the bytes ``structure`` keeps alive."""
    total = _STRUCTURE_COST
    for part in structure.walk():
        total += _PART_COST
        for field in part.fields:
            total += _FIELD_COST + len(field.name) + len(field.value)
        for name, value in (*part.params, *part.disposition_params):
            total += _PARAM_COST + len(name) + len(value)
    return total


class StructureCache:
    """LRU mapping key -> MessageStructure holding at most ``max_bytes`` (estimated, see
    :func:`structure_weight`) and at most ``max_entries`` entries; a structure heavier than
    ``max_entry_bytes`` is not kept.

    Keys are opaque (e.g. ``(user, folder, uidvalidity, uid)`` or a store blob id); a key
    must name immutable bytes, since entries are never revalidated. ``discard`` and
    ``discard_if`` forget entries whose message is gone (expunged); ``demote_if`` puts
    entries first in line for eviction (a user who logged out).

    An entry may also keep the message's top-level header block (its bytes up to the body,
    ``get_or_parse(keep_header=True)``), counted in its weight: what an IMAP client's
    header FETCH asks for, answered without reading the message again (``get_header``).
    """

    def __init__(
        self,
        max_entries: int = 1024,
        limits: Limits = DEFAULT_LIMITS,
        max_bytes: int = 32 * 1024 * 1024,
        max_entry_bytes: int = 1024 * 1024,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_bytes < 1 or max_entry_bytes < 1:
            raise ValueError("max_bytes and max_entry_bytes must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.limits = limits
        self._entries: OrderedDict[Hashable, tuple[MessageStructure, int, bytes | None]] = (
            OrderedDict()
        )
        self.bytes = 0  # estimated bytes held by the entries
        self.hits = 0
        self.misses = 0
        self.refused = 0  # structures too heavy to keep

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> MessageStructure | None:
        """The cached structure for ``key`` (marking it recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def get_header(self, key: Hashable) -> tuple[MessageStructure, bytes] | None:
        """The cached structure for ``key`` and its header block, when the entry keeps one
        (marking it recently used); else None, not counted as a miss: the caller reads the
        message and asks ``get_or_parse``, which counts it."""
        entry = self._entries.get(key)
        if entry is None or entry[2] is None:
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0], entry[2]

    def put(self, key: Hashable, structure: MessageStructure, header: bytes | None = None) -> bool:
        """Store ``structure`` (and ``header``, its message's header block) under ``key``,
        evicting the least recently used entries to stay within the bounds; False (and
        nothing kept) when it alone is too heavy."""
        self.discard(key)
        weight = structure_weight(structure) + (len(header) if header is not None else 0)
        if weight > self.max_entry_bytes:
            self.refused += 1
            return False
        self._entries[key] = (structure, weight, header)
        self.bytes += weight
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _key, (_structure, dropped, _header) = self._entries.popitem(last=False)
            self.bytes -= dropped
        return True

    def get_or_parse(
        self, key: Hashable, raw: bytes, keep_header: bool = False
    ) -> MessageStructure:
        """The cached structure for ``key``, parsing ``raw`` and caching it on a miss; with
        ``keep_header`` the entry keeps ``raw``'s header block too (added to an entry that
        has none)."""
        entry = self._entries.get(key)
        if entry is not None and (not keep_header or entry[2] is not None):
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]
        if entry is None:
            self.misses += 1
            structure = parse(raw, self.limits)
        else:
            structure = entry[0]  # kept without its header: add it
        header = None
        if keep_header:
            root = structure.root
            header = raw[: root.body_start]  # offsets stay those of the message
        self.put(key, structure, header)
        return structure

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (e.g. after expunge); absent keys are ignored."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def demote_if(self, predicate: Callable[[Hashable], bool]) -> int:
        """Make every entry whose key satisfies ``predicate`` the least recently used (the
        first to go when room is needed), keeping their order; returns how many."""
        chosen = [key for key in self._entries if predicate(key)]
        for key in reversed(chosen):
            self._entries.move_to_end(key, last=False)
        return len(chosen)

    def discard_if(self, predicate: Callable[[Hashable], bool]) -> int:
        """Forget every entry whose key satisfies ``predicate``; returns how many."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            self.discard(key)
        return len(doomed)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0
