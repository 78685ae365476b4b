"""RFC 3464 delivery status notifications (bounces and delay warnings) as message bytes.

The caller queues the DSN with the **null envelope sender** (``MAIL FROM:<>``) to the original
envelope sender, so that a DSN is never answered by another DSN; ``should_bounce`` is false for
a message that itself came from the null sender (never bounce a bounce).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate, make_msgid
from typing import NamedTuple

from mailgw.model import Envelope

MAX_ORIGINAL_HEADERS = 64 * 1024


class RecipientStatus(NamedTuple):
    """One recipient in a DSN: address, status (``5.1.1``), remote MTA host, SMTP diagnostic."""

    recipient: str
    status: str
    remote_mta: str = ""
    diagnostic: str = ""


def should_bounce(envelope: Envelope) -> bool:
    """False for the null sender: a failed bounce is dropped (logged), not bounced."""
    return envelope.sender.strip("<>") != ""


def original_headers(message: bytes) -> bytes:
    """The header section of ``message`` (up to the first empty line), CRLF line ends."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end != -1:
            message = message[:end]
            break
    message = message[:MAX_ORIGINAL_HEADERS]
    lines = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join(line + b"\r\n" for line in lines if line or lines == [b""])


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", "\n").split())


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def build_dsn(
    original: bytes,
    envelope: Envelope,
    failed: Sequence[RecipientStatus | tuple[str, str, str, str]],
    reporting_mta: str,
    kind: str = "failure",
    arrival_date: float | None = None,
    last_attempt_date: float | None = None,
    will_retry_until: float | None = None,
    now: float | None = None,
) -> bytes:
    """Build a multipart/report DSN for ``failed`` recipients of ``envelope``.

    ``original``: the original message or just its headers (only the headers are returned,
    as text/rfc822-headers). ``kind``: ``"failure"`` (Action: failed) or ``"delay"``
    (Action: delayed, with ``will_retry_until`` when given). ``reporting_mta``: our host name,
    also the From domain (``MAILER-DAEMON@reporting_mta``). Dates default to the envelope's
    arrival and ``now``.
    """
    if kind not in ("failure", "delay"):
        raise ValueError(f"kind must be failure or delay, not {kind!r}")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    arrival = envelope.received_at if arrival_date is None else arrival_date
    last_attempt = now if last_attempt_date is None else last_attempt_date
    statuses = [RecipientStatus(*f) for f in failed]
    boundary = f"{envelope.queue_id or 'dsn'}.{secrets.token_hex(8)}/{reporting_mta}"
    action = "failed" if kind == "failure" else "delayed"
    subject = (
        "Undelivered Mail Returned to Sender"
        if kind == "failure"
        else "Delayed Mail (still being retried)"
    )
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: {make_msgid('dsn', domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if kind == "failure":
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    else:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried"
            + (f" until {_date(will_retry_until)}." if will_retry_until else "."),
            "You do not need to send it again.",
        ]
    human = [*intro, ""]
    for s in statuses:
        where = f" (remote server {s.remote_mta})" if s.remote_mta else ""
        human.append(f"<{s.recipient}>{where}:")
        human.append(f"    {_one_line(s.diagnostic) or 'status ' + s.status}")
        human.append("")
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
    ]
    if envelope.queue_id:
        per_message.append(f"X-Mailgw-Queue-ID: {envelope.queue_id}")
    per_message.append(f"Arrival-Date: {_date(arrival)}")
    blocks = ["\r\n".join(per_message)]
    for s in statuses:
        fields = [
            f"Final-Recipient: {_address_type(s.recipient)}; {s.recipient}",
            f"Action: {action}",
            f"Status: {s.status}",
        ]
        if s.remote_mta:
            fields.append(f"Remote-MTA: dns; {s.remote_mta}")
        if s.diagnostic:
            fields.append(f"Diagnostic-Code: smtp; {_one_line(s.diagnostic)}")
        fields.append(f"Last-Attempt-Date: {_date(last_attempt)}")
        if kind == "delay" and will_retry_until:
            fields.append(f"Will-Retry-Until: {_date(will_retry_until)}")
        blocks.append("\r\n".join(fields))
    header_part = original_headers(original)
    human_text = "\r\n".join(human).encode("utf-8")
    body = [
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\n",
        b'Content-Type: text/plain; charset="utf-8"\r\n',
        f"Content-Transfer-Encoding: {_cte(human_text)}\r\n\r\n".encode(),
        human_text,
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        "\r\n\r\n".join(blocks).encode("utf-8"),
        f"\r\n\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n",
        f"Content-Transfer-Encoding: {_cte(header_part)}\r\n\r\n".encode(),
        header_part,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    content = b"".join(body)
    headers.append(f"Content-Transfer-Encoding: {_cte(content)}")
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + content


def _cte(data: bytes) -> str:
    return "7bit" if data.isascii() else "8bit"
