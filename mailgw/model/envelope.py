"""The envelope of a queued message: who sent it, to whom, how it arrived."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Envelope:
    """SMTP envelope and arrival facts of one message.

    ``sender`` is the reverse-path without angle brackets ("" for the null sender);
    ``recipients`` are the forward-paths still to be delivered; ``done`` those delivered;
    ``attempts``/``next_attempt``/``last_error`` are updated by delivery on deferral;
    ``delay_warned`` once the sender has been told the message is delayed.

    What the policy decided (``mailgw.model.verdict``), kept with the queued message:
    ``message_class`` (e.g. ``spam``: the relay's ``[route:*] message_class``), ``channel``
    (the relay sends only through this channel), ``folder`` (local delivery stores into
    this folder of each recipient instead of INBOX, creating it when missing).
    """

    sender: str
    recipients: list[str]
    queue_id: str = ""
    received_at: float = field(default_factory=time.time)
    client_address: str = ""
    client_helo: str = ""
    protocol: str = "ESMTP"
    body_8bitmime: bool = False
    smtputf8: bool = False
    size: int = 0
    done: list[str] = field(default_factory=list)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    delay_warned: bool = False
    message_class: str = ""
    channel: str = ""
    folder: str = ""

    def to_json(self) -> dict[str, Any]:
        # what dataclasses.asdict gives (the lists copied), at a tenth of its cost: it runs
        # once per received message
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["recipients"] = list(self.recipients)
        data["done"] = list(self.done)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_FIELD_NAMES = tuple(f.name for f in fields(Envelope))
