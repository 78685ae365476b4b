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
    # AUTH (RFC 4954) and submission policy
    AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
    AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
    AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
    AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode authentication response")
    AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
    AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
    AUTH_NEEDS_TLS = Reply(
        538, "5.7.11", "Encryption required for requested authentication mechanism"
    )
    STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
    AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
    SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
    FROM_NOT_OWNED = Reply(553, "5.7.1", "From header address not owned by authenticated user")
    NO_FROM = Reply(550, "5.6.0", "Message has no valid From header")
    RATE_LIMITED = Reply(450, "4.7.1", "Too many messages sent in the last hour, try later")
