"""The Prometheus message-flow counters, counted from the tracking events (default REGISTRY).

Served by whatever exposes ``prometheus_client.REGISTRY`` (the HTTP role's ``/metrics``).
Deliveries and relays count recipients (one message to three mailboxes: three deliveries);
``received``, ``bounced`` and ``deferred`` count messages (one event each).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter

from mailgw.tracking.events import Kind

RECEIVED = Counter(
    "mailgw_messages_received",
    "Messages accepted into the queue, by the role that took them (mx, submission, webmail,"
    " dsn: bounces this node wrote).",
    ["role"],
)
DELIVERED = Counter(
    "mailgw_messages_delivered",
    "Recipients delivered: to a local mailbox (role=delivery) or to a remote server (role=relay).",
    ["role"],
)
RELAYED = Counter(
    "mailgw_messages_relayed", "Recipients accepted by a remote server, by channel.", ["channel"]
)
DEFERRED = Counter(
    "mailgw_messages_deferred",
    "Messages deferred for a later try, by channel (local: local delivery).",
    ["channel"],
)
ATTEMPTS_FAILED = Counter(
    "mailgw_relay_attempts_failed",
    "Recipients a channel did not take (channel failure: tried on the next channel or"
    " deferred; or refused permanently), by channel.",
    ["channel"],
)
REJECTED = Counter(
    "mailgw_messages_rejected",
    "Transactions or recipients refused by a policy check, by role and stage.",
    ["role", "stage"],
)
BOUNCED = Counter("mailgw_messages_bounced", "Messages with recipients that failed permanently.")
EXPIRED = Counter("mailgw_messages_expired", "Messages given up after the maximum queue time.")
DELETED = Counter("mailgw_messages_deleted", "Messages deleted from the queue by an admin.")
VERDICTS = Counter(
    "mailgw_policy_verdicts",
    "Policy check verdicts on received messages, by check and verdict.",
    ["check", "verdict"],
)
EVENTS_DROPPED = Counter(
    "mailgw_tracking_events_dropped",
    "Tracking events not written (writer queue full, or the database failed).",
)

_children: dict[tuple[Any, ...], Any] = {}


def _child(counter: Counter, *labels: str) -> Any:
    key = (id(counter), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = counter.labels(*labels)
    return child


def count(kind: str, detail: Mapping[str, Any]) -> None:
    """Count one event of ``kind`` in the counters above."""
    if kind == Kind.RECEIVED:
        _child(RECEIVED, str(detail.get("role", "")) or "unknown").inc()
    elif kind == Kind.DELIVERED:
        _child(DELIVERED, "delivery").inc()
    elif kind == Kind.RELAYED:
        _child(DELIVERED, "relay").inc()
        _child(RELAYED, str(detail.get("channel", "")) or "direct").inc()
    elif kind == Kind.ATTEMPT:
        _child(ATTEMPTS_FAILED, str(detail.get("channel", "")) or "direct").inc()
    elif kind == Kind.DEFERRED:
        _child(DEFERRED, str(detail.get("channel", "")) or "local").inc()
    elif kind == Kind.REJECTED:
        _child(REJECTED, str(detail.get("role", "")), str(detail.get("stage", ""))).inc()
    elif kind == Kind.BOUNCED:
        BOUNCED.inc()
    elif kind == Kind.EXPIRED:
        EXPIRED.inc()
    elif kind == Kind.DELETED:
        DELETED.inc()
    elif kind == Kind.POLICY:
        for v in detail.get("verdicts", ()):
            _child(VERDICTS, str(v.get("check", "")), str(v.get("verdict", ""))).inc()
