"""The reputation service and its checks: standing at MAIL, content score at DATA.

``ReputationService`` holds the ``IReputationStore`` (``store.py``), the limits
(``standing.Limits``), the content scorers (``heuristics``, optional ``rspamd``) and the
settings of ``[reputation]`` (``reconfigure`` applies a reloaded config). It gives two
checks (``checks(direction)``):

- ``StandingCheck`` (``MAIL``): the sender's standing. Outbound the authenticated user's
  (``user:``), inbound the client address's (``ip:``) and the sender domain's (``domain:``);
  an administrator's ``block`` on any of the message's subjects counts in both directions.
  ``blocked``: ``550 5.7.1``; ``limited``: at most ``limited_rate`` messages per window
  (``IRateCounter``), beyond that ``451 4.7.1``; an ``allow`` override exempts a subject;
- ``ContentCheck`` (``DATA``): the content score (heuristics, plus rspamd's score when
  ``rspamd`` is set and answers; when it does not, heuristics only, logged), recorded on every
  subject of the message with its volume (``standing.apply_event``), the queue ID linked to
  them (bounces and spam reports find them). Outbound, a score >= ``spam_threshold`` sets
  the class ``spam`` (the relay sends it through the spam route only) or, with
  ``spam_action = hold``, quarantines it; inbound, the score joins the score bands of
  ``mailgw.policy.inbound_auth`` (left in ``context.state``) or, without inbound auth,
  picks the same bands itself (Junk, quarantine, reject). An outbound message that makes
  its user's hour pass the volume baseline (``standing.is_spike``: a burst) is spam too
  (``VOLUME_SPIKE``), whatever its content.

``observe`` is a tracking listener (``Tracker.listeners``): a ``relayed`` event counts a
delivery, a ``bounced`` one bounces (and unknown recipients for ``5.1.1``), a ``rejected`` one
at ``RCPT`` with ``5.1.1`` an unknown recipient of the sender. ``report`` (the
``mailgw report`` command, the webmail's button later) moves the subjects of a message by a
spam or ham report (``ReputationService.report`` in the server: the webmail's button).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.model.reply import Reply
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy.inbound_auth import CONTENT_STATE, Scores
from mailgw.policy.pipeline import CheckContext, ICheck, Stage, VerdictResult
from mailgw.policy.reputation.heuristics import Score, score_message
from mailgw.policy.reputation.rspamd import RspamdClient, RspamdError, RspamdResult
from mailgw.policy.reputation.standing import (
    BLOCKED,
    LIMITED,
    OK,
    Limits,
    Record,
    is_spike,
    standing,
)
from mailgw.policy.reputation.store import IReputationStore

log = Logger(namespace="mailgw.policy.reputation")

Runner = Callable[..., Deferred[Any]]

BLOCKED_REPLY = Reply(550, "5.7.1", "Sender blocked: poor reputation ({subject})")
LIMITED_REPLY = Reply(451, "4.7.1", "Sender rate limited: poor reputation ({subject}), try later")
SPAM_REJECTED = "Message rejected as spam (score {score:g})"
SPAM_CLASS = "spam"
UNKNOWN_USER = re.compile(r"\b5\.1\.1\b")


@dataclass(frozen=True)
class Settings:
    """``[reputation]`` values the checks read (``from_config``)."""

    spam_threshold: float = 6.0
    spam_action: str = "class"
    url_blocklist: tuple[str, ...] = ()
    limited_count: int = 10
    limited_window: float = 3600.0
    max_scan_size: int = 10 * 1024 * 1024
    rspamd: str = ""
    rspamd_timeout: float = 10.0


def limits_from_config(r: Any) -> Limits:
    """``standing.Limits`` from a ``[reputation]`` config section."""
    return Limits(
        half_life=r.half_life,
        spike_factor=r.spike_factor,
        min_volume=r.min_volume,
        spam_points=r.spam_points,
        report_points=r.report_points,
        bounce_points=r.bounce_points,
        unknown_points=r.unknown_points,
        spike_points=r.spike_points,
        limit_score=r.limit_score,
        block_score=r.block_score,
    )


def settings_from_config(config: Any) -> Settings:
    r = config.reputation
    count, window = r.limited_rate
    return Settings(
        spam_threshold=r.spam_threshold,
        spam_action=r.spam_action,
        url_blocklist=tuple(r.url_blocklist),
        limited_count=count,
        limited_window=window,
        max_scan_size=config.policy.max_scan_size,
        rspamd=r.rspamd,
        rspamd_timeout=r.rspamd_timeout,
    )


def sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower().rstrip(".") if "@" in sender else ""


def subjects_of(context: CheckContext) -> list[str]:
    """The subjects a transaction counts for: outbound (an authenticated user) the user and
    the sender domain; inbound the client address and the sender domain. (An authenticated
    user's client address is not counted: users share NATs and the submission proxies.)"""
    out = [f"user:{context.user.lower()}"] if context.user else []
    if not context.user and context.client_ip:
        out.append(f"ip:{context.client_ip.lower()}")
    domain = sender_domain(context.sender)
    if domain:
        out.append(f"domain:{domain}")
    return out


def enforced(context: CheckContext) -> list[str]:
    """The subjects whose standing decides (see the module docstring)."""
    if context.user:
        return [f"user:{context.user.lower()}"]
    return [s for s in subjects_of(context) if not s.startswith("user:")]


def _call(value: Any) -> Deferred[Any]:
    return value if isinstance(value, Deferred) else succeed(value)


class ReputationService:
    """See the module docstring. ``run`` reads messages in the I/O pool; ``rate_counter``
    (``IRateCounter``) counts the messages of limited senders; ``inbound_bands``: the score
    bands used inbound when ``inbound_auth`` does not add the score to its own (None: it
    does)."""

    def __init__(
        self,
        store: Any,
        clock: Any,
        run: Runner,
        rate_counter: Any,
        limits: Limits | None = None,
        settings: Settings | None = None,
        authserv_id: str = "",
        inbound_bands: Scores | None = None,
        reactor: Any = None,
    ) -> None:
        if not IReputationStore.providedBy(store):
            raise TypeError(f"{store!r} does not provide IReputationStore")
        self.store = store
        self.clock = clock
        self.run = run
        self.rate_counter = rate_counter
        self.limits = limits or Limits()
        self.authserv_id = authserv_id
        self.inbound_bands = inbound_bands
        self.reactor = reactor if reactor is not None else clock
        self.rspamd: RspamdClient | None = None
        self.settings = Settings()
        self.configure(settings or Settings())

    def configure(self, settings: Settings) -> None:
        """Use ``settings`` from now on (a new rspamd client when its address changed)."""
        if settings.rspamd != (self.rspamd.address if self.rspamd else ""):
            if self.rspamd is not None:
                self.rspamd.close()
            self.rspamd = (
                RspamdClient(self.reactor, settings.rspamd, settings.rspamd_timeout)
                if settings.rspamd
                else None
            )
        if self.rspamd is not None:
            self.rspamd.timeout = settings.rspamd_timeout
        self.settings = settings

    def reconfigure(self, config: Any) -> None:
        """A reloaded config (``config.reload``): the ``[reputation]`` keys that apply live."""
        self.limits = limits_from_config(config.reputation)
        if hasattr(self.store, "limits"):
            self.store.limits = self.limits
        inner = getattr(self.store, "store", None)
        if inner is not None and hasattr(inner, "limits"):
            inner.limits = self.limits
        self.configure(settings_from_config(config))

    def now(self) -> float:
        return float(self.clock.seconds())

    def checks(self, direction: str) -> list[ICheck]:
        """The checks of ``direction`` (``inbound``: MX, ``outbound``: submission)."""
        inbound = direction == "inbound"
        return [StandingCheck(self), ContentCheck(self, inbound)]

    # -- standing ------------------------------------------------------------------------

    def records(self, subjects: list[str]) -> Deferred[list[Record]]:
        now = self.now()
        from twisted.internet.defer import gatherResults

        return gatherResults([_call(self.store.get(s, now)) for s in subjects], consumeErrors=True)

    def decide_standing(self, context: CheckContext) -> Deferred[Verdict]:
        subjects = subjects_of(context)
        chosen = enforced(context)

        def decided(records: list[Record]) -> Deferred[Verdict] | Verdict:
            worst, who = OK, ""
            for subject, record in zip(subjects, records, strict=True):
                if record.override == "block":
                    worst, who = BLOCKED, subject
                    break
                if subject not in chosen:
                    continue
                st = standing(record, self.limits)
                if st == BLOCKED or (st == LIMITED and worst == OK):
                    worst, who = st, subject
            if worst == BLOCKED:
                log.info("{sid}: {who} blocked by reputation", sid=context.session_id, who=who)
                return Verdict.reject(_fill(BLOCKED_REPLY, who))
            if worst == LIMITED:
                count = _call(
                    self.rate_counter.hit(f"reputation:{who}", self.settings.limited_window)
                )

                def counted(n: int) -> Verdict:
                    if n > self.settings.limited_count:
                        log.info(
                            "{sid}: {who} rate limited by reputation ({n} in window)",
                            sid=context.session_id,
                            who=who,
                            n=n,
                        )
                        return Verdict.tempfail(_fill(LIMITED_REPLY, who))
                    return ACCEPT

                return count.addCallback(counted)
            return ACCEPT

        d: Deferred[Verdict] = self.records(subjects).addCallback(decided)
        return d

    # -- content -------------------------------------------------------------------------

    def _read(self, content: IO[bytes]) -> bytes:
        with content:
            return content.read(self.settings.max_scan_size)

    def content_score(self, data: bytes, context: CheckContext) -> Deferred[Score]:
        """Heuristics (in the I/O pool), plus rspamd's score when it answers."""
        blocklist = self.settings.url_blocklist
        d: Deferred[Score] = self.run(score_message, data, blocklist)
        rspamd = self.rspamd
        if rspamd is None:
            return d

        def ask(score: Score) -> Deferred[Score]:
            queue_id = str(context.message.queue_id) if context.message is not None else ""
            assert rspamd is not None
            r = rspamd.check(
                data,
                ip=context.client_ip,
                helo=context.helo,
                sender=context.sender,
                recipients=[str(a) for a in context.recipients],
                user=context.user or "",
                queue_id=queue_id,
            )

            def answered(result: RspamdResult) -> Score:
                score.add(result.score, f"RSPAMD:{result.action.replace(' ', '_')}")
                return score

            def failed(f: Failure) -> Score:
                f.trap(RspamdError)
                log.warn(
                    "{sid}: rspamd {address} failed, heuristics only: {e}",
                    sid=context.session_id,
                    address=rspamd.address,
                    e=f.getErrorMessage(),
                )
                return score

            return r.addCallbacks(answered, failed)

        return d.addCallback(ask)

    def record_message(
        self, subjects: list[str], score: float, spam: bool, queue_id: str
    ) -> Deferred[list[Record]]:
        """Count one message for ``subjects`` (volume, content score, spam points); link
        ``queue_id`` to them. Fires with the records afterwards (in ``subjects`` order)."""
        now = self.now()
        event: dict[str, float] = {"message": 1, "content": score}
        if spam:
            event["spam"] = 1
            event["points"] = self.limits.spam_points
        calls: list[Deferred[Any]] = [
            maybeDeferred(_call, self.store.event(s, event, now)) for s in subjects
        ]
        if queue_id:
            calls.append(maybeDeferred(_call, self.store.link(queue_id, subjects, now)))
        from twisted.internet.defer import gatherResults

        d: Deferred[Any] = gatherResults(calls, consumeErrors=True)
        return d.addCallback(lambda results: list(results[: len(subjects)]))

    # -- outcomes (tracking listener) and reports ---------------------------------------

    def observe(self, kind: str, queue_id: str, detail: dict[str, Any]) -> None:
        """A tracking event (see the module docstring); any thread."""
        if kind not in ("relayed", "bounced", "rejected"):
            return
        if threading.current_thread() is not threading.main_thread():
            call = getattr(self.reactor, "callFromThread", None)
            if call is not None:
                call(self._observe, kind, queue_id, dict(detail))
                return
        self._observe(kind, queue_id, detail)

    def _observe(self, kind: str, queue_id: str, detail: dict[str, Any]) -> None:
        lim = self.limits
        if kind == "rejected":
            reply = str(detail.get("reply", ""))
            if (
                detail.get("stage") != "rcpt"
                or not reply.startswith("550")
                or not (UNKNOWN_USER.search(reply))
            ):
                return
            context = CheckContext(
                user=str(detail.get("user") or "") or None,
                sender=str(detail.get("sender", "")),
                client_ip=str(detail.get("client", "")),
            )
            self._add(subjects_of(context), {"unknown": 1, "points": lim.unknown_points})
            return
        if kind == "relayed":
            event: dict[str, float] = {"delivered": 1}
        else:
            n = len(detail.get("recipients") or []) or 1
            event = {"bounced": n, "points": lim.bounce_points * n}
            if UNKNOWN_USER.search(str(detail.get("reason", ""))):
                event["unknown"] = n
                event["points"] += lim.unknown_points * n
        linked = _call(self.store.linked(queue_id))
        linked.addCallback(self._add, event)
        linked.addErrback(_log_failure, queue_id)

    def report(self, queue_id: str, kind: str) -> Deferred[list[str]]:
        """A user's ``spam``/``ham`` report of the message ``queue_id`` (the webmail's
        button): fires with the subjects it moved ([] when the queue ID is unknown)."""
        event = report_event(kind, self.limits)

        def apply(subjects: list[str]) -> list[str]:
            self._add(subjects, event)
            log.info(
                "{kind} report of {qid}: {subjects}",
                kind=kind,
                qid=queue_id,
                subjects=" ".join(subjects) or "-",
            )
            return subjects

        d: Deferred[list[str]] = _call(self.store.linked(queue_id)).addCallback(apply)
        return d

    def _add(self, subjects: Iterable[str], event: dict[str, float]) -> None:
        now = self.now()
        for subject in subjects:
            d: Deferred[Any] = maybeDeferred(self._event, subject, event, now)
            d.addErrback(_log_failure, subject)

    def _event(self, subject: str, event: dict[str, float], now: float) -> Deferred[Any]:
        return _call(self.store.event(subject, event, now))


def _log_failure(f: Failure, what: str) -> None:
    log.failure("reputation: {what}", f, what=what)


def _fill(reply: Reply, subject: str) -> Reply:
    return Reply(reply.code, reply.enhanced, reply.text.format(subject=subject))


def report_event(kind: str, limits: Limits) -> dict[str, float]:
    """The event of a ``spam`` or ``ham`` report."""
    if kind == "spam":
        return {"reports_spam": 1, "points": limits.report_points}
    if kind == "ham":
        return {"reports_ham": 1, "points": -limits.report_points}
    raise ValueError(f"a report is spam or ham, not {kind!r}")


def report(store: Any, subjects: list[str], kind: str, limits: Limits, now: float) -> list[Any]:
    """Apply a ``spam``/``ham`` report to ``subjects`` of a synchronous store (the ``mailgw``
    command; the webmail calls it the same way); the records afterwards."""
    event = report_event(kind, limits)
    return [store.event(s, event, now) for s in subjects]


_RECEIVED_ID = re.compile(rb"(?im)^received:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*?\bid ([A-Za-z0-9]+)")


def queue_ids_in(message: bytes) -> list[str]:
    """The queue IDs of the ``Received`` fields of ``message``'s header section (ours say
    ``... with PROTO id QID``), first one first."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[:end]
    return [m.decode() for m in _RECEIVED_ID.findall(head)]


@implementer(ICheck)
class StandingCheck:
    """``MAIL``: the sender's reputation standing (see the module docstring)."""

    name = "reputation-standing"
    stages = frozenset({Stage.MAIL})

    def __init__(self, service: ReputationService) -> None:
        self.service = service

    def check(self, context: CheckContext) -> VerdictResult:
        return self.service.decide_standing(context)


@implementer(ICheck)
class ContentCheck:
    """``DATA``: the content score and what it decides (see the module docstring)."""

    name = "reputation"
    stages = frozenset({Stage.DATA})

    def __init__(self, service: ReputationService, inbound: bool) -> None:
        self.service = service
        self.inbound = inbound

    def check(self, context: CheckContext) -> VerdictResult:
        service = self.service
        message = context.message
        assert message is not None
        queue_id = str(message.queue_id)
        content = message.open_content()
        d: Deferred[Any] = service.run(service._read, content)
        d.addCallback(service.content_score, context)

        def scored(score: Score) -> Deferred[Verdict]:
            s = service.settings
            spam = s.spam_threshold > 0 and score.total >= s.spam_threshold
            subjects = subjects_of(context)
            recorded = service.record_message(subjects, score.total, spam, queue_id)
            return recorded.addCallback(counted, score, spam, subjects)

        def counted(
            records: list[Record], score: Score, spam: bool, subjects: list[str]
        ) -> Verdict:
            # Outbound, a user's message over the volume baseline (a burst) is spam too.
            burst = not self.inbound and any(
                subject.startswith("user:") and is_spike(record, service.limits)
                for subject, record in zip(subjects, records, strict=False)
            )
            if burst:
                score.why.append("VOLUME_SPIKE")
            verdict = self.decide(context, score, spam or burst)
            log.info(
                "{sid} {qid}: content score {score:g} ({why}): {what}",
                sid=context.session_id,
                qid=queue_id,
                score=score.total,
                why=" ".join(score.why) or "-",
                what=_describe(verdict),
            )
            return verdict

        return d.addCallback(scored)

    def decide(self, context: CheckContext, score: Score, spam: bool) -> Verdict:
        why = ",".join(score.why)[:800] or "none"
        status = f"{'Yes' if spam else 'No'}, score={score.total:.1f} tests={why}"
        headers = Verdict.add_headers(
            ("X-Spam-Score", f"{score.total:.1f}"), ("X-Spam-Status", status)
        )
        if self.inbound:
            context.state[CONTENT_STATE] = (score.total, list(score.why))
            bands = self.service.inbound_bands
            if bands is None:
                return headers  # inbound_auth adds the score to its bands
            return headers.combine(_band(score, bands))
        if not spam:
            return headers
        if self.service.settings.spam_action == "hold":
            reason = f"spam: score {score.total:g} ({why})"
            return headers.combine(Verdict.quarantine(reason, "reputation"))
        return headers.combine(Verdict.set_class(SPAM_CLASS))


def _band(score: Score, bands: Scores) -> Verdict:
    total = score.total
    if bands.reject and total >= bands.reject:
        return Verdict.reject(Reply(550, "5.7.1", SPAM_REJECTED.format(score=total)))
    if bands.quarantine and total >= bands.quarantine:
        return Verdict.quarantine(f"spam: content score {total:g} ({', '.join(score.why)})")
    if bands.junk and total >= bands.junk:
        return Verdict.file_into("Junk")
    return ACCEPT


def _describe(verdict: Verdict) -> str:
    if verdict.reply is not None:
        return verdict.reply.format()
    if verdict.is_quarantined:
        return "held"
    if verdict.message_class:
        return f"class={verdict.message_class}"
    if verdict.folder:
        return f"folder={verdict.folder}"
    return "accepted"
