"""The submission policy: what an authenticated user may send, shared by every way in.

One ``SubmissionPolicy`` serves SMTP submission (``mailgw.smtp.roles.submission``) and the
``submit`` path (``mailgw.policy.submit``: the webmail and the OA API), through the same
``ICheck`` implementations in the same order:

- ``MAIL``: ``RateLimit`` (``max_messages_per_hour`` in a sliding hour: ``450 4.7.1``), then
  ``SenderOwnership`` (the envelope sender must be the user's own address or one delivered
  to the user, an alias or ``+detail``: else ``553 5.7.1``);
- ``RCPT``: ``RecipientLimit`` (``max_recipients``: ``452 4.5.3``), then
  ``SubmissionRecipient`` (a local recipient must exist, ``550 5.1.1``; a node that cannot
  send outside, ``[relay] enabled = no``, refuses other domains with ``554 5.7.1``, Postfix's
  "Relay access denied", rather than accepting mail that could only bounce);
- ``DATA``: ``HeaderCheck``. The header is read whole (up to ``max_header_size``, else
  ``552 5.3.4``) by the one header parser (``mailgw.mime.headers``, as IMAP ENVELOPE and the
  recipient's view use it), and every originator decision is made on that parse. Refused
  with ``550 5.7.1``: a line in the header that is not a field (no colon, bad name) or a
  field name followed by blanks before its colon (``From : x``: parsers disagree on both);
  more than one From, Sender or Reply-To field; a From with several mailboxes without a
  Sender (RFC 5322 3.6.2); a Sender with other than one mailbox; a From or Sender mailbox
  the user does not own (``553 5.7.1``); a From without a mailbox (groups, empty:
  ``550 5.6.0``). Reply-To may name any address (replies going elsewhere is a legitimate
  use) but only once.

``HeaderCompleter`` wraps the message being received: it holds the header section back until
it is complete, parses it once (``facts``) and adds ``Message-ID`` and ``Date`` when missing.
"""

from __future__ import annotations

import email.utils
import io
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailgw.interfaces import IDirectory, IIncomingMessage
from mailgw.mime.addresses import MISSING_DOMAIN, MISSING_MAILBOX, parse_address_list
from mailgw.mime.headers import parse_header_block, unfold
from mailgw.model import Address, AddressError, Envelope
from mailgw.model.address import quote_local
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy.pipeline import CheckContext, ICheck, Pipeline, Stage

MAX_HEADER_BYTES = 1024 * 1024
"""Default largest header section (``[submission] max_header_size``); all of it is checked."""

MAX_HEADER_FIELDS = 100_000
"""Fields indexed per header (a 1 MiB header holds at most ~350,000 three-byte lines)."""


@dataclass
class HeaderFacts:
    """What the submission policy needs from a header section, from the one parser."""

    malformed: int = 0
    """Lines that are not fields, and field names with blanks before the colon."""
    from_fields: list[list[str] | None] = field(default_factory=list)
    """Per From field: its mailboxes as ``local@domain``, None when one is not a mailbox
    (a group, a missing local part or domain)."""
    sender_fields: list[list[str] | None] = field(default_factory=list)
    reply_to_fields: int = 0
    has_message_id: bool = False
    has_date: bool = False
    too_big: bool = False


def _mailboxes(value: bytes) -> list[str] | None:
    """The mailboxes of an address-list value, None when an item is not a plain mailbox."""
    out = []
    for item in parse_address_list(unfold(value)):
        if item.host in (None, MISSING_DOMAIN) or item.mailbox in (None, MISSING_MAILBOX):
            return None  # a group marker, or a mailbox without local part or domain
        try:
            local, host = item.mailbox.decode("utf-8"), item.host.decode("utf-8")
        except UnicodeDecodeError:
            return None
        out.append(f"{quote_local(local)}@{host}")
    return out


def header_facts(head: bytes) -> HeaderFacts:
    """Parse a header section (CRLF lines, without the empty line) with ``mailgw.mime``."""
    block = parse_header_block(head, 0, len(head), MAX_HEADER_FIELDS)
    facts = HeaderFacts(malformed=len(block.malformed) + int(block.truncated))
    if block.body_start == 0 and head:
        facts.malformed += 1  # the first line is not a field: nothing here is a header
    for f in block.fields:
        if head[f.start + len(f.name) : f.start + len(f.name) + 1] != b":":
            facts.malformed += 1  # ``From : x``, obsolete syntax that parsers read differently
        key = f.key
        if key == b"from":
            facts.from_fields.append(_mailboxes(f.value))
        elif key == b"sender":
            facts.sender_fields.append(_mailboxes(f.value))
        elif key == b"reply-to":
            facts.reply_to_fields += 1
        elif key == b"message-id":
            facts.has_message_id = True
        elif key == b"date":
            facts.has_date = True
    return facts


