"""The submission role: authenticated sending (STARTTLS / implicit TLS), and ``submit`` for webmail.

Rules (one ``SubmissionPolicy`` for SMTP and the webmail API):

- AUTH PLAIN and LOGIN are offered and accepted only over TLS (``538 5.7.11`` without it);
  without AUTH nothing is accepted: ``530 5.7.0`` (STARTTLS first / authentication required).
- The envelope sender and every From header address must be the user's own address or one
  of the addresses delivered to the user (aliases, ``+detail``): else ``553 5.7.1``.
- Per user: at most ``max_recipients`` per message (``452 4.5.3``) and
  ``max_messages_per_hour`` messages in a sliding hour (``450 4.7.1``).
- ``Message-ID`` and ``Date`` are added when missing; a Received header (``ESMTPSA``) first.
- The message is spooled like any other: local delivery stores local copies and hands the
  other recipients to the relay (which DKIM-signs for domains with a key).
"""

from __future__ import annotations

import email.utils
from collections import deque
from email.parser import BytesHeaderParser
from email.policy import compat32
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
from mailgw.model import Address, AddressError, Envelope
from mailgw.model.reply import R, Reply
from mailgw.smtp.protocol import Limits, ReplyResult, Role, Session, SMTPFactory
from mailgw.smtp.trace import received_header

log = Logger(namespace="mailgw.submission")

MAX_HEADER_BYTES = 256 * 1024
"""Header section size up to which headers are inspected (From) and completed (Message-ID)."""


class SubmissionError(Exception):
    """``submit`` refused the message; ``reply`` says why (as SMTP would)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.format())
        self.reply = reply


def header_facts(header_block: bytes) -> tuple[list[str], bool, bool, bool]:
    """(From addresses, has From, has Message-ID, has Date) of a header section."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(header_block)
    froms = headers.get_all("From") or []
    addresses = [a for _, a in email.utils.getaddresses([str(f) for f in froms]) if a]
    return addresses, bool(froms), "Message-ID" in headers, "Date" in headers


class SubmissionPolicy:
    """Ownership checks, limits and header completion shared by SMTP and ``submit``."""

    def __init__(
        self,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        max_recipients: int = 100,
        max_messages_per_hour: int = 200,
    ) -> None:
        self.directory = directory
        self.hostname = hostname
        self.clock = clock
        self.max_recipients = max_recipients
        self.max_messages_per_hour = max_messages_per_hour
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

    def sender_check(self, user: str, sender: str) -> Reply | None:
        if not sender or not self.owns(user, sender):
            return R.SENDER_NOT_OWNED
        return None

    def header_check(self, user: str, from_addresses: list[str], has_from: bool) -> Reply | None:
        if not has_from or not from_addresses:
            return R.NO_FROM
        if not all(self.owns(user, a) for a in from_addresses):
            return R.FROM_NOT_OWNED
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
    """An ``IIncomingMessage`` wrapper: holds the header section back until it is complete,
    notes its From addresses, and adds ``Message-ID``/``Date`` when missing."""

    def __init__(self, incoming: IIncomingMessage, policy: SubmissionPolicy, sender: str) -> None:
        self.incoming = incoming
        self.policy = policy
        self.sender = sender
        self.queue_id: str = incoming.queue_id
        self._head = b""
        self._passing = False
        self.from_addresses: list[str] = []
        self.has_from = False

    @property
    def size(self) -> int:
        return int(self.incoming.size) + len(self._head)

    def write(self, data: bytes) -> None:
        if self._passing:
            self.incoming.write(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            head, rest = self._head[: end + 2], self._head[end + 2 :]
            self._head = b""
            self._release(head, rest)
        elif len(self._head) > MAX_HEADER_BYTES:
            head, self._head = self._head, b""
            self._release(head, b"", complete=False)

    def _release(self, head: bytes, rest: bytes, complete: bool = True) -> None:
        self._passing = True
        self.from_addresses, self.has_from, has_id, has_date = header_facts(head)
        added = self.policy.missing_headers(has_id, has_date, self.sender) if complete else b""
        self.incoming.write(head + added + rest)

    def finish(self) -> None:
        """End of data: a message without a body still gets its headers completed."""
        if not self._passing:
            head, self._head = self._head, b""
            if head and not head.endswith(b"\r\n"):
                head += b"\r\n"
            self._release(head, b"\r\n")

    def commit(self, envelope: object) -> object:
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

    def rcpt_to(self, session: Session, recipient: Address) -> ReplyResult:
        if session.authenticated is None:
            return R.AUTH_REQUIRED
        if len(session.recipients) >= self.policy.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if self.directory.is_local_domain(recipient.domain) and not self.directory.resolve(
            recipient.key
        ):
            return R.UNKNOWN_USER
        return R.RECIPIENT_OK

    def begin_message(self, session: Session) -> IIncomingMessage:
        sender = str(session.sender) if session.sender is not None else ""
        return HeaderCompleter(self.spool.begin(), self.policy, sender)  # type: ignore[return-value]

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
            refusal = self.policy.header_check(user, incoming.from_addresses, incoming.has_from)
            if refusal is not None:
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
                Address.parse(rcpt)
            except AddressError:
                refusal = R.BAD_RECIPIENT_SYNTAX
                break
    if refusal is not None:
        return _fail(refusal)
    incoming = spool.begin()
    wrapper = HeaderCompleter(incoming, policy, envelope.sender)
    now = policy.clock.seconds()
    received = (
        f"Received: by {policy.hostname} (mailgw) with webmail id {incoming.queue_id}"
        f" (authenticated user {user});\r\n\t{email.utils.formatdate(now, localtime=True)}\r\n"
    )
    wrapper.write(received.encode())
    wrapper.write(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    wrapper.finish()
    refusal = policy.header_check(user, wrapper.from_addresses, wrapper.has_from)
    if refusal is not None:
        wrapper.abort()
        return _fail(refusal)
    envelope.protocol = "webmail"
    envelope.received_at = now if not envelope.received_at else envelope.received_at
    d: Deferred[str] = wrapper.commit(envelope)  # type: ignore[assignment]

    def done(queue_id: str) -> str:
        policy.count(user)
        log.info("{qid}: submitted by {user} via webmail", qid=queue_id, user=user)
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
        auth: AuthGuard | None = None,
    ) -> None:
        self.policy = policy or SubmissionPolicy(
            directory, hostname, reactor, config.max_recipients, config.max_messages_per_hour
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
