"""Outgoing mail as bytes: new messages, replies, reply-all and forwards (with their
attachments), and drafts; the quoted text and the recipients a reply starts with."""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
from dataclasses import dataclass, field
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage

from mailgw.model import Address, AddressError
from mailgw.webmail.message import MessageView, base_subject, format_addresses, view_text

POLICY = email.policy.SMTP.clone(max_line_length=78)


class ComposeError(ValueError):
    """The form cannot make a message (a bad address, no recipient); the text says why."""


@dataclass
class Upload:
    """An attachment to send: its name, MIME type and bytes."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class Draft:
    """What the compose form holds."""

    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    body: str = ""
    in_reply_to: str = ""
    references: str = ""
    attachments: list[Upload] = field(default_factory=list)


def parse_recipients(text: str) -> list[tuple[str, str]]:
    """(display name, address) for each recipient of a To/Cc/Bcc field (commas or
    semicolons between them); ComposeError names the first invalid one."""
    out = []
    for name, addr in email.utils.getaddresses([text.replace(";", ",")]):
        if not name and not addr:
            continue
        try:
            Address.parse(addr)
        except AddressError:
            raise ComposeError(f"not an e-mail address: {addr or name}") from None
        out.append((name, addr))
    return out


def _header_address(name: str, addr: str) -> HeaderAddress:
    local, _, domain = addr.rpartition("@")
    return HeaderAddress(display_name=name, username=local, domain=domain)


def build(
    sender: str,
    draft: Draft,
    hostname: str,
    signature: str = "",
    with_bcc: bool = False,
    now: float | None = None,
) -> tuple[bytes, list[str]]:
    """The message bytes (CRLF, RFC 2047 / 2231 encoded names, a fresh Message-ID) and the
    envelope recipients (To, Cc, Bcc). ``with_bcc`` keeps the Bcc field in the bytes (the
    Sent and Drafts copies); ComposeError for a bad address."""
    to, cc, bcc = (parse_recipients(x) for x in (draft.to, draft.cc, draft.bcc))
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _header_address("", sender)
    if to:
        msg["To"] = [_header_address(n, a) for n, a in to]
    if cc:
        msg["Cc"] = [_header_address(n, a) for n, a in cc]
    if bcc and with_bcc:
        msg["Bcc"] = [_header_address(n, a) for n, a in bcc]
    msg["Subject"] = draft.subject
    msg["Date"] = email.utils.formatdate(now, localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    if draft.in_reply_to:
        msg["In-Reply-To"] = draft.in_reply_to
    if draft.references:
        msg["References"] = draft.references
    msg["MIME-Version"] = "1.0"
    msg["User-Agent"] = "mailgw webmail"
    body = draft.body.replace("\r\n", "\n")
    if signature:
        body = body.rstrip("\n") + "\n\n-- \n" + signature.replace("\r\n", "\n") + "\n"
    msg.set_content(body, charset="utf-8", cte="quoted-printable" if not body.isascii() else "7bit")
    for up in draft.attachments:
        maintype, _, subtype = (up.content_type or "application/octet-stream").partition("/")
        if not subtype or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"
        params = {"charset": "utf-8"} if maintype == "text" and _is_utf8(up.data) else None
        msg.add_attachment(
            up.data, maintype=maintype, subtype=subtype, filename=up.filename, params=params
        )
    data = msg.as_bytes(policy=POLICY)
    return data, [a for _, a in (*to, *cc, *bcc)]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def guess_type(filename: str, given: str = "") -> str:
    """The MIME type of an upload: the browser's when it gave one, else by extension."""
    if given and "/" in given and given != "application/octet-stream":
        return given
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _quote(view: MessageView) -> str:
    who = format_addresses(view.sender) or "someone"
    text = view_text(view)
    quoted = "\n".join("> " + line for line in text.replace("\r\n", "\n").split("\n"))
    return f"\n\nOn {view.date_text or 'an unknown date'}, {who} wrote:\n{quoted}\n"


def _prefixed(prefix: str, subject: str) -> str:
    return f"{prefix}: {base_subject(subject)}" if subject else f"{prefix}:"


def reply(view: MessageView, me: str, everyone: bool) -> Draft:
    """A reply (to Reply-To, else From) or a reply to all (also To and Cc, without the user
    and without repeats), with the quoted text and the threading fields."""
    first = view.reply_to or view.sender
    to = [(n, a) for n, a in first]
    cc: list[tuple[str, str]] = []
    if everyone:
        seen = {a.lower() for _, a in to} | {me.lower()}
        for n, a in (*view.to, *view.cc):
            if a.lower() not in seen:
                seen.add(a.lower())
                cc.append((n, a))
    refs = [*view.references, view.message_id] if view.message_id else list(view.references)
    return Draft(
        to=format_addresses(to),
        cc=format_addresses(cc),
        subject=_prefixed("Re", view.subject),
        body=_quote(view),
        in_reply_to=view.message_id,
        references=" ".join(refs),
    )


def forward(view: MessageView) -> Draft:
    """A forward: the original's header summary and text; its attachments are added by the
    caller (they are read from the stored message when sending)."""
    head = (
        "\n\n---------- Forwarded message ----------\n"
        f"From: {format_addresses(view.sender)}\n"
        f"Date: {view.date_text}\n"
        f"Subject: {view.subject}\n"
        f"To: {format_addresses(view.to)}\n\n"
    )
    return Draft(subject=_prefixed("Fwd", view.subject), body=head + view_text(view))
