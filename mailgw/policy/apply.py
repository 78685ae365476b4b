"""Applying a transaction's policy outcome to the message being queued (``PolicyMessage``).

The protocols (SMTP's ``CheckedRole``, the ``submit`` path) receive a message through a
``PolicyMessage`` wrapped around the spool's ``IIncomingMessage``. After the ``DATA`` stage
they hand it the transaction's outcome (``decide``); its ``commit`` then

1. edits the header section: the fields the checks asked to remove (``remove_headers``:
   forged ``Authentication-Results``, a sender's ``X-Virus-Scanned``) are taken out of the
   received header section first; the header fields the ``DATA`` stage added go first (those of
   the stages before were written with the trace header already), and each subject tag is
   put before the Subject (``tag_subject``; not twice);
2. carries the decisions on the envelope (``mailgw.model.Envelope``): ``message_class``,
   ``channel``, ``folder``; the recipients become the redirection's, then the BCC recipients
   are added;
3. commits into the spool, or, for a quarantined message when there is a quarantine store,
   into the store instead (``mailgw.policy.quarantine``): the message is taken (250), kept
   apart with its reason and rule, and not delivered.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.interfaces import IIncomingMessage
from mailgw.model import Envelope
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy.submission import HeaderCompleter

log = Logger(namespace="mailgw.policy")

INBOUND = "inbound"
OUTBOUND = "outbound"

_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*")


def direction_of(protocol: str) -> str:
    """``inbound`` for mail arriving by MX (``smtp``), ``outbound`` for what users send."""
    return INBOUND if protocol == "smtp" else OUTBOUND


def tag_subject(head: bytes, tag: str) -> bytes:
    """``head`` (a header section, CRLF lines) with ``tag`` put before the first Subject's
    value, unless the value already starts with it; a Subject holding only the tag is added
    when there is none."""
    raw = tag.encode()
    m = _SUBJECT.search(head)
    if m is None:
        return head + b"Subject: " + raw + b"\r\n"
    rest = head[m.end() :]
    if rest.startswith(raw):
        return head
    return head[: m.end()] + raw + b" " + rest


def _first_word(value: bytes) -> str:
    text = value.decode("utf-8", "replace").replace(";", " ").split()
    return text[0].lower() if text else ""


def remove_fields(head: bytes, removals: tuple[tuple[str, str], ...]) -> bytes:
    """``head`` (a header section, CRLF lines) without the fields ``removals`` name
    (``Verdict.remove_headers``: ``(name, first word)``, lower case), folded lines included."""
    if not removals:
        return head
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name, colon, value = line.partition(b":")
        dropping = False
        if colon:
            key = name.strip().decode("ascii", "replace").lower()
            for rname, word in removals:
                if key == rname and (not word or _first_word(value) == word):
                    dropping = True
                    break
        if not dropping:
            out.append(line)
    return b"\r\n".join(out)


def header_edit(
    headers: tuple[tuple[str, str], ...],
    tags: tuple[str, ...],
    removals: tuple[tuple[str, str], ...] = (),
) -> Callable[[bytes], bytes] | None:
    """The edit of the header section that removes the ``removals``, then adds ``headers``
    first and puts ``tags`` before the Subject; None when there is nothing to do."""
    if not headers and not tags and not removals:
        return None
    added = Verdict(headers=headers).header_bytes()

    def edit(head: bytes) -> bytes:
        head = remove_fields(head, removals)
        for tag in tags:
            head = tag_subject(head, tag)
        return added + head

    return edit


def apply_to_envelope(outcome: Verdict, envelope: Envelope) -> None:
    """Carry the outcome's class, channel, folder and recipient changes on ``envelope``."""
    if outcome.message_class:
        envelope.message_class = outcome.message_class
    if outcome.channel:
        envelope.channel = outcome.channel
    if outcome.folder:
        envelope.folder = outcome.folder
    if outcome.redirect:
        envelope.recipients = list(outcome.redirect)
    for address in outcome.bcc:
        if address.lower() not in (r.lower() for r in envelope.recipients):
            envelope.recipients.append(address)


