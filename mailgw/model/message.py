"""Values of the mailbox store: a message of a folder, a folder's STATUS counters and the
report of a store check. Plain data, shared by the store, IMAP, POP3 and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a folder. ``filename`` is the path relative to the folder's directory
    (``new/<name>`` or ``cur/<name>:2,<letters>``); ``size`` is the message's byte size (the
    logical size, whatever the tier). ``blob`` is None for a message in tier 1 (its Maildir
    file), else its tier-2 reference (``<header sha256>:<header size>+<body sha256>``, or
    one sha256 for a message stored whole, see ``mailgw.store.blobs``) and ``filename`` is
    only the name it had in tier 1. ``internaldate`` is the instant (UTC epoch seconds) and
    ``internaldate_tz`` the zone it was given in, in minutes east of UTC (RFC 3501 keeps the
    zone of an APPEND's date-time; a delivery gets the server's zone)."""

    uid: int
    size: int
    flags: frozenset[str]
    internaldate: float
    modseq: int
    filename: str
    blob: str | None = None
    internaldate_tz: int = 0


@dataclass(frozen=True)
class MailboxStatus:
    """What IMAP STATUS reports of a folder, computed from the index alone. ``recent`` counts
    the messages no session has claimed as ``\\Recent`` yet (UIDs above the folder's claim
    mark, see ``mailgw.store.Mailbox.claim_recent``); ``size`` is the sum of the messages'
    sizes (RFC 8438 STATUS=SIZE)."""

    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int
    size: int


@dataclass
class StoreCheck:
    """What ``mailgw.store.MessageStore.check`` found: index rows whose Maildir file is
    missing (user, folder, UID, file name), files the index does not know (user, folder,
    file), size mismatches (user, folder, UID, index size, file size), folders whose tier-2
    manifest is out of step with the index (user, folder); folders and messages checked,
    folders repaired."""

    folders: int = 0
    messages: int = 0
    repaired: int = 0
    missing: list[tuple[str, str, int, str]] = dataclasses.field(default_factory=list)
    unknown: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    size: list[tuple[str, str, int, int, int]] = dataclasses.field(default_factory=list)
    manifests: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unknown or self.size or self.manifests)
