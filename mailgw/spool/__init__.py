"""Durable message queue: incoming/active/deferred/hold/corrupt, every state change a rename."""

from mailgw.spool.queueid import QueueIdGenerator, is_queue_id
from mailgw.spool.spool import (
    CorruptEnvelope,
    IncomingMessage,
    QueuedMessage,
    Spool,
    decode_envelope,
    encode_envelope,
)

__all__ = [
    "CorruptEnvelope",
    "IncomingMessage",
    "QueueIdGenerator",
    "QueuedMessage",
    "Spool",
    "decode_envelope",
    "encode_envelope",
    "is_queue_id",
]
