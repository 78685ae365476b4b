"""Plain values shared by every layer: addresses, envelopes, replies, users, queued
messages, store messages and blob references."""

from mailgw.model.address import Address, AddressError, parse_path
from mailgw.model.blob import BlobRef
from mailgw.model.envelope import Envelope
from mailgw.model.message import MailboxStatus, MessageInfo, StoreCheck
from mailgw.model.queue import QueuedMessage
from mailgw.model.reply import Reply
from mailgw.model.user import User

__all__ = [
    "Address",
    "AddressError",
    "BlobRef",
    "Envelope",
    "MailboxStatus",
    "MessageInfo",
    "QueuedMessage",
    "Reply",
    "StoreCheck",
    "User",
    "parse_path",
]
