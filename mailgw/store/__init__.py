"""Mailbox store: the IMessageStore facade and its tier-1 Maildir++ backend.

``MessageStore`` (tier 1, Maildir++ with a per-user SQLite index) is the facade callers use;
a colder tier and change consumers (IMAP IDLE, mirror sync via ``add_listener``) plug in
behind/around it without changing callers.
"""

from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from mailgw.store.maildirstore import (
    Mailbox,
    MailboxStatus,
    MessageInfo,
    MessageStore,
    is_disk_full,
)

__all__ = [
    "Mailbox",
    "MailboxNotFound",
    "MailboxStatus",
    "MessageInfo",
    "MessageStore",
    "QuotaExceeded",
    "is_disk_full",
]
