"""Mailbox store: the IMessageStore facade over the tier-1 Maildir++ backend and tier 2.

``MessageStore`` (``mailgw.store.facade``) is what callers use: per-user folders, quota,
listeners, tiering. Behind it, ``IMessageBackend`` (``backend``) is the seam to the tier-1
storage, ``MaildirBackend`` (``tier1``: Maildir++ with a per-user SQLite index), and
``Tier2Placement`` (``tier2``: blobs and manifests). Values live in ``mailgw.model``.
"""

from mailgw.interfaces import MailboxNotFound, QuotaExceeded
from mailgw.model.message import MailboxStatus, MessageInfo
from mailgw.store.facade import MessageStore
from mailgw.store.mailbox import Mailbox
from mailgw.store.rows import is_disk_full

__all__ = [
    "Mailbox",
    "MailboxNotFound",
    "MailboxStatus",
    "MessageInfo",
    "MessageStore",
    "QuotaExceeded",
    "is_disk_full",
]
