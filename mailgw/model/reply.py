"""A protocol reply value (code, enhanced status, text) and the SMTP reply catalogue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP-style reply: 3-digit code, RFC 3463 enhanced status (may be empty), text."""

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def format(self, text: str | None = None) -> str:
        """Render as wire text (without CRLF); a multi-line text becomes a multi-line reply."""
        lines = (text if text is not None else self.text).split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip())
        return "\r\n".join(out)

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


class R:
    """The SMTP reply catalogue: every reply the server sends is defined here once."""

    # 2xx
    OK = Reply(250, "2.0.0", "OK")
    SENDER_OK = Reply(250, "2.1.0", "Sender OK")
    RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
    RESET_OK = Reply(250, "2.0.0", "Reset OK")
    QUEUED = Reply(250, "2.0.0", "OK queued as {queue_id}")
    BYE = Reply(221, "2.0.0", "Bye")
    VRFY_CANNOT = Reply(
        252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
    )
    HELP = Reply(214, "2.0.0", "See RFC 5321")
    READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
    START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
    # 4xx
    SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")
    IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
    SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
    TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
    COMMAND_TIMEOUT = Reply(421, "4.4.2", "Command not completed in time, closing connection")
    DATA_TOO_SLOW = Reply(421, "4.4.2", "Message data arriving too slowly, closing connection")
    IDLE_UNDER_LOAD = Reply(421, "4.7.0", "Server busy, idle session closed; try again later")
    LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
    TEMP_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary recipient lookup failure")
    TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
    TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
    # 5xx
    SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
    LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
    PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
    BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
    BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
    NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
    BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
    NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
    NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
    NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
    NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
    TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
    PARAM_NOT_RECOGNIZED = Reply(
        555, "5.5.4", "MAIL/RCPT parameter not recognized or not implemented"
    )
    UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
    RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
    RELAY_OFF = Reply(
        554, "5.7.1", "Relay access denied: this server does not send mail to other domains"
    )
    MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
    MESSAGE_TOO_BIG_DECLARED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
    SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "SMTPUTF8 address requires the SMTPUTF8 parameter")
    BARE_NEWLINE = Reply(521, "5.5.2", "Bare <CR> or <LF> received, closing connection")
    DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message has a line longer than {limit} bytes")
    NUL_IN_DATA = Reply(554, "5.6.0", "Message contains NUL bytes")
    EIGHTBIT_NOT_DECLARED = Reply(554, "5.6.1", "8-bit data without BODY=8BITMIME")
    TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
    # RFC 2920 3.1: message content sent before the 354 (Postfix's reject_unauth_pipelining)
    IMPROPER_PIPELINING = Reply(
        503, "5.5.0", "<DATA>: Data command rejected: Improper use of SMTP command pipelining"
    )
    IMPROPER_PIPELINING_BYE = Reply(221, "2.7.0", "Error: improper pipelining, closing connection")
    # Connection limits, STARTTLS during a transaction
    TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
    TOO_MANY_CONNECTIONS_FROM_IP = Reply(
        421, "4.7.0", "Too many connections from your address, try again later"
    )
    TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "MAIL transaction in progress")
    # AUTH (RFC 4954) and the submission policy
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
    HEADER_MALFORMED = Reply(
        550, "5.7.1", "Message header has a line that is not a header field (ambiguous)"
    )
    DUPLICATE_FROM = Reply(550, "5.7.1", "Message has more than one From header")
    DUPLICATE_SENDER = Reply(550, "5.7.1", "Message has more than one Sender header")
    DUPLICATE_REPLY_TO = Reply(550, "5.7.1", "Message has more than one Reply-To header")
    SENDER_HEADER_REQUIRED = Reply(
        550, "5.7.1", "From header has several addresses: a Sender header with yours is required"
    )
    SENDER_HEADER_INVALID = Reply(550, "5.7.1", "Sender header must hold exactly one address")
    SENDER_HEADER_NOT_OWNED = Reply(
        553, "5.7.1", "Sender header address not owned by authenticated user"
    )
    HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header size exceeds fixed limit")
    RATE_LIMITED = Reply(450, "4.7.1", "Too many messages sent in the last hour, try later")
