"""The submission role: authenticated sending (STARTTLS / implicit TLS).

The SMTP side of submission; what a user may send is ``mailgw.policy.submission`` (one
``SubmissionPolicy`` and one ``Pipeline`` of its checks, shared with the webmail's
``mailgw.policy.submit``), run by ``CheckedRole`` at MAIL, RCPT and the end of DATA:

- AUTH PLAIN and LOGIN are offered and accepted only over TLS (``538 5.7.11`` without it);
  without AUTH nothing is accepted: ``530 5.7.0`` (STARTTLS first / authentication required)
  and no check runs.
- Sender and From ownership, the header rules, recipients (local ones must exist; other
  domains need the relay: ``554 5.7.1`` without it), ``max_recipients`` (``452 4.5.3``) and
  ``max_messages_per_hour`` (``450 4.7.1``): the policy's checks.
- ``Message-ID`` and ``Date`` are added when missing (``HeaderCompleter``); a Received
  header (``ESMTPSA``) first.
- The message is spooled like any other: local delivery stores local copies and hands the
  other recipients to the relay (which DKIM-signs for domains with a key).
"""

from __future__ import annotations

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
from mailgw.model import Address, Envelope
from mailgw.model.reply import R, Reply
from mailgw.net import sasl
from mailgw.policy.pipeline import Pipeline
from mailgw.policy.submission import HeaderCompleter, SubmissionPolicy, submission_pipeline
from mailgw.smtp.protocol import Limits, ReplyResult, Session, SMTPFactory
from mailgw.smtp.roles.checked import CheckedRole
from mailgw.smtp.roles.mx import postmaster_address
from mailgw.smtp.trace import received_header

__all__ = ["SubmissionFactory", "SubmissionPolicy", "SubmissionRole", "limits_from_config"]

log = Logger(namespace="mailgw.submission")


class SubmissionRole(CheckedRole):
    """SMTP hooks of the submission role (see the module docstring)."""

    protocol = "submission"
    name = "submission"

    def __init__(
        self,
        spool: ISpool,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        policy: SubmissionPolicy,
        auth_failure_delay: float = 2.0,
        auth: AuthGuard | None = None,
        pipeline: Pipeline | None = None,
        quarantine: Any = None,
    ) -> None:
        super().__init__(
            spool, pipeline if pipeline is not None else submission_pipeline(policy), quarantine
        )
        self.directory = directory
        self.hostname = hostname
        self.clock = clock
        self.policy = policy
        self.auth_failure_delay = auth_failure_delay
        self.auth = (
            auth if auth is not None else local_auth_guard(directory, clock, auth_failure_delay)
        )

    def extensions(self, session: Session) -> list[str]:
        if session.authenticated is None and sasl.TLS_ONLY.allows(session.tls):
            return [" ".join(["AUTH", *sasl.SMTP.mechanisms])]
        return []

    def auth_start(self, session: Session, mechanism: str) -> Reply | None:
        if session.authenticated is not None:
            return R.AUTH_ALREADY
        if not sasl.TLS_ONLY.allows(session.tls):
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

        d: Deferred[Any] = self.auth.check_password(
            user, password, session.client_ip, protocol="submission"
        )
        return d.addCallbacks(ok, failed)

    def _failed(self, reply: Reply, delay: float | None = None) -> Deferred[Reply]:
        if delay is None:
            delay = self.auth_failure_delay
        if delay <= 0:
            return succeed(reply)
        return deferLater(self.clock, delay, lambda: reply)

    def mail_from(self, session: Session, sender: Address | None) -> ReplyResult:
        if session.authenticated is None:
            return R.AUTH_REQUIRED if session.tls else R.STARTTLS_FIRST
        return self.check_mail(session, sender)

    def postmaster(self, session: Session) -> Address | None:
        return postmaster_address(self.directory, self.hostname)

    def rcpt_to(self, session: Session, recipient: Address) -> ReplyResult:
        if session.authenticated is None:
            return R.AUTH_REQUIRED
        return self.check_rcpt(session, recipient)

    def begin_message(self, session: Session) -> IIncomingMessage:
        sender = str(session.sender) if session.sender is not None else ""
        return self.wrap(
            HeaderCompleter(self.spool.begin(), self.policy, sender, self.policy.max_header_size)
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
            client_name=session.client_name,
        ) + self.added_headers(session)

    def data_end(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> ReplyResult:
        user = session.authenticated
        if user is None:  # pragma: no cover - MAIL already required it
            return R.AUTH_REQUIRED

        def logged(reply: Reply) -> Reply:
            if not reply.is_positive:
                log.info(
                    "{sid} {qid}: refused for {user}: {reply}",
                    sid=session.session_id,
                    qid=incoming.queue_id,
                    user=user,
                    reply=reply.format(),
                )
            return reply

        result = self.check_data(session, incoming, envelope)
        if isinstance(result, Deferred):
            return result.addCallback(logged)
        return logged(result)

    def message_committed(self, session: Session, envelope: Envelope) -> None:
        if session.authenticated is not None:
            self.policy.count(session.authenticated)


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
        pipeline: Pipeline | None = None,
        quarantine: Any = None,
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
            pipeline=pipeline,
            quarantine=quarantine,
        )
        super().__init__(role, hostname, limits_from_config(config), reactor, tls_options)
        self.submission_role = role
        self.implicit_tls = implicit_tls
        self.config = config

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``mailgw.config.reload``): ``[submission]`` limits for new
        sessions; the policy's recipient, rate and header limits; the failed-login delay."""
        sub = config.submission
        self.config = sub
        self.limits = limits_from_config(sub)
        self.policy.max_recipients = sub.max_recipients
        self.policy.max_messages_per_hour = sub.max_messages_per_hour
        self.policy.max_header_size = sub.max_header_size
        self.submission_role.auth_failure_delay = config.directory.auth_failure_delay