class SubmissionPolicy:
    """Ownership checks, limits and header completion shared by SMTP and ``submit``."""

    def __init__(
        self,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        max_recipients: int = 100,
        max_messages_per_hour: int = 200,
        max_header_size: int = MAX_HEADER_BYTES,
        can_send_outside: bool = True,
    ) -> None:
        self.directory = directory
        self.can_send_outside = can_send_outside
        self.hostname = hostname
        self.clock = clock
        self.max_recipients = max_recipients
        self.max_messages_per_hour = max_messages_per_hour
        self.max_header_size = max_header_size
        self._sent: dict[str, deque[float]] = {}

    def owns(self, user: str, address: str) -> bool:
        """Whether ``address`` is ``user``'s own or is delivered to ``user`` (an alias)."""
        try:
            key = Address.parse(address).key
        except AddressError:
            return False
        if key == user.lower():
            return True
        return user in self.directory.resolve(key)

    def rate_check(self, user: str) -> Reply | None:
        window = self._sent.get(user)
        if window is None:
            return None
        now = self.clock.seconds()
        while window and window[0] <= now - 3600:
            window.popleft()
        return R.RATE_LIMITED if len(window) >= self.max_messages_per_hour else None

    def count(self, user: str) -> None:
        self._sent.setdefault(user, deque()).append(self.clock.seconds())

    def recipient_check(self, recipient: Address) -> Reply | None:
        """A recipient this node can deliver or send: local ones must exist, others need
        the relay."""
        if self.directory.is_local_domain(recipient.domain):
            return None if self.directory.resolve(recipient.key) else R.UNKNOWN_USER
        return None if self.can_send_outside else R.RELAY_OFF

    def sender_check(self, user: str, sender: str) -> Reply | None:
        if not sender or not self.owns(user, sender):
            return R.SENDER_NOT_OWNED
        return None

    def header_check(self, user: str, facts: HeaderFacts) -> Reply | None:
        """The originator rules of the module docstring, first failing rule's reply."""
        if facts.too_big:
            return R.HEADER_TOO_BIG
        if facts.malformed:
            return R.HEADER_MALFORMED
        if not facts.from_fields:
            return R.NO_FROM
        if len(facts.from_fields) > 1:
            return R.DUPLICATE_FROM
        if len(facts.sender_fields) > 1:
            return R.DUPLICATE_SENDER
        if facts.reply_to_fields > 1:
            return R.DUPLICATE_REPLY_TO
        froms = facts.from_fields[0]
        if not froms:
            return R.NO_FROM
        if not all(self.owns(user, a) for a in froms):
            return R.FROM_NOT_OWNED
        if facts.sender_fields:
            senders = facts.sender_fields[0]
            if senders is None or len(senders) != 1:
                return R.SENDER_HEADER_INVALID
            if not self.owns(user, senders[0]):
                return R.SENDER_HEADER_NOT_OWNED
        elif len(froms) > 1:
            return R.SENDER_HEADER_REQUIRED
        return None

    def missing_headers(self, has_message_id: bool, has_date: bool, sender: str) -> bytes:
        """``Message-ID`` and ``Date`` lines to add (CRLF-terminated)."""
        lines = b""
        if not has_date:
            lines += (
                f"Date: {email.utils.formatdate(self.clock.seconds(), localtime=True)}\r\n".encode()
            )
        if not has_message_id:
            domain = sender.rpartition("@")[2] or self.hostname
            lines += f"Message-ID: {email.utils.make_msgid(domain=domain)}\r\n".encode()
        return lines


@implementer(IIncomingMessage)
class HeaderCompleter:
    """An ``IIncomingMessage`` wrapper: holds the header section back until it is complete
    (at most ``max_header_size`` bytes), parses it (``facts``), and adds ``Message-ID`` /
    ``Date`` when missing."""

    def __init__(
        self,
        incoming: IIncomingMessage,
        policy: SubmissionPolicy,
        sender: str,
        max_header_size: int = MAX_HEADER_BYTES,
    ) -> None:
        self.incoming = incoming
        self.policy = policy
        self.sender = sender
        self.max_header_size = max_header_size
        self.queue_id: str = incoming.queue_id
        self._head = bytearray()
        self._passing = False
        self.facts = HeaderFacts()

    @property
    def size(self) -> int:
        return int(self.incoming.size) + len(self._head)

    @property
    def message_id(self) -> str:
        """The Message-ID as queued (the client's, or the one added here)."""
        return str(self.incoming.message_id)

    def write(self, data: bytes) -> None:
        if self._passing:
            self.incoming.write(data)
            return
        held = self._head
        searched = max(0, len(held) - 3)  # linear: only new bytes (and 3 before) are searched
        held += data
        end = held.find(b"\r\n\r\n", searched)
        if end < 0 and len(held) <= self.max_header_size:
            return
        self._head = bytearray()
        if end >= 0 and end + 2 <= self.max_header_size:
            self._release(bytes(held[: end + 2]), bytes(held[end + 2 :]))
        else:
            # Refused at the end of DATA: stop holding (and parsing) it.
            self._passing = True
            self.facts = HeaderFacts(too_big=True)
            self.incoming.write(bytes(held))

    def _release(self, head: bytes, rest: bytes) -> None:
        self._passing = True
        self.facts = facts = header_facts(head)
        added = self.policy.missing_headers(facts.has_message_id, facts.has_date, self.sender)
        self.incoming.write(head + added + rest)

    def finish(self) -> None:
        """End of data: a message without a body still gets its headers completed."""
        if not self._passing:
            head, self._head = bytes(self._head), bytearray()
            if head and not head.endswith(b"\r\n"):
                head += b"\r\n"
            self._release(head, b"\r\n")

    def rewrite_header(self, edit: Callable[[bytes], bytes]) -> None:
        """Completes the header section first (``finish``), then edits it."""
        self.finish()
        self.incoming.rewrite_header(edit)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        self.finish()
        envelope.size = int(self.incoming.size)  # headers may have been added
        return self.incoming.commit(envelope)

    def abort(self) -> None:
        self.incoming.abort()

    def open_content(self) -> IO[bytes]:
        """What was written so far: the bytes passed on, then those still held back (after
        ``finish``, the completed message as it will be committed)."""
        written = self.incoming.open_content()
        if not self._head:
            return written
        with written:
            return io.BytesIO(written.read() + bytes(self._head))


