"""One entry of the node's change journal (``mailgw.interfaces.IChangeLog``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Store changes (``user`` the mailbox owner, ``folder`` the folder).
MESSAGE_ADDED = "message.added"
"""A new message: payload uid, modseq, size, flags, internaldate, ``tz`` (the internal
date's zone, minutes east of UTC), and where its bytes are: ``file`` (the Maildir name below
the folder) or ``blob`` (a tier-2 reference)."""
MESSAGE_COPIED = "message.copied"
"""As ``message.added``, plus ``from`` (folder) and ``from_uid``: a copy of another message."""
MESSAGE_FLAGS = "message.flags"
"""Flags/keywords changed: payload ``modseq`` and ``changes`` [[uid, modseq, flags]]."""
MESSAGE_EXPUNGED = "message.expunged"
"""Messages removed: payload ``uids``, ``modseq``."""
MESSAGE_MOVED = "message.moved"
"""Messages moved out of ``folder`` into payload ``to``: ``uids`` [[old uid, new uid]],
``modseqs`` (each one's modseq in ``to``), ``modseq`` and ``to_modseq`` (the two folders'
new HIGHESTMODSEQ)."""
MAILBOX_CREATED = "mailbox.created"
"""A folder appeared: payload ``uidvalidity``, ``subscribed``; ``found`` when it was not made
by CREATE (a new user's folders, a folder made on disk by another program, a rebuilt index)."""
MAILBOX_DELETED = "mailbox.deleted"
MAILBOX_RENAMED = "mailbox.renamed"
"""``folder`` is the new name, payload ``from`` the old one (one entry per folder moved)."""
MAILBOX_SUBSCRIBED = "mailbox.subscribed"
"""Payload ``subscribed`` true or false; the folder need not exist."""
MAILBOX_RESYNCED = "mailbox.resynced"
"""The index was repaired from the folder's files (changed by another program or a crash):
payload ``added`` [[uid, file]], ``removed`` [uids], ``changed`` [[uid, flags]], ``modseq``."""
TIER_MIGRATED = "tier.migrated"
"""A message moved to tier 2: payload ``uid``, ``blob``."""
TIER_PROMOTED = "tier.promoted"
"""A message moved back to tier 1: payload ``uid``, ``file``."""

# Directory changes (``folder`` is empty; ``user`` the user or alias source, or empty).
DOMAIN_ADDED = "domain.added"
DOMAIN_REMOVED = "domain.removed"
USER_CREATED = "user.created"
USER_CHANGED = "user.changed"
"""Payload says what: ``password`` true, or ``enabled``."""
USER_DELETED = "user.deleted"
QUOTA_CHANGED = "quota.changed"
"""Payload ``quota`` (bytes, None: the default)."""
ALIAS_ADDED = "alias.added"
ALIAS_REMOVED = "alias.removed"
GROUP_ADDED = "group.added"
"""Payload ``group``. Group changes are journaled with an empty ``user`` (groups belong to
no domain); replication ships the whole group table with each."""
GROUP_REMOVED = "group.removed"
"""Payload ``group``, ``members`` (how many it had)."""
GROUP_MEMBER_ADDED = "group.member_added"
"""Payload ``group``, ``member``."""
GROUP_MEMBER_REMOVED = "group.member_removed"
"""Payload ``group``, ``member``."""


_ONE_FOLDER = frozenset(
    (
        MESSAGE_ADDED,
        MESSAGE_COPIED,
        MESSAGE_FLAGS,
        MESSAGE_EXPUNGED,
        MAILBOX_RESYNCED,
        MAILBOX_DELETED,
    )
)


@dataclass(frozen=True)
class ChangeEntry:
    """A committed change: ``seq`` is the node-wide sequence number (strictly increasing in
    commit order across all processes of the node, with gaps where a transaction rolled
    back), ``time`` the Unix time of the change, ``pid`` the process that made it."""

    seq: int
    time: float
    kind: str
    user: str
    folder: str
    payload: Mapping[str, Any] = field(default_factory=dict, hash=False)
    pid: int = 0

    def folders(self) -> list[str]:
        """The folders whose contents or existence this change concerns, in the order a
        mailbox listener (IMAP IDLE) hears of them; empty for directory changes, tier moves,
        subscriptions and folders found rather than created."""
        kind = self.kind
        if kind in _ONE_FOLDER:
            return [self.folder]
        if kind == MESSAGE_MOVED:
            return [self.folder, str(self.payload["to"])]
        if kind == MAILBOX_CREATED:
            return [] if self.payload.get("found") else [self.folder]
        if kind == MAILBOX_RENAMED:
            return [str(self.payload["from"]), self.folder]
        return []
