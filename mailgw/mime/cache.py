"""A bounded LRU cache of parsed message structures, keyed by an opaque message key."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from mailgw.mime.structure import DEFAULT_LIMITS, Limits, MessageStructure, parse

__all__ = ["StructureCache"]


class StructureCache:
    """LRU mapping key -> MessageStructure holding at most ``max_entries`` entries.

    Keys are opaque (e.g. ``(mailbox_id, uid)`` or a store blob id); a key must name
    immutable bytes, since entries are never revalidated.
    """

    def __init__(self, max_entries: int = 1024, limits: Limits = DEFAULT_LIMITS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.limits = limits
        self._entries: OrderedDict[Hashable, MessageStructure] = OrderedDict()
        self.hits = 0
        self.misses = 0

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
        return entry

    def put(self, key: Hashable, structure: MessageStructure) -> None:
        """Store ``structure`` under ``key``, evicting the least recently used entry."""
        self._entries[key] = structure
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get_or_parse(self, key: Hashable, raw: bytes) -> MessageStructure:
        """The cached structure for ``key``, parsing ``raw`` and caching it on a miss."""
        entry = self.get(key)
        if entry is None:
            entry = parse(raw, self.limits)
            self.put(key, entry)
        return entry

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (e.g. after expunge); absent keys are ignored."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
