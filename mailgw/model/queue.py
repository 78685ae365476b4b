"""A message committed to the spool, as ``ISpool.load`` returns it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from mailgw.model.envelope import Envelope


@dataclass(frozen=True)
class QueuedMessage:
    """A committed message as found in the spool.

    The message bytes are those of ``content_path`` from ``content_offset`` to the end of
    the file (the spool may keep the envelope in the same file, before the content): read
    them with ``open_content`` or seek to the offset, never from the start of the file.
    """

    queue_id: str
    state: str
    envelope: Envelope
    content_path: str
    content_offset: int = 0

    def open_content(self) -> BinaryIO:
        """The content file opened for reading, positioned at the message's first byte."""
        f = open(self.content_path, "rb")  # noqa: SIM115
        if self.content_offset:
            try:
                f.seek(self.content_offset)
            except BaseException:
                f.close()
                raise
        return f

    def content_size(self) -> int:
        """Size of the message bytes (the file's size less ``content_offset``)."""
        return os.path.getsize(self.content_path) - self.content_offset
