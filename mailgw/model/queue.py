"""A message committed to the spool, as ``ISpool.load`` returns it."""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.model.envelope import Envelope


@dataclass(frozen=True)
class QueuedMessage:
    """A committed message as found in the spool."""

    queue_id: str
    state: str
    envelope: Envelope
    content_path: str
