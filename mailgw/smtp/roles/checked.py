"""An SMTP role whose decisions come from a ``mailgw.policy.Pipeline``.

The role keeps a ``SessionChecks`` on ``Session.checks``: the session's ``CONNECT`` verdict
(run once, at the first MAIL FROM: Postfix's ``smtpd_delay_reject``, so a refusal answers a
command and lookups may wait; a refused connect stage refuses every MAIL of the session) and
the ``CheckContext`` of the current transaction, made afresh at each MAIL FROM. MAIL, RCPT and
the end of DATA run their stage; a reject or tempfail is sent as the reply, anything else is
the role's usual positive reply. Header fields added by the stages before DATA are written
after the role's own trace header.

The message is received through a ``mailgw.policy.apply.PolicyMessage`` (``wrap``): after
the DATA stage it gets the transaction's outcome, and its commit applies it (DATA-stage
header fields and subject tags, class, channel, folder, recipient changes; a quarantined
message goes to the role's ``quarantine`` store and is answered 250 like a queued one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from mailgw.interfaces import IIncomingMessage, ISpool
from mailgw.model import Address, Envelope
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import Verdict
from mailgw.policy.apply import PolicyMessage, direction_of
from mailgw.policy.pipeline import CheckContext, Pipeline, Stage, VerdictResult, refusal_at_end
from mailgw.smtp.protocol import ReplyResult, Role, Session

T = TypeVar("T")


class SessionChecks:
    """Per-session state of a ``CheckedRole`` (``Session.checks``)."""

    __slots__ = ("connect", "context")

    def __init__(self) -> None:
        self.connect: Verdict | None = None
        """The CONNECT stage's verdict, None until it has run."""
        self.context = CheckContext()


def _then(result: VerdictResult, f: Callable[[Verdict], T]) -> T | Deferred[T]:
    if isinstance(result, Deferred):
        return result.addCallback(f)
    return f(result)


class CheckedRole(Role):
    """A ``Role`` answering MAIL, RCPT and the end of DATA from its ``pipeline``."""

    protocol = "smtp"
    """``CheckContext.protocol`` of this role's transactions."""

    def __init__(self, spool: ISpool, pipeline: Pipeline, quarantine: Any = None) -> None:
        super().__init__(spool)
        self.pipeline = pipeline
        self.quarantine = quarantine
        """The ``QuarantineStore`` quarantined messages go to (None: they get 451)."""

    def wrap(self, incoming: IIncomingMessage) -> PolicyMessage:
        """``incoming`` in the wrapper that applies the policy outcome at commit."""
        return PolicyMessage(incoming, self.quarantine, direction_of(self.protocol))

    def begin_message(self, session: Session) -> IIncomingMessage:
        return self.wrap(self.spool.begin())

    @staticmethod
    def checks(session: Session) -> SessionChecks:
        state = session.checks
        if not isinstance(state, SessionChecks):
            state = session.checks = SessionChecks()
        return state

    def check_mail(self, session: Session, sender: Address | None) -> ReplyResult:
        """Run CONNECT (once per session) and MAIL for a new transaction."""
        state = self.checks(session)
        context = state.context = CheckContext(
            protocol=self.protocol,
            session_id=session.session_id,
            client_ip=session.client_ip,
            helo=session.helo or "",
            tls=session.tls,
            user=session.authenticated,
            sender=str(sender) if sender is not None else "",
            recipients=session.recipients,
        )

        def mail(connect: Verdict) -> ReplyResult:
            if state.connect is None:
                state.connect = connect if connect.is_final else context.outcome
            if state.connect.is_final:
                return _refusal(state.connect) or R.LOCAL_ERROR
            context.outcome = state.connect
            return _then(self.pipeline.run(Stage.MAIL, context), _sender_reply)

        if state.connect is not None:
            return mail(state.connect)
        connect = self.pipeline.run(Stage.CONNECT, context)
        if isinstance(connect, Deferred):
            return connect.addCallback(mail)
        return mail(connect)

    def check_rcpt(self, session: Session, recipient: Address) -> ReplyResult:
        context = self.checks(session).context
        context.recipients = session.recipients
        context.recipient = recipient
        verdict = self.pipeline.run(Stage.RCPT, context)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(_recipient_reply)
        if verdict.is_final:
            return verdict.reply or R.LOCAL_ERROR
        return R.RECIPIENT_OK

    def check_data(
        self, session: Session, incoming: IIncomingMessage, envelope: Envelope
    ) -> ReplyResult:
        context = self.checks(session).context
        context.recipient = None
        context.message, context.envelope = incoming, envelope
        written = len(context.outcome.headers)  # before DATA: with the trace header

        def answer(verdict: Verdict) -> Reply:
            context.message = None  # the context outlives the message
            policy = incoming if isinstance(incoming, PolicyMessage) else None
            can_quarantine = policy is not None and policy.quarantine is not None
            refusal = refusal_at_end(verdict, context, can_quarantine)
            if refusal is not None:
                return refusal
            if policy is not None:
                policy.decide(context.outcome, written, session.session_id)
            return R.OK

        return _then(self.pipeline.run(Stage.DATA, context), answer)

    def added_headers(self, session: Session) -> bytes:
        """Header fields the stages so far asked for (CRLF lines)."""
        state = session.checks
        return state.context.outcome.header_bytes() if isinstance(state, SessionChecks) else b""


def _refusal(verdict: Verdict) -> Reply | None:
    if not verdict.is_final:
        return None
    return verdict.reply if verdict.reply is not None else R.LOCAL_ERROR


def _sender_reply(verdict: Verdict) -> Reply:
    return _refusal(verdict) or R.SENDER_OK


def _recipient_reply(verdict: Verdict) -> Reply:
    return _refusal(verdict) or R.RECIPIENT_OK
