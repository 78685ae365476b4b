"""The submission role: authenticated sending (STARTTLS / implicit TLS), and ``submit`` for webmail.

Rules (one ``SubmissionPolicy`` for SMTP and the webmail API):

- AUTH PLAIN and LOGIN are offered and accepted only over TLS (``538 5.7.11`` without it);
  without AUTH nothing is accepted: ``530 5.7.0`` (STARTTLS first / authentication required).
- The envelope sender and every From header address must be the user's own address or one
  of the addresses delivered to the user (aliases, ``+detail``): else ``553 5.7.1``.
- The header is read whole (up to ``max_header_size``, else ``552 5.3.4``) by the one header
  parser (``mailgw.mime.headers``, as IMAP ENVELOPE and the recipient's view use it), and
  every originator decision is made on that parse. Refused with ``550 5.7.1``: a line in
  the header that is not a field (no colon, bad name) or a field name followed by blanks
  before its colon (``From : x``: parsers disagree on both); more than one From, Sender or
  Reply-To field; a From with several mailboxes without a Sender (RFC 5322 3.6.2); a
  Sender with other than one mailbox; a From or Sender mailbox the user does not own
  (``553 5.7.1``); a From without a mailbox (groups, empty: ``550 5.6.0``). Reply-To may
  name any address (replies going elsewhere is a legitimate use) but only once.
- A node that cannot send outside (``[relay] enabled = no``) refuses a recipient in another
  domain at RCPT with ``554 5.7.1`` (Postfix's "Relay access denied": the same refusal it
  gives a client not allowed to relay), rather than accepting mail that could only bounce.
- Per user: at most ``max_recipients`` per message (``452 4.5.3``) and
  ``max_messages_per_hour`` messages in a sliding hour (``450 4.7.1``).
- ``Message-ID`` and ``Date`` are added when missing; a Received header (``ESMTPSA``) first.
- The message is spooled like any other: local delivery stores local copies and hands the
  other recipients to the relay (which DKIM-signs for domains with a key).
"""

from __future__ import annotations

import email.utils
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config.schema import SubmissionConfig
from mailgw.directory.penalty import AuthGuard, failure_delay, local_auth_guard
from mailgw.interfaces import IDirectory, IIncomingMessage, ISpool
from mailgw.mime.addresses import MISSING_DOMAIN, MISSING_MAILBOX, parse_address_list
from mailgw.mime.headers import parse_header_block, unfold
from mailgw.model import Address, AddressError, Envelope
from mailgw.model.address import quote_local
from mailgw.model.reply import R, Reply
from mailgw.smtp.protocol import Limits, ReplyResult, Role, Session, SMTPFactory
from mailgw.smtp.roles.mx import postmaster_address
from mailgw.smtp.trace import received_header

log = Logger(namespace="mailgw.submission")

MAX_HEADER_BYTES = 1024 * 1024
"""Default largest header section (``[submission] max_header_size``); all of it is checked."""

MAX_HEADER_FIELDS = 100_000
"""Fields indexed per header (a 1 MiB header holds at most ~350,000 three-byte lines)."""


