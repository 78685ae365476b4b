"""A reference to a stored tier-2 blob (see ``mailgw.store.blobs``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: ``digest`` (sha256 hex of the logical bytes) and logical ``size``."""

    digest: str
    size: int

    def __str__(self) -> str:
        return self.digest
