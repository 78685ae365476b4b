"""Trace information the SMTP server adds to messages: the ``Received:`` header (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils
import re

MAX_HELO_IN_HEADER = 255
_CLEAN_HELO_RE = re.compile(r"[!-'*-:<-~]+")  # printable ASCII without "(", ")" and ";"
_date_cache: tuple[int, str] = (-1, "")


def with_protocol(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` keyword of RFC 3848 / RFC 6531: SMTP, ESMTP[S][A], UTF8SMTP[S][A]."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def _clean_helo(helo: str) -> str:
    """The HELO argument reduced to printable ASCII without header-breaking characters."""
    if len(helo) <= MAX_HELO_IN_HEADER and _CLEAN_HELO_RE.fullmatch(helo):
        return helo
    cleaned = "".join(c if "!" <= c <= "~" and c not in "();" else "?" for c in helo)
    return cleaned[:MAX_HELO_IN_HEADER] or "unknown"


def _ip_literal(ip: str) -> str:
    if not ip:
        return "unknown"
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    when: float,
    client_name: str = "",
) -> bytes:
    """A folded ``Received:`` header line (CRLF-terminated, UTF-8 bytes).

    No reverse DNS is done: the client is written as ``(unknown [IP])``, or ``(NAME [IP])``
    with the host name a trusted proxy passed (XCLIENT NAME). The ``for`` clause
    appears only with exactly one recipient (more would disclose the other recipients).
    """
    lines = [
        f"Received: from {_clean_helo(helo)}"
        f" ({_clean_helo(client_name) if client_name else 'unknown'} {_ip_literal(client_ip)})",
        f"\tby {hostname} (mailgw) with {protocol} id {queue_id}",
    ]
    date = _date(when)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _date(when: float) -> str:
    """``email.utils.formatdate(when, localtime=True)``, computed once per second (it drops
    the fraction, and the local time zone costs most of a header's time)."""
    global _date_cache
    second = int(when // 1)
    cached_second, text = _date_cache
    if second != cached_second:
        text = email.utils.formatdate(second, localtime=True)
        _date_cache = (second, text)
    return text