@implementer(IIncomingMessage)
class PolicyMessage:
    """An ``IIncomingMessage`` whose ``commit`` applies the policy outcome (module
    docstring). ``quarantine`` is the store quarantined messages go to (a
    ``mailgw.policy.quarantine.QuarantineStore``); without one they are not accepted
    (``refusal_at_end`` answers ``451``)."""

    def __init__(
        self, incoming: IIncomingMessage, quarantine: Any = None, direction: str = INBOUND
    ) -> None:
        self.incoming = incoming
        self.quarantine = quarantine
        self.direction = direction
        self.queue_id: str = incoming.queue_id
        self.outcome: Verdict = ACCEPT
        self.new_headers: tuple[tuple[str, str], ...] = ()
        self.session_id = ""
        self.quarantined = False
        """True once ``commit`` put the message into the quarantine store."""

    @property
    def size(self) -> int:
        return int(self.incoming.size)

    @property
    def message_id(self) -> str:
        return str(self.incoming.message_id)

    def write(self, data: bytes) -> None:
        self.incoming.write(data)

    def open_content(self) -> IO[bytes]:
        content: IO[bytes] = self.incoming.open_content()
        return content

    def rewrite_header(self, edit: Callable[[bytes], bytes]) -> None:
        self.incoming.rewrite_header(edit)

    def abort(self) -> None:
        self.incoming.abort()

    def decide(self, outcome: Verdict, headers_written: int = 0, session_id: str = "") -> None:
        """The transaction's outcome after its ``DATA`` stage; the first ``headers_written``
        of its header fields are in the message already (written before the ``DATA``
        stage ran)."""
        self.outcome = outcome
        self.new_headers = outcome.headers[headers_written:]
        self.session_id = session_id

    def commit(self, envelope: Envelope) -> Deferred[str]:
        outcome = self.outcome
        edit = header_edit(self.new_headers, outcome.subject_tags, outcome.removals)
        try:
            if isinstance(self.incoming, HeaderCompleter):
                self.incoming.finish()  # the header section completed first
            if edit is not None:
                self.incoming.rewrite_header(edit)
        except OSError as e:
            log.error("{qid}: cannot add header fields: {e}", qid=self.queue_id, e=e)
            self.incoming.abort()
            return fail(e)
        apply_to_envelope(outcome, envelope)
        envelope.size = self.size
        if outcome is not ACCEPT:
            log.info(
                "{sid} {qid}: policy applied: {what}",
                sid=self.session_id or "-",
                qid=self.queue_id,
                what=describe(outcome, self.new_headers),
            )
        if outcome.is_quarantined and self.quarantine is not None:
            self.quarantined = True
            d: Deferred[str] = self.quarantine.put(
                self.incoming, envelope, outcome.reason, outcome.rule, self.direction
            )
            return d
        committed: Deferred[str] = self.incoming.commit(envelope)
        return committed


def describe(outcome: Verdict, headers: tuple[tuple[str, str], ...] | None = None) -> str:
    """A log text of what an outcome does (``quarantine=... class=spam folder=Junk``)."""
    parts = []
    if outcome.is_quarantined:
        parts.append(f"quarantine={outcome.rule or '-'} ({outcome.reason})")
    if outcome.message_class:
        parts.append(f"class={outcome.message_class}")
    if outcome.channel:
        parts.append(f"channel={outcome.channel}")
    if outcome.folder:
        parts.append(f"folder={outcome.folder}")
    if outcome.redirect:
        parts.append("redirect=" + ",".join(outcome.redirect))
    if outcome.bcc:
        parts.append("bcc=" + ",".join(outcome.bcc))
    if outcome.subject_tags:
        parts.append("subject-tag=" + " ".join(outcome.subject_tags))
    if outcome.removals:
        parts.append("removed=" + ",".join(name for name, _ in outcome.removals))
    shown = outcome.headers if headers is None else headers
    if shown:
        parts.append("headers=" + ",".join(name for name, _ in shown))
    return " ".join(parts) or "nothing"
