"""Conversations: messages grouped by their Message-ID, In-Reply-To and References fields
(union of every ID a message names), as mail clients thread them."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


class _Union:
    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, x: Hashable) -> Hashable:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def group(items: Sequence[T], ids: Sequence[tuple[str, list[str]]]) -> list[list[T]]:
    """``items`` in conversations: ``ids[i]`` is item i's (Message-ID, referenced IDs).
    Items sharing any ID (directly or through others) are one conversation; an item without
    a Message-ID still joins the ones it references. Conversations keep the items' order
    and come in the order of their first item."""
    u = _Union()
    for i, (own, refs) in enumerate(ids):
        key: Hashable = own.lower() if own else ("item", i)
        u.find(key)
        for ref in refs:
            u.union(key, ref.lower())
    groups: dict[Hashable, list[T]] = {}
    for i, (own, _refs) in enumerate(ids):
        key = own.lower() if own else ("item", i)
        groups.setdefault(u.find(key), []).append(items[i])
    return list(groups.values())
