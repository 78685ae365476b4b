"""The MX role: inbound SMTP for local domains only (no relaying), and its factory."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from mailgw.config import MXConfig
from mailgw.interfaces import IDirectory, ISpool
from mailgw.model import Address
from mailgw.model.reply import R, Reply
from mailgw.smtp.protocol import Limits, Role, Session, SMTPFactory
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


class MXRole(Role):
    """Accepts mail from anyone (null sender included) for existing local recipients only.

    Recipient local parts are never interpreted for routing (``%``, ``!``, quoted ``@``): they
    are looked up as they are, so such forms are unknown users (550 5.1.1); a foreign domain is
    refused (550 5.7.1) whatever source route preceded it.
    """

    def __init__(
        self,
        spool: ISpool,
        directory: IDirectory,
        hostname: str,
        clock: IReactorTime,
        max_recipients: int,
    ) -> None:
        super().__init__(spool)
        self.directory = directory
        self.hostname = hostname
        self.clock = clock
        self.max_recipients = max_recipients

    def postmaster(self, session: Session) -> Address | None:
        return postmaster_address(self.directory, self.hostname)

    def rcpt_to(self, session: Session, recipient: Address) -> Reply:
        if len(session.recipients) >= self.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if not self.directory.is_local_domain(recipient.domain):
            return R.RELAY_DENIED
        if not self.directory.resolve(recipient.key):
            return R.UNKNOWN_USER
        return R.RECIPIENT_OK

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
    ) -> None:
        role = MXRole(spool, directory, hostname, reactor, config.max_recipients)
        super().__init__(role, hostname, limits_from_config(config), reactor, tls_options)
        self.config = config
