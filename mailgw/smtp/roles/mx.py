"""The MX role: inbound SMTP for local domains only (no relaying), and its factory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mailgw.config import MXConfig
from mailgw.interfaces import IDirectory, IIncomingMessage, ISpool
from mailgw.model import Address, Envelope
from mailgw.policy.mx import mx_checks
from mailgw.policy.pipeline import ICheck, Pipeline
from mailgw.smtp.protocol import Limits, ReplyResult, Session, SMTPFactory
from mailgw.smtp.roles.checked import CheckedRole
from mailgw.smtp.trace import received_header


def limits_from_config(config: MXConfig) -> Limits:
    """The protocol limits of an ``[mx]`` section."""
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


def postmaster_address(directory: IDirectory, hostname: str) -> Address | None:
    """What ``RCPT TO:<Postmaster>`` (no domain, RFC 5321 4.5.1) stands for:
    ``postmaster@`` the local domain that is this host's name or its nearest parent, else
    the first local domain; the directory then resolves it like any ``postmaster@``
    (``[server] postmaster``). None when there is no local domain."""
    domains = directory.list_domains()
    if not domains:
        return None
    labels = hostname.lower().rstrip(".").split(".")
    parents = (".".join(labels[i:]) for i in range(len(labels)))
    domain = next((d for d in parents if d in domains), domains[0])
    return Address("postmaster", domain)


class MXRole(CheckedRole):
    """Accepts mail from anyone (null sender included) for existing local recipients only:
    the checks of ``mailgw.policy.mx`` (the default), followed by ``extra_checks``."""

    name = "mx"

    def __init__(
        self,
        spool: ISpool,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        max_recipients: int,
        extra_checks: Sequence[ICheck] = (),
        quarantine: Any = None,
    ) -> None:
        super().__init__(
            spool, Pipeline([*mx_checks(directory, max_recipients), *extra_checks]), quarantine
        )
        self.directory = directory
        self.hostname = hostname
        self.clock = clock
        self.max_recipients = max_recipients
        self.durable: Callable[[str], Deferred[Any]] | None = None
        """Set for synchronous replication: what ``250`` waits for (``after_commit``)."""

    def after_commit(self, session: Session, queue_id: str) -> Deferred[Any] | None:
        return None if self.durable is None else self.durable(queue_id)

    def postmaster(self, session: Session) -> Address | None:
        return postmaster_address(self.directory, self.hostname)

    def mail_from(self, session: Session, sender: Address | None) -> ReplyResult:
        return self.check_mail(session, sender)

    def rcpt_to(self, session: Session, recipient: Address) -> ReplyResult:
        return self.check_rcpt(session, recipient)

    def data_end(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> ReplyResult:
        return self.check_data(session, incoming, envelope)

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


class MXFactory(SMTPFactory):
    """The factory the service listens with for the MX role."""

    def __init__(
        self,
        config: MXConfig,
        hostname: str,
        spool: ISpool,
        directory: IDirectory,
        reactor: IReactorTime,
        tls_options: Any = None,
        extra_checks: Sequence[ICheck] = (),
        quarantine: Any = None,
    ) -> None:
        role = MXRole(
            spool, directory, hostname, reactor, config.max_recipients, extra_checks, quarantine
        )
        super().__init__(role, hostname, limits_from_config(config), reactor, tls_options)
        self.config = config

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``mailgw.config.reload``): ``[mx]`` limits for new sessions."""
        self.config = config.mx
        self.limits = limits_from_config(config.mx)
