"""A mailbox owner as the directory returns it (``IDirectory.get_user``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    """A mailbox owner. ``quota``: bytes, None = the default quota applies, 0 = unlimited."""

    name: str
    quota: int | None
    enabled: bool
