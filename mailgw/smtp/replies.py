"""SMTP replies the server needs that are not (yet) in the shared catalogue ``mailgw.model.reply.R``."""

from __future__ import annotations

from mailgw.model.reply import Reply


class SR:
    """Server-side replies local to ``mailgw.smtp`` (candidates for the shared catalogue)."""

    TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
    TOO_MANY_CONNECTIONS_FROM_IP = Reply(
        421, "4.7.0", "Too many connections from your address, try again later"
    )
    TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "MAIL transaction in progress")
