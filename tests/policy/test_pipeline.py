"""The Pipeline: checks by stage, in order, stopping at the first reject/tempfail, collecting
annotations into the transaction's outcome; synchronous unless a check is not."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.model import Address
from mailgw.model.reply import R
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy import CheckContext, ICheck, Pipeline, Stage, refusal_at_end
from mailgw.policy.mx import mx_checks
from mailgw.policy.submission import SubmissionPolicy, submission_checks
from tests.smtp.fakes import default_directory


@implementer(ICheck)
class Scripted:
    """Answers ``answer`` (a Verdict, a Deferred, or a callable of the context) and records
    each call in ``log``."""

    def __init__(
        self, name: str, stages: set[Stage], answer: Any, log: list[tuple[str, Stage]]
    ) -> None:
        self.name = name
        self.stages = frozenset(stages)
        self.answer = answer
        self.log = log

    def check(self, context: CheckContext) -> Any:
        self.log.append((self.name, context.stage))
        return self.answer(context) if callable(self.answer) else self.answer


def test_checks_run_by_stage_in_order() -> None:
    log: list[tuple[str, Stage]] = []
    p = Pipeline(
        [
            Scripted("a", {Stage.MAIL, Stage.DATA}, ACCEPT, log),
            Scripted("b", {Stage.RCPT}, ACCEPT, log),
            Scripted("c", {Stage.MAIL}, ACCEPT, log),
            Scripted("d", {Stage.CONNECT}, ACCEPT, log),
        ]
    )
    ctx = CheckContext()
    for stage in Stage:
        assert p.run(stage, ctx) == ACCEPT
    assert log == [
        ("d", Stage.CONNECT),
        ("a", Stage.MAIL),
        ("c", Stage.MAIL),
        ("b", Stage.RCPT),
        ("a", Stage.DATA),
    ]
    assert [c.name for c in p.checks_for(Stage.MAIL)] == ["a", "c"]


def test_the_first_refusal_stops_the_stage() -> None:
    log: list[tuple[str, Stage]] = []
    refusal = Verdict.tempfail(R.RATE_LIMITED)
    p = Pipeline(
        [
            Scripted("tag", {Stage.MAIL}, Verdict.add_headers(("X-A", "1")), log),
            Scripted("rate", {Stage.MAIL}, refusal, log),
            Scripted("never", {Stage.MAIL}, Verdict.reject(R.UNKNOWN_USER), log),
        ]
    )
    ctx = CheckContext()
    assert p.run(Stage.MAIL, ctx) is refusal
    assert [name for name, _ in log] == ["tag", "rate"]
    assert ctx.decided_by == "rate"
    assert ctx.outcome == ACCEPT  # a refused stage adds nothing to the transaction


def test_annotations_are_collected_over_the_stages() -> None:
    log: list[tuple[str, Stage]] = []
    p = Pipeline(
        [
            Scripted("dnsbl", {Stage.CONNECT}, Verdict.add_headers(("X-Listed", "no")), log),
            Scripted("class", {Stage.MAIL}, Verdict.set_class("bulk"), log),
            Scripted(
                "rcpt",
                {Stage.RCPT},
                lambda c: (
                    Verdict.reject(R.UNKNOWN_USER)
                    if c.recipient.local == "gone"
                    else Verdict.reroute("sdn")
                ),
                log,
            ),
            Scripted("spam", {Stage.DATA}, Verdict.set_class("spam"), log),
        ]
    )
    ctx = CheckContext()
    p.run(Stage.CONNECT, ctx)
    p.run(Stage.MAIL, ctx)
    ctx.recipient = Address("gone", "example.test")
    assert p.run(Stage.RCPT, ctx).is_final
    assert ctx.outcome.channel is None  # the refused recipient's stage left nothing
    ctx.recipient = Address("bob", "example.test")
    assert p.run(Stage.RCPT, ctx) == Verdict.reroute("sdn")
    assert ctx.decided_by == ""
    p.run(Stage.DATA, ctx)
    assert ctx.outcome.headers == (("X-Listed", "no"),)
    assert ctx.outcome.message_class == "spam" and ctx.outcome.channel == "sdn"


def test_synchronous_checks_give_a_plain_verdict_and_deferred_ones_a_deferred() -> None:
    log: list[tuple[str, Stage]] = []
    later: defer.Deferred[Verdict] = defer.Deferred()
    p = Pipeline(
        [
            Scripted("sync", {Stage.RCPT}, Verdict.add_headers(("X-1", "a")), log),
            Scripted("async", {Stage.RCPT}, later, log),
            Scripted("after", {Stage.RCPT}, Verdict.add_headers(("X-3", "c")), log),
        ]
    )
    ctx = CheckContext()
    result = p.run(Stage.RCPT, ctx)
    assert isinstance(result, defer.Deferred)
    assert [n for n, _ in log] == ["sync", "async"]  # waits before going on
    box: list[Verdict] = []
    result.addCallback(box.append)
    later.callback(Verdict.add_headers(("X-2", "b")))
    assert [n for n, _ in log] == ["sync", "async", "after"]
    assert box[0].headers == (("X-1", "a"), ("X-2", "b"), ("X-3", "c"))
    assert ctx.outcome.headers == box[0].headers


def test_a_deferred_refusal_stops_the_stage() -> None:
    log: list[tuple[str, Stage]] = []
    p = Pipeline(
        [
            Scripted("async", {Stage.DATA}, defer.succeed(Verdict.reject(R.NO_FROM)), log),
            Scripted("never", {Stage.DATA}, ACCEPT, log),
        ]
    )
    box: list[Verdict] = []
    ctx = CheckContext()
    result = p.run(Stage.DATA, ctx)
    assert isinstance(result, defer.Deferred)
    result.addCallback(box.append)
    assert box == [Verdict.reject(R.NO_FROM)] and [n for n, _ in log] == ["async"]
    assert ctx.decided_by == "async"


def test_errors_propagate_to_the_caller() -> None:
    def boom(_: CheckContext) -> Verdict:
        raise RuntimeError("lookup failed")

    log: list[tuple[str, Stage]] = []
    with pytest.raises(RuntimeError):
        Pipeline([Scripted("boom", {Stage.MAIL}, boom, log)]).run(Stage.MAIL, CheckContext())
    failing = Pipeline([Scripted("f", {Stage.MAIL}, defer.fail(OSError("down")), log)])
    result = failing.run(Stage.MAIL, CheckContext())
    assert isinstance(result, defer.Deferred)
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert failures[0].check(OSError)
    with pytest.raises(TypeError):  # a check must answer a Verdict
        Pipeline([Scripted("bad", {Stage.MAIL}, R.OK, log)]).run(Stage.MAIL, CheckContext())


def test_checks_are_validated_when_the_pipeline_is_built() -> None:
    with pytest.raises(TypeError):
        Pipeline([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        Pipeline([Scripted("none", set(), ACCEPT, [])])
    with pytest.raises(ValueError):
        Pipeline([Scripted("str", {"mail"}, ACCEPT, [])])  # type: ignore[arg-type]


def test_refusal_at_end() -> None:
    ctx = CheckContext()
    assert refusal_at_end(ACCEPT, ctx) is None
    assert refusal_at_end(Verdict.reject(R.NO_FROM), ctx) is R.NO_FROM
    ctx.outcome = Verdict.quarantine("virus")
    assert refusal_at_end(ACCEPT, ctx) is R.LOCAL_ERROR  # no quarantine store: not delivered


def test_the_builtin_checks_provide_icheck() -> None:
    from twisted.internet.task import Clock

    policy = SubmissionPolicy(default_directory(), "smtp.example.test", Clock())
    checks = submission_checks(policy) + mx_checks(default_directory(), 10)
    for check in checks:
        assert verifyObject(ICheck, check)
    assert [c.name for c in submission_checks(policy)] == [
        "rate-limit",
        "sender-ownership",
        "recipient-limit",
        "submission-recipient",
        "header",
    ]


@pytest.mark.parametrize(
    ("recipient", "before", "reply"),
    [
        ("alice@example.test", 0, None),
        ("nobody@example.test", 0, R.UNKNOWN_USER),
        ("x@far.example", 0, R.RELAY_DENIED),
        ("alice@example.test", 2, R.TOO_MANY_RECIPIENTS),
    ],
)
def test_mx_checks(recipient: str, before: int, reply: Any) -> None:
    p = Pipeline(mx_checks(default_directory(), 2))
    ctx = CheckContext(recipients=[Address("bob", "example.test")] * before)
    ctx.recipient = Address.parse(recipient)
    verdict = p.run(Stage.RCPT, ctx)
    assert verdict == (ACCEPT if reply is None else Verdict.refuse(reply))
    assert ctx.decided_by == (
        ""
        if reply is None
        else p.checks_for(Stage.RCPT)[0 if reply is R.TOO_MANY_RECIPIENTS else 1].name
    )


def test_a_quarantine_gets_the_name_of_its_check() -> None:
    log: list[tuple[str, Stage]] = []
    p = Pipeline(
        [
            Scripted("scanner", {Stage.DATA}, Verdict.quarantine("x"), log),
            Scripted("other", {Stage.DATA}, Verdict.quarantine("y", "named"), log),
        ]
    )
    ctx = CheckContext()
    v = p.run(Stage.DATA, ctx)
    assert v.rule == "scanner" and ctx.outcome.rule == "scanner" and ctx.outcome.reason == "x"
    assert refusal_at_end(v, ctx) == R.LOCAL_ERROR
    assert refusal_at_end(v, ctx, can_quarantine=True) is None