def facts_of(message: IIncomingMessage, max_header_size: int = MAX_HEADER_BYTES) -> HeaderFacts:
    """The header facts of a received message: those a ``HeaderCompleter`` parsed on the way
    in (after ``finish``), else parsed from what the message reads back."""
    if isinstance(message, HeaderCompleter):
        message.finish()
        return message.facts
    with message.open_content() as f:
        start = f.read(max_header_size + 2)
    end = start.find(b"\r\n\r\n")
    if end >= 0 and end + 2 <= max_header_size:
        return header_facts(start[: end + 2])
    if end < 0 and len(start) <= max_header_size:  # no body: all of it is the header
        return header_facts(start if not start or start.endswith(b"\r\n") else start + b"\r\n")
    return HeaderFacts(too_big=True)


# -- the checks ---------------------------------------------------------------------------


@implementer(ICheck)
class RateLimit:
    """``MAIL``: at most ``max_messages_per_hour`` messages per user in a sliding hour
    (counted by ``SubmissionPolicy.count`` once a message is queued)."""

    name = "rate-limit"
    stages = frozenset({Stage.MAIL})

    def __init__(self, policy: SubmissionPolicy) -> None:
        self.policy = policy

    def check(self, context: CheckContext) -> Verdict:
        refusal = self.policy.rate_check(context.user or "")
        return ACCEPT if refusal is None else Verdict.refuse(refusal)


@implementer(ICheck)
class SenderOwnership:
    """``MAIL``: the envelope sender belongs to the authenticated user."""

    name = "sender-ownership"
    stages = frozenset({Stage.MAIL})

    def __init__(self, policy: SubmissionPolicy) -> None:
        self.policy = policy

    def check(self, context: CheckContext) -> Verdict:
        refusal = self.policy.sender_check(context.user or "", context.sender)
        return ACCEPT if refusal is None else Verdict.refuse(refusal)


@implementer(ICheck)
class RecipientLimit:
    """``RCPT``: at most ``limit()`` recipients per message (``452 4.5.3``)."""

    name = "recipient-limit"
    stages = frozenset({Stage.RCPT})

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit

    def check(self, context: CheckContext) -> Verdict:
        if len(context.recipients) >= self.limit():
            return Verdict.refuse(R.TOO_MANY_RECIPIENTS)
        return ACCEPT


@implementer(ICheck)
class SubmissionRecipient:
    """``RCPT``: ``SubmissionPolicy.recipient_check``."""

    name = "submission-recipient"
    stages = frozenset({Stage.RCPT})

    def __init__(self, policy: SubmissionPolicy) -> None:
        self.policy = policy

    def check(self, context: CheckContext) -> Verdict:
        assert context.recipient is not None
        refusal = self.policy.recipient_check(context.recipient)
        return ACCEPT if refusal is None else Verdict.refuse(refusal)


@implementer(ICheck)
class HeaderCheck:
    """``DATA``: the originator rules on the header section (``header_check``)."""

    name = "header"
    stages = frozenset({Stage.DATA})

    def __init__(self, policy: SubmissionPolicy) -> None:
        self.policy = policy

    def check(self, context: CheckContext) -> Verdict:
        assert context.message is not None
        facts = facts_of(context.message, self.policy.max_header_size)
        refusal = self.policy.header_check(context.user or "", facts)
        return ACCEPT if refusal is None else Verdict.refuse(refusal)


def submission_checks(policy: SubmissionPolicy) -> list[ICheck]:
    """The checks of the submission policy, in order (see the module docstring)."""
    return [
        RateLimit(policy),
        SenderOwnership(policy),
        RecipientLimit(lambda: policy.max_recipients),
        SubmissionRecipient(policy),
        HeaderCheck(policy),
    ]


def submission_pipeline(policy: SubmissionPolicy, extra: list[ICheck] | None = None) -> Pipeline:
    """A pipeline of the submission checks followed by ``extra`` ones."""
    return Pipeline(submission_checks(policy) + list(extra or ()))