class SubmissionError(Exception):
    """``submit`` refused the message; ``reply`` says why (as SMTP would)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.format())
        self.reply = reply


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

    def commit(self, envelope: Envelope) -> Deferred[str]:
        self.finish()
        if isinstance(envelope, Envelope):
            envelope.size = int(self.incoming.size)  # headers may have been added
        return self.incoming.commit(envelope)

    def abort(self) -> None:
        self.incoming.abort()


class SubmissionRole(Role):
    """SMTP hooks of the submission role (see the module docstring)."""

    def __init__(
        self,
        spool: ISpool,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        policy: SubmissionPolicy,
        auth_failure_delay: float = 2.0,
        auth: AuthGuard | None = None,
    ) -> None:
        super().__init__(spool)
        self.directory = directory
        self.hostname = hostname
        self.clock = clock
        self.policy = policy
        self.auth_failure_delay = auth_failure_delay
        self.auth = (
            auth if auth is not None else local_auth_guard(directory, clock, auth_failure_delay)
        )

    def extensions(self, session: Session) -> list[str]:
        return ["AUTH PLAIN LOGIN"] if session.tls and session.authenticated is None else []

    def auth_start(self, session: Session, mechanism: str) -> Reply | None:
        if session.authenticated is not None:
            return R.AUTH_ALREADY
        if not session.tls:
            return R.AUTH_NEEDS_TLS
        return None

    def authenticate(self, session: Session, authzid: str, user: str, password: str) -> ReplyResult:
        if authzid and authzid.lower() != user.lower():
            return self._failed(R.AUTH_FAILED)

        def ok(account: Any) -> Reply:
            session.authenticated = str(getattr(account, "name", user))
            return R.AUTH_OK

        def failed(failure: Failure) -> Reply | Deferred[Reply]:
            if not failure.check(LoginFailed):
                log.failure("{sid} AUTH: directory error", failure, sid=session.session_id)
            return self._failed(R.AUTH_FAILED, failure_delay(failure, self.auth_failure_delay))

        d: Deferred[Any] = self.auth.check_password(user, password, session.client_ip)
        return d.addCallbacks(ok, failed)

    def _failed(self, reply: Reply, delay: float | None = None) -> Deferred[Reply]:
        if delay is None:
            delay = self.auth_failure_delay
        if delay <= 0:
            return succeed(reply)
        return deferLater(self.clock, delay, lambda: reply)

    def mail_from(self, session: Session, sender: Address | None) -> ReplyResult:
        user = session.authenticated
        if user is None:
            return R.AUTH_REQUIRED if session.tls else R.STARTTLS_FIRST
        refusal = self.policy.rate_check(user) or self.policy.sender_check(
            user, str(sender) if sender is not None else ""
        )
        return refusal or R.SENDER_OK

    def postmaster(self, session: Session) -> Address | None:
        return postmaster_address(self.directory, self.hostname)

    def rcpt_to(self, session: Session, recipient: Address) -> ReplyResult:
        if session.authenticated is None:
            return R.AUTH_REQUIRED
        if len(session.recipients) >= self.policy.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        return self.policy.recipient_check(recipient) or R.RECIPIENT_OK

    def begin_message(self, session: Session) -> IIncomingMessage:
        sender = str(session.sender) if session.sender is not None else ""
        return HeaderCompleter(  # type: ignore[return-value]
            self.spool.begin(), self.policy, sender, self.policy.max_header_size
        )

    def data_header(self, session: Session, queue_id: str) -> bytes:
        return received_header(
            helo=session.helo or "",
            client_ip=session.client_ip,
            hostname=self.hostname,
            protocol=session.protocol_name,
            queue_id=queue_id,
            recipients=[str(r) for r in session.recipients],
            when=self.clock.seconds(),
        )

    def data_end(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> ReplyResult:
        user = session.authenticated
        if user is None:  # pragma: no cover - MAIL already required it
            return R.AUTH_REQUIRED
        if isinstance(incoming, HeaderCompleter):
            incoming.finish()
            refusal = self.policy.header_check(user, incoming.facts)
            if refusal is not None:
                log.info(
                    "{sid} {qid}: refused for {user}: {reply}",
                    sid=session.session_id,
                    qid=incoming.queue_id,
                    user=user,
                    reply=refusal.format(),
                )
                return refusal
        return R.OK

    def message_committed(self, session: Session, envelope: Envelope) -> None:
        if session.authenticated is not None:
            self.policy.count(session.authenticated)


def submit(
    policy: SubmissionPolicy, spool: ISpool, user: str, envelope: Envelope, message: bytes
) -> Deferred[str]:
    """Queue ``message`` for ``user`` (already authenticated, e.g. by the webmail) with the
    same checks as SMTP submission; fires with the queue ID or fails with SubmissionError."""
    refusal = policy.rate_check(user) or policy.sender_check(user, envelope.sender)
    if refusal is None and not envelope.recipients:
        refusal = R.NEED_RCPT
    if refusal is None and len(envelope.recipients) > policy.max_recipients:
        refusal = R.TOO_MANY_RECIPIENTS
    if refusal is None:
        for rcpt in envelope.recipients:
            try:
                refusal = policy.recipient_check(Address.parse(rcpt))
            except AddressError:
                refusal = R.BAD_RECIPIENT_SYNTAX
            if refusal is not None:
                break
    if refusal is not None:
        return _fail(refusal)
    incoming = spool.begin()
    wrapper = HeaderCompleter(incoming, policy, envelope.sender, policy.max_header_size)
    now = policy.clock.seconds()
    received = (
        f"Received: by {policy.hostname} (mailgw) with webmail id {incoming.queue_id}"
        f" (authenticated user {user});\r\n\t{email.utils.formatdate(now, localtime=True)}\r\n"
    )
    wrapper.write(received.encode())
    wrapper.write(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    wrapper.finish()
    refusal = policy.header_check(user, wrapper.facts)
    if refusal is not None:
        wrapper.abort()
        return _fail(refusal)
    envelope.protocol = "webmail"
    envelope.received_at = now if not envelope.received_at else envelope.received_at
    d: Deferred[str] = wrapper.commit(envelope)

    def done(queue_id: str) -> str:
        policy.count(user)
        log.info(
            "{qid}: submitted by {user} via webmail message-id={msgid}",
            qid=queue_id,
            user=user,
            msgid=incoming.message_id or "-",
        )
        return queue_id

    return d.addCallback(done)


def _fail(reply: Reply) -> Deferred[str]:
    d: Deferred[str] = Deferred()
    d.errback(SubmissionError(reply))
    return d


def limits_from_config(config: SubmissionConfig) -> Limits:
    return Limits(
        max_message_size=config.max_message_size,
        max_line_length=config.max_line_length,
        max_errors=config.max_errors,
        soft_error_limit=config.soft_error_limit,
        error_delay=config.error_delay,
        idle_timeout=config.idle_timeout,
        session_timeout=config.session_timeout,
        max_connections=config.max_connections,
        max_connections_per_ip=config.max_connections_per_ip,
        command_timeout=config.command_timeout,
        min_data_rate=config.min_data_rate,
        stress_idle_timeout=config.stress_idle_timeout,
    )


class SubmissionFactory(SMTPFactory):
    """The factory the service listens with for the submission role (``implicit_tls`` for
    the 465-style listener, whose connections the listener already wrapped in TLS)."""

    def __init__(
        self,
        config: SubmissionConfig,
        hostname: str,
        spool: ISpool,
        directory: IDirectory,
        reactor: IReactorTime,
        tls_options: Any = None,
        implicit_tls: bool = False,
        auth_failure_delay: float = 2.0,
        policy: SubmissionPolicy | None = None,
        can_send_outside: bool = True,
        auth: AuthGuard | None = None,
    ) -> None:
        self.policy = policy or SubmissionPolicy(
            directory,
            hostname,
            reactor,
            config.max_recipients,
            config.max_messages_per_hour,
            config.max_header_size,
            can_send_outside,
        )
        role = SubmissionRole(
            spool,
            directory,
            hostname,
            reactor,
            self.policy,
            auth_failure_delay=auth_failure_delay,
            auth=auth,
        )
        super().__init__(role, hostname, limits_from_config(config), reactor, tls_options)
        self.implicit_tls = implicit_tls
        self.config = config
