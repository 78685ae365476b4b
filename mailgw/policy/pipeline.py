"""Checks run by stage: the ``ICheck`` contract, what a check sees, and the ``Pipeline``.

A protocol (SMTP's roles, the ``submit`` path) keeps one ``CheckContext`` per message
transaction and asks its ``Pipeline`` for a ``Verdict`` at each stage:

- ``CONNECT``: who the client is (address, HELO, TLS, authenticated user). SMTP runs this
  stage at the first MAIL FROM of a session (Postfix's ``smtpd_delay_reject``), so a refusal
  answers that command and the lookups may wait on the network;
- ``MAIL``: the envelope sender;
- ``RCPT``: one recipient (``context.recipient``; ``context.recipients`` are those accepted
  before it); a refusal refuses that recipient only;
- ``DATA``: the whole message has been received (``context.message``, readable with
  ``open_content()``) and is not acknowledged yet: a refusal is the answer to the DATA.

Within a stage the checks run in the order given, each once; the first ``reject`` or
``tempfail`` stops the stage and is its result. Otherwise the stage's verdicts are combined
(``mailgw.model.verdict``) and folded into ``context.outcome``, which holds the annotations
(headers, class, channel) and any quarantine collected over the whole transaction.

A check returns a ``Verdict`` or a ``Deferred`` firing with one; the pipeline returns a plain
``Verdict`` while every check answers at once, so synchronous checks cost no Deferred. An
exception (or a failed Deferred) is not caught here: the caller answers it as a local error
(SMTP: ``451 4.3.0``).

What the end of DATA answers is ``refusal_at_end(verdict, context, can_quarantine)``: the
DATA stage's refusal, else ``451 4.3.0`` for a message some check wants quarantined when
there is no quarantine store (such a message must not be delivered as if clean), else None
(queue it). The caller applies ``context.outcome`` to the queued message through
``mailgw.policy.apply.PolicyMessage``: header fields of the stages before DATA are written
with the trace header, those of the DATA stage are put first at commit; class, channel,
folder and recipient changes go on the envelope; a quarantined message goes to the
quarantine store (``mailgw.policy.quarantine``) instead of the queue.

A quarantine verdict without a ``rule`` gets the name of the check that returned it.

``mailgw.policy`` imports no protocol: ``model``, ``interfaces``, ``mime`` and Twisted only.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from mailgw.interfaces import IIncomingMessage
from mailgw.model.address import Address
from mailgw.model.envelope import Envelope
from mailgw.model.reply import R, Reply
from mailgw.model.verdict import ACCEPT, Verdict

log = Logger(namespace="mailgw.policy")

VerdictResult = Verdict | Deferred[Verdict]


class Stage(enum.Enum):
    """Where in a transaction a check runs (in this order)."""

    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(slots=True)
class CheckContext:
    """What a check may look at; one per message transaction (see the module docstring).

    Checks read it; only the pipeline writes ``stage``, ``outcome`` and ``decided_by``.
    """

    protocol: str = "smtp"
    """How the message arrives: ``smtp`` (MX), ``submission``, ``webmail``, ``api``."""
    session_id: str = ""
    client_ip: str = ""
    helo: str = ""
    tls: bool = False
    user: str | None = None
    """The authenticated user (canonical name), None when anonymous."""
    sender: str = ""
    """The envelope sender as text (``Envelope.sender``: no angle brackets, '' for ``<>``)."""
    recipients: list[Address] = field(default_factory=list)
    """Recipients accepted so far (at ``RCPT``: before ``recipient``)."""
    recipient: Address | None = None
    """The recipient being checked (``RCPT`` only)."""
    message: IIncomingMessage | None = None
    """The received message, not yet committed (``DATA`` only)."""
    envelope: Envelope | None = None
    """The envelope about to be committed (``DATA`` only)."""
    stage: Stage = Stage.CONNECT
    outcome: Verdict = ACCEPT
    """Annotations and quarantine collected by the stages passed so far."""
    decided_by: str = ""
    """The name of the check whose reject/tempfail ended the last stage ('' if none)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-transaction scratch space of the checks, by check name (the one thing a check
    may change: e.g. what the rules decided at MAIL, read again at DATA)."""


class ICheck(Interface):
    """One policy check (a rule set, a lookup, a scanner)."""

    name = Attribute("A short name for logs and counters (str).")
    stages = Attribute("The ``Stage`` values the check runs at (a collection).")

    def check(context: CheckContext) -> VerdictResult:
        """Decide on ``context`` at ``context.stage``: a ``Verdict`` or a Deferred firing
        with one. Must not change ``context``."""


class Pipeline:
    """Ordered checks run stage by stage (see the module docstring)."""

    def __init__(self, checks: Sequence[ICheck] = ()) -> None:
        for c in checks:
            if not ICheck.providedBy(c):
                raise TypeError(f"{c!r} does not provide ICheck")
            unknown = [s for s in c.stages if not isinstance(s, Stage)]
            if unknown or not c.stages:
                raise ValueError(f"check {c.name}: stages must be Stage values, not {unknown}")
        self.checks: tuple[ICheck, ...] = tuple(checks)
        self._by_stage: dict[Stage, tuple[ICheck, ...]] = {
            stage: tuple(c for c in self.checks if stage in c.stages) for stage in Stage
        }

    def checks_for(self, stage: Stage) -> tuple[ICheck, ...]:
        return self._by_stage[stage]

    def run(self, stage: Stage, context: CheckContext) -> VerdictResult:
        """The stage's verdict (a Deferred only when a check answered with one)."""
        context.stage = stage
        context.decided_by = ""
        checks = self._by_stage[stage]
        return self._run(checks, 0, ACCEPT, context) if checks else ACCEPT

    def _run(
        self, checks: tuple[ICheck, ...], start: int, verdict: Verdict, context: CheckContext
    ) -> VerdictResult:
        for i in range(start, len(checks)):
            result = checks[i].check(context)
            if result is ACCEPT:  # the common answer: nothing to combine
                continue
            if isinstance(result, Deferred):
                d: Deferred[Verdict] = result.addCallback(self._resume, checks, i, verdict, context)
                return d
            verdict = self._add(verdict, result, checks[i], context)
            if verdict.is_final:
                return verdict
        if verdict is not ACCEPT:
            context.outcome = context.outcome.combine(verdict)
        return verdict

    def _resume(
        self,
        result: Verdict,
        checks: tuple[ICheck, ...],
        i: int,
        verdict: Verdict,
        context: CheckContext,
    ) -> VerdictResult:
        verdict = self._add(verdict, result, checks[i], context)
        if verdict.is_final:
            return verdict
        return self._run(checks, i + 1, verdict, context)

    @staticmethod
    def _add(verdict: Verdict, result: object, check: ICheck, context: CheckContext) -> Verdict:
        if not isinstance(result, Verdict):
            raise TypeError(f"check {check.name} returned {result!r}, not a Verdict")
        if result.is_final:
            context.decided_by = str(check.name)
        elif result.is_quarantined and not result.rule:
            result = replace(result, rule=str(check.name))
        return verdict.combine(result)


def refusal_at_end(
    verdict: Verdict, context: CheckContext, can_quarantine: bool = False
) -> Reply | None:
    """The answer to a received message after its ``DATA`` stage: the stage's refusal, a
    local error (``451 4.3.0``) for a quarantine that cannot be kept (``can_quarantine``
    false: no quarantine store), or None to take it (queue or quarantine it)."""
    if verdict.is_final:
        return verdict.reply
    if context.outcome.is_quarantined and not can_quarantine:
        log.warn(
            "{sid}: quarantine requested ({reason}) but no quarantine store: refused for now",
            sid=context.session_id,
            reason=context.outcome.reason,
        )
        return R.LOCAL_ERROR
    return None
