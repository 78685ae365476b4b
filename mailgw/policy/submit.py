"""The submit path for senders that are not SMTP: the webmail and the OA API.

``Submitter.submit(user, envelope, message)`` queues a message for a user who is already
authenticated (by the web session or an API token) with the checks of SMTP submission: the
same ``SubmissionPolicy`` and the same ``Pipeline`` (the server builds one and gives it to
both), stage by stage as an SMTP client would meet them:

1. ``CONNECT`` and ``MAIL`` stages (rate limit, sender ownership);
2. no recipient: ``503 5.5.1``; more than ``max_recipients``: ``452 4.5.3``;
3. each recipient parsed (``501 5.1.3`` if it is not an address) and run through ``RCPT``;
4. a ``Received`` header (``with <protocol>``), the header fields the stages so far added,
   then the message (line ends made CRLF) written through a ``HeaderCompleter`` into the
   spool; the ``DATA`` stage (header rules, content checks) before the commit, whose
   outcome is applied as for SMTP (``mailgw.policy.apply.PolicyMessage``: DATA-stage
   header fields, class, channel, recipient changes; a quarantined message goes to the
   ``quarantine`` store and its ID is returned like a queue ID).

It fires with the queue ID, or fails with ``SubmissionError`` whose ``reply`` is what SMTP
would have answered. This module imports nothing from ``mailgw.smtp``.
"""

from __future__ import annotations

import email.utils
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from mailgw.interfaces import ISpool
from mailgw.model import Address, AddressError, Envelope
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import Verdict
from mailgw.policy.apply import OUTBOUND, PolicyMessage
from mailgw.policy.pipeline import CheckContext, Pipeline, Stage, refusal_at_end
from mailgw.policy.submission import HeaderCompleter, SubmissionPolicy, submission_pipeline

log = Logger(namespace="mailgw.submission")


class SubmissionError(Exception):
    """``submit`` refused the message; ``reply`` says why (as SMTP would)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.format())
        self.reply = reply


class Submitter:
    """Queues messages of authenticated users through the submission checks."""

    def __init__(
        self,
        policy: SubmissionPolicy,
        spool: ISpool,
        pipeline: Pipeline | None = None,
        protocol: str = "webmail",
        quarantine: Any = None,
    ) -> None:
        self.policy = policy
        self.spool = spool
        self.pipeline = pipeline if pipeline is not None else submission_pipeline(policy)
        self.protocol = protocol
        self.quarantine = quarantine
        """The ``QuarantineStore`` for quarantined messages (None: refused with 451)."""

    def submit(
        self,
        user: str,
        envelope: Envelope,
        message: bytes,
        protocol: str | None = None,
        client_ip: str = "",
    ) -> Deferred[str]:
        """Queue ``message`` for ``user`` (see the module docstring). ``envelope`` gets
        ``protocol``, ``received_at`` (when unset), ``queue_id`` and ``size``."""
        d: Deferred[str] = self._submit(
            user, envelope, message, protocol or self.protocol, client_ip
        )
        return d

    @inlineCallbacks
    def _submit(
        self, user: str, envelope: Envelope, message: bytes, protocol: str, client_ip: str
    ) -> Generator[Any, Any, str]:
        policy, pipeline = self.policy, self.pipeline
        context = CheckContext(
            protocol=protocol, client_ip=client_ip, user=user, sender=envelope.sender
        )
        for stage in (Stage.CONNECT, Stage.MAIL):
            _refuse((yield pipeline.run(stage, context)))
        if not envelope.recipients:
            raise SubmissionError(R.NEED_RCPT)
        if len(envelope.recipients) > policy.max_recipients:
            raise SubmissionError(R.TOO_MANY_RECIPIENTS)
        for rcpt in envelope.recipients:
            try:
                context.recipient = Address.parse(rcpt)
            except AddressError:
                raise SubmissionError(R.BAD_RECIPIENT_SYNTAX) from None
            _refuse((yield pipeline.run(Stage.RCPT, context)))
            context.recipients.append(context.recipient)
        context.recipient = None
        incoming = self.spool.begin()
        wrapper = PolicyMessage(
            HeaderCompleter(incoming, policy, envelope.sender, policy.max_header_size),
            self.quarantine,
            OUTBOUND,
        )
        completer = wrapper.incoming
        assert isinstance(completer, HeaderCompleter)
        try:
            now = policy.clock.seconds()
            received = (
                f"Received: by {policy.hostname} (mailgw) with {protocol} id {incoming.queue_id}"
                f" (authenticated user {user});\r\n\t{email.utils.formatdate(now, localtime=True)}"
                "\r\n"
            )
            wrapper.write(received.encode() + context.outcome.header_bytes())
            written = len(context.outcome.headers)
            wrapper.write(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            completer.finish()
            envelope.protocol = protocol
            envelope.received_at = now if not envelope.received_at else envelope.received_at
            context.message, context.envelope = wrapper, envelope
            verdict = yield pipeline.run(Stage.DATA, context)
            refusal = refusal_at_end(verdict, context, self.quarantine is not None)
            if refusal is not None:
                raise SubmissionError(refusal)
            wrapper.decide(context.outcome, written)
        except BaseException:
            wrapper.abort()
            raise
        queue_id: str = yield wrapper.commit(envelope)
        policy.count(user)
        log.info(
            "{qid}: submitted by {user} via {protocol} message-id={msgid}{quarantined}",
            qid=queue_id,
            user=user,
            protocol=protocol,
            msgid=incoming.message_id or "-",
            quarantined=" (quarantined)" if wrapper.quarantined else "",
        )
        return queue_id


def _refuse(verdict: Verdict) -> None:
    if verdict.is_final and verdict.reply is not None:
        raise SubmissionError(verdict.reply)


def submit(
    policy: SubmissionPolicy,
    spool: ISpool,
    user: str,
    envelope: Envelope,
    message: bytes,
    pipeline: Pipeline | None = None,
) -> Deferred[str]:
    """``Submitter(policy, spool, pipeline).submit(user, envelope, message)``: queue a
    webmail message with the same checks as SMTP submission."""
    return Submitter(policy, spool, pipeline).submit(user, envelope, message)
