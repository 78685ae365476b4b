"""The "Spam" / "Not spam" buttons' hook into the reputation service: the message is found
by the queue ID our own ``Received`` field gave it (``by HOST (mailgw) with ... id QID``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from mailgw.mime import header_values, parse
from mailgw.mime.headers import unfold

log = Logger(namespace="mailgw.webmail")

_OUR_ID = re.compile(rb"\(mailgw\)\s+with\s+\S+\s+id\s+([0-9A-Za-z]+)")


def queue_id_of(raw: bytes) -> str | None:
    """The queue ID of the first (newest) ``Received`` field a mailgw node added, or None."""
    for value in header_values(parse(raw[: 256 * 1024]), "Received"):
        m = _OUR_ID.search(unfold(value))
        if m is not None:
            return m.group(1).decode("ascii")
    return None


def reputation_hook(service: Any) -> Callable[[str, bytes, bool], Any]:
    """``report_spam(user, raw, is_spam)`` calling ``service.report(queue_id, "spam"|"ham")``
    (the reputation service's report, as ``mailgw report spam|ham`` does); a message without
    a queue ID of ours (it did not come through this system) is only logged."""

    def report(user: str, raw: bytes, spam: bool) -> Any:
        kind = "spam" if spam else "ham"
        queue_id = queue_id_of(raw)
        if queue_id is None:
            log.info("webmail: {user} reported {kind}: no queue ID to report", user=user, kind=kind)
            return None
        log.info("webmail: {user} reported {qid} as {kind}", user=user, qid=queue_id, kind=kind)
        return service.report(queue_id, kind)

    return report
