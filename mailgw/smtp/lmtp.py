"""LMTP server (RFC 2033) of backend nodes: gateways deliver their users' mail here.

The SMTP state machine of ``mailgw.smtp.protocol`` with LMTP's differences:

- ``LHLO`` instead of ``EHLO``/``HELO`` (those are ``500``); the greeting says LMTP;
- after the message's final dot there is one reply *per accepted recipient*, in RCPT order,
  and a ``250`` is sent for a recipient only once its copy is written and fsynced into its
  mailbox (``IMessageStore.deliver``, which returns after the fsync of the file and of its
  folder); a failing copy gets its own ``452``/``451`` (the gateway keeps that recipient
  queued and retries) or ``550`` (no such user), the others still ``250``;
- nothing is queued on the backend: the message is held in a temporary file only while the
  copies are written;
- only peers in ``[lmtp] trusted`` (the gateways) may connect; no AUTH, no STARTTLS.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.interfaces import IIncomingMessage, InvalidMailbox, QuotaExceeded
from mailgw.model import Address, Envelope
from mailgw.model.reply import R, Reply
from mailgw.runtime.threads import Runner, run_inline
from mailgw.smtp.protocol import (
    _COMMAND,
    Limits,
    Role,
    Session,
    SMTPFactory,
    SMTPServer,
    _peer_ip,
)

log = Logger(namespace="mailgw.lmtp")

DELIVERED = Reply(250, "2.1.5", "Delivered")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
OVER_QUOTA = Reply(452, "4.2.2", "Mailbox full")
STORE_FAILED = Reply(451, "4.3.0", "Mailbox temporarily unavailable")
UNSTORABLE = Reply(550, "5.1.3", "The mailbox name cannot be stored")
NOT_TRUSTED = Reply(554, "5.7.1", "Not allowed to use LMTP here")
NO_EHLO = Reply(500, "5.5.1", "This is LMTP: use LHLO")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")


def delivery_prefix(sender: str, user: str) -> bytes:
    """``Return-Path`` and ``Delivered-To`` put before the stored copy (as local delivery)."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {user}\r\n".encode()


class LMTPRole(Role):
    """Recipients are local users; ``deliver_all`` stores one copy per recipient."""

    name = "lmtp"

    def __init__(
        self,
        spool: Any,
        store: Any,
        directory: Any,
        tmp_dir: str,
        run: Runner = run_inline,
        max_recipients: int = 1000,
    ) -> None:
        super().__init__(spool)
        self.store = store
        self.directory = directory
        self.tmp_dir = tmp_dir
        self.run = run
        self.max_recipients = max_recipients

    def _users(self, address: str) -> list[str]:
        return [u for u in self.directory.resolve(address) if self.directory.get_user(u)]

    def rcpt_to(self, session: Session, recipient: Address) -> Any:
        if len(session.recipients) >= self.max_recipients:
            return TOO_MANY_RECIPIENTS
        d = self.run(self._users, str(recipient))
        return d.addCallback(lambda users: R.RECIPIENT_OK if users else NO_SUCH_USER)

    def deliver_all(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> Deferred[list[Reply]]:
        """One reply per recipient of ``envelope`` (in order), after the copies are stored."""
        return self.run(self._deliver_all, incoming, envelope)

    def _deliver_all(self, incoming: IIncomingMessage, envelope: Envelope) -> list[Reply]:
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="lmtp-", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out, incoming.open_content() as src:
                while chunk := src.read(1 << 16):
                    out.write(chunk)
            return [self._deliver_one(path, envelope, r) for r in envelope.recipients]
        finally:
            os.unlink(path)
            incoming.abort()

    def _deliver_one(self, path: str, envelope: Envelope, rcpt: str) -> Reply:
        qid = envelope.queue_id
        try:
            users = self._users(rcpt)
        except Exception:
            log.failure("{qid} lookup of <{rcpt}> failed", qid=qid, rcpt=rcpt)
            return STORE_FAILED
        if not users:
            return NO_SUCH_USER
        for user in users:
            try:
                uid = self.store.deliver(user, path, delivery_prefix(envelope.sender, user))
            except QuotaExceeded:
                log.warn("{qid} <{rcpt}> -> {user}: over quota", qid=qid, rcpt=rcpt, user=user)
                return OVER_QUOTA
            except InvalidMailbox:
                return UNSTORABLE
            except OSError as e:
                log.error("{qid} <{rcpt}> -> {user}: {e}", qid=qid, rcpt=rcpt, user=user, e=e)
                return STORE_FAILED
            log.info(
                "{qid} delivered from=<{sender}> to=<{rcpt}> user={user} uid={uid} via LMTP",
                event="delivered",
                qid=qid,
                sender=envelope.sender,
                rcpt=rcpt,
                user=user,
                uid=uid,
            )
        return DELIVERED


class LMTPServer(SMTPServer):
    """One LMTP session (see the module docstring)."""

    greeting = "LMTP mailgw"
    role: LMTPRole
    factory: LMTPFactory | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for verb in ("EHLO", "HELO", "STARTTLS", "AUTH", "XCLIENT"):
            self._handlers.pop(verb, None)
        self._handlers["LHLO"] = self._do_ehlo
        self._handlers["EHLO"] = self._do_not_ehlo
        self._handlers["HELO"] = self._do_not_ehlo

    def connectionMade(self) -> None:
        peer = _peer_ip(self.transport.getPeer())
        trusted = self.factory.trusted if self.factory is not None else ()
        if not _in_networks(peer, trusted):
            log.warn("LMTP connection from untrusted {peer} refused", peer=peer)
            self._send(NOT_TRUSTED)
            self._closed = True
            self.transport.loseConnection()
            return
        super().connectionMade()

    def _do_not_ehlo(self, argument: str) -> None:
        self._reply(NO_EHLO, verb="EHLO")

    def _end_of_data(self) -> None:
        d = self._data
        if d.too_long or d.too_big or d.nul:
            count = len(self.session.recipients)
            reply = (
                R.MESSAGE_TOO_BIG if d.too_big else R.NUL_IN_DATA if d.nul else R.DATA_LINE_TOO_LONG
            )
            text = reply.text.format(limit=self.limits.max_line_length) if d.too_long else None
            self._mode = _COMMAND
            self._abort_incoming()
            self.session.reset_transaction()
            for _ in range(count - 1):
                self._send(reply, text)
            self._reply(reply, text, verb="DATA")
            return
        super()._end_of_data()

    def _commit(self, incoming: IIncomingMessage, envelope: Envelope, reply: Reply) -> None:
        s = self.session
        count = len(envelope.recipients)
        s.reset_transaction()
        if not reply.is_positive:
            self._abort_incoming()
            for _ in range(count - 1):
                self._send(reply)
            self._reply(reply, verb="DATA")
            return
        self._incoming = None  # the delivery owns it now (and removes it)
        answers: list[Reply] = []

        def delivered(replies: list[Reply]) -> Reply:
            answers.extend(replies)
            self._accepted += 1
            return replies[-1] if replies else R.OK

        def failed(failure: Failure) -> Reply:
            log.failure("{sid} LMTP delivery failed", failure, sid=s.session_id)
            answers.extend([STORE_FAILED] * count)
            return STORE_FAILED

        def start() -> Deferred[Reply]:
            return self.role.deliver_all(s, incoming, envelope).addCallbacks(delivered, failed)

        def then(_: Reply) -> None:
            for answer in answers[:-1]:
                self._send(answer)
            if answers:
                self._reply(answers[-1], verb="DATA")

        self._call(start, then, "LMTP delivery")


def _in_networks(ip_text: str, networks: Sequence[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class LMTPFactory(SMTPFactory):
    """LMTP sessions for the ``[lmtp]`` listeners (see the module docstring)."""

    def __init__(
        self,
        role: LMTPRole,
        hostname: str,
        limits: Limits,
        reactor: IReactorTime,
        trusted: Sequence[Any] = (),
    ) -> None:
        super().__init__(role, hostname, limits, reactor)
        self.trusted = tuple(trusted)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        protocol = LMTPServer(self.role, self.hostname, self.limits, self.reactor, None)
        protocol.factory = self
        return protocol
