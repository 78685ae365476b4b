"""Unit tests of the reputation checks: standing at MAIL (limited, blocked, overrides, the
limited rate), the content check's verdicts (class spam, hold, inbound bands or state), the
tracking listener (deliveries, bounces, unknown recipients) and reports."""

from __future__ import annotations

import email.utils
import io
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailgw.model.address import Address
from mailgw.model.verdict import ACCEPT, Disposition
from mailgw.policy.hygiene import HeaderHygieneCheck
from mailgw.policy.inbound_auth import CONTENT_STATE, Scores
from mailgw.policy.pipeline import CheckContext, Stage
from mailgw.policy.ratelimit import MemoryRateCounter
from mailgw.policy.reputation.service import (
    ContentCheck,
    ReputationService,
    Settings,
    StandingCheck,
    report,
)
from mailgw.policy.reputation.standing import Limits
from mailgw.policy.reputation.store import MemoryReputationStore
from mailgw.runtime.threads import run_inline
from mailgw.testing.deferreds import result_of


class Message:
    def __init__(self, data: bytes, queue_id: str = "QID1") -> None:
        self.data = data
        self.queue_id = queue_id
        self.size = len(data)

    def open_content(self) -> io.BytesIO:
        return io.BytesIO(self.data)


LIMITS = Limits(half_life=0, spam_points=2, limit_score=3, block_score=9, report_points=5)


def service(
    settings: Settings | None = None, bands: Scores | None = None
) -> tuple[ReputationService, MemoryReputationStore, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    store = MemoryReputationStore(LIMITS)
    s = ReputationService(
        store,
        clock,
        run_inline,
        MemoryRateCounter(clock),
        LIMITS,
        settings or Settings(spam_threshold=6, limited_count=1, limited_window=3600),
        authserv_id="mx.example.test",
        inbound_bands=bands,
    )
    return s, store, clock


def mail(headers: str = "", body: str = "hello") -> bytes:
    head = f"From: a@x.test\r\nDate: {email.utils.formatdate()}\r\nMessage-ID: <1@x>\r\n"
    return (head + headers + "\r\n" + body).encode()


def outbound(data: bytes, qid: str = "QID1") -> CheckContext:
    c = CheckContext(protocol="submission", user="a@x.test", sender="a@x.test")
    c.client_ip = "10.0.0.1"
    c.recipients = [Address.parse("b@y.example")]
    c.message = Message(data, qid)  # type: ignore[assignment]
    c.stage = Stage.DATA
    return c


def inbound(data: bytes) -> CheckContext:
    c = CheckContext(protocol="smtp", sender="s@far.example", client_ip="192.0.2.1")
    c.message = Message(data)  # type: ignore[assignment]
    c.stage = Stage.DATA
    return c


SPAMMY = "https://bit.ly/x http://bad.example/"  # 2 + 6 = 8


def test_outbound_spam_is_classed_and_counted() -> None:
    s, store, _ = service(Settings(spam_threshold=6, url_blocklist=("bad.example",)))
    check = ContentCheck(s, inbound=False)
    v = result_of(check.check(outbound(mail(body=SPAMMY))))  # type: ignore[arg-type]
    assert v.message_class == "spam" and v.disposition is Disposition.ACCEPT
    assert ("X-Spam-Score", "8.0") in v.headers
    assert store.records["user:a@x.test"].spam == 1
    assert store.records["user:a@x.test"].points == 2
    assert store.records["domain:x.test"].sent == 1
    assert "ip:10.0.0.1" not in store.records  # an authenticated user's address: not counted
    assert store.linked("QID1") == ["user:a@x.test", "domain:x.test"]
    clean = result_of(check.check(outbound(mail(), "QID2")))  # type: ignore[arg-type]
    assert clean.message_class is None and clean.headers[1][1].startswith("No, score=0.0")


def test_outbound_hold_quarantines() -> None:
    s, _, _ = service(
        Settings(spam_threshold=6, spam_action="hold", url_blocklist=("bad.example",))
    )
    v = result_of(ContentCheck(s, False).check(outbound(mail(body=SPAMMY))))  # type: ignore[arg-type]
    assert v.is_quarantined and v.rule == "reputation" and "score 8" in v.reason


def test_inbound_leaves_the_score_for_inbound_auth_or_bands_itself() -> None:
    s, store, _ = service(Settings(url_blocklist=("bad.example",)))
    c = inbound(mail(body=SPAMMY))
    v = result_of(ContentCheck(s, True).check(c))  # type: ignore[arg-type]
    assert v.folder is None and not v.is_quarantined  # inbound_auth bands it
    assert c.state[CONTENT_STATE][0] == 8
    assert store.linked("QID1") == ["ip:192.0.2.1", "domain:far.example"]
    for bands, expect in [
        (Scores(junk=3, quarantine=20, reject=30), "Junk"),
        (Scores(junk=3, quarantine=7, reject=30), "quarantine"),
        (Scores(junk=3, quarantine=7, reject=8), "reject"),
        (Scores(junk=9, quarantine=0, reject=0), "deliver"),
    ]:
        s, _, _ = service(Settings(url_blocklist=("bad.example",)), bands)
        v = result_of(ContentCheck(s, True).check(inbound(mail(body=SPAMMY))))  # type: ignore[arg-type]
        got = (
            "reject"
            if v.reply is not None
            else "quarantine"
            if v.is_quarantined
            else v.folder or "deliver"
        )
        assert got == expect
        if expect == "reject":
            assert v.reply is not None and v.reply.format().startswith("550 5.7.1")


def standing_of(s: ReputationService, context: CheckContext) -> Any:
    context.stage = Stage.MAIL
    return result_of(StandingCheck(s).check(context))  # type: ignore[arg-type]


def test_standing_limited_then_blocked_and_overrides() -> None:
    s, store, clock = service()
    user = CheckContext(protocol="submission", user="a@x.test", sender="a@x.test")
    assert standing_of(s, user) is ACCEPT
    store.event("user:a@x.test", {"points": 4}, clock.seconds())  # limited: 1 per hour
    assert standing_of(s, user) is ACCEPT
    v = standing_of(s, user)
    assert (
        v.reply.code == 451 and "rate limited" in v.reply.text and "user:a@x.test" in v.reply.text
    )
    clock.advance(3601)  # a new window
    assert standing_of(s, user) is ACCEPT
    report(store, ["user:a@x.test"], "spam", LIMITS, clock.seconds())  # 9 points
    v = standing_of(s, user)
    assert v.reply.code == 550 and v.reply.enhanced == "5.7.1"
    store.set_override("user:a@x.test", "allow")
    assert standing_of(s, user) is ACCEPT
    # A block on the sender domain counts outbound too; automatic domain standing does not.
    store.event("domain:x.test", {"points": 100}, clock.seconds())
    assert standing_of(s, user) is ACCEPT
    store.set_override("domain:x.test", "block")
    assert standing_of(s, user).reply.code == 550


def test_standing_inbound_ip_and_domain() -> None:
    s, store, clock = service()
    c = CheckContext(protocol="smtp", sender="s@far.example", client_ip="192.0.2.1")
    store.event("domain:far.example", {"points": 10}, clock.seconds())
    v = standing_of(s, c)
    assert v.reply.code == 550 and "domain:far.example" in v.reply.text
    store.set_override("domain:far.example", "allow")
    store.event("ip:192.0.2.1", {"points": 10}, clock.seconds())
    assert "ip:192.0.2.1" in standing_of(s, c).reply.text


def test_tracking_events_move_the_linked_subjects() -> None:
    s, store, clock = service()
    store.link("Q", ["user:a@x.test"], clock.seconds())
    s.observe("relayed", "Q", {"recipient": "b@y"})
    s.observe("bounced", "Q", {"recipients": ["c@y", "d@y"], "reason": "<c@y>: 550 5.1.1 no"})
    s.observe("deferred", "Q", {})
    r = store.records["user:a@x.test"]
    assert (r.delivered, r.bounced, r.unknown) == (1, 2, 2)
    assert r.points == pytest.approx(2 * LIMITS.bounce_points + 2 * LIMITS.unknown_points)
    s.observe("bounced", "unknown-qid", {"recipients": ["x@y"]})  # no link: nothing
    refused = {"stage": "rcpt", "reply": "550 5.1.1 <n@x.test>: no such user"}
    s.observe("rejected", "session:1", {**refused, "client": "192.0.2.7", "sender": "s@f.example"})
    assert store.records["ip:192.0.2.7"].unknown == 1
    assert store.records["domain:f.example"].unknown == 1
    s.observe(
        "rejected", "session:2", {**refused, "reply": "550 5.7.1 policy", "client": "1.2.3.4"}
    )
    assert "ip:1.2.3.4" not in store.records


def test_header_hygiene() -> None:
    v = HeaderHygieneCheck("MX.example.test", inbound=True).check(CheckContext())
    assert v.removals == (("authentication-results", "mx.example.test"), ("x-virus-scanned", ""))
    v = HeaderHygieneCheck("mx.example.test", inbound=False).check(CheckContext())
    assert v.removals == (("authentication-results", "mx.example.test"),)


def test_submitter_path_classes_spam_and_refuses_a_blocked_user(tmp_path: Any) -> None:
    """The non-SMTP submit path (webmail, OA API) runs the same reputation checks."""
    from mailgw.model import Envelope
    from mailgw.policy.submission import SubmissionPolicy, submission_pipeline
    from mailgw.policy.submit import SubmissionError, Submitter
    from mailgw.spool import Spool
    from tests.smtp.fakes import FakeDirectory

    s, store, clock = service(Settings(spam_threshold=6, url_blocklist=("bad.example",)))
    directory = FakeDirectory({"example.test"}, {"alice@example.test": ["alice@example.test"]})
    policy = SubmissionPolicy(directory, "mail.example.test", clock, 3, 100)
    spool = Spool(str(tmp_path / "spool"))
    submitter = Submitter(policy, spool, submission_pipeline(policy, s.checks("outbound")))
    data = b"From: alice@example.test\nSubject: s\n\nsee http://bad.example/\n"
    qid = result_of(
        submitter.submit(
            "alice@example.test", Envelope("alice@example.test", ["x@far.example"]), data
        )
    )
    queued = spool.load(qid)
    assert queued.envelope.message_class == "spam"
    assert store.linked(qid) == ["user:alice@example.test", "domain:example.test"]
    store.set_override("user:alice@example.test", "block")
    d = submitter.submit(
        "alice@example.test", Envelope("alice@example.test", ["x@far.example"]), data
    )
    failure = d.addErrback(lambda f: f.value)
    error = result_of(failure)
    assert isinstance(error, SubmissionError) and error.reply.code == 550


def test_a_users_burst_over_the_baseline_is_spam() -> None:
    limits = Limits(half_life=0, min_volume=3, spike_factor=2, spike_points=1)
    s, store, _ = service()
    s.limits = store.limits = limits
    check = ContentCheck(s, inbound=False)
    classes = [
        result_of(check.check(outbound(mail(), f"Q{i}"))).message_class  # type: ignore[arg-type]
        for i in range(5)
    ]
    assert classes == [None, None, None, "spam", "spam"]
    assert store.records["user:a@x.test"].points == 2
    assert "VOLUME_SPIKE" in result_of(check.check(outbound(mail(), "Q9"))).headers[1][1]  # type: ignore[arg-type]


def test_inbound_auth_band_adds_the_content_score() -> None:
    from mailgw.policy.inbound_auth import AuthResults, decide

    results = AuthResults(spf="softfail", header="mx.example.test; spf=softfail")
    assert decide(results, Scores(), True).folder is None  # 1 < junk 3
    v = decide(results, Scores(), True, (2.5, ["URL_SHORTENER(2)"]))
    assert v.folder == "Junk"
    v = decide(results, Scores(), True, (9.0, []))
    assert v.reply is not None and "content score 9" in v.reply.text


def test_service_report_for_the_webmail() -> None:
    s, store, clock = service()
    store.link("Q", ["user:a@x.test", "domain:x.test"], clock.seconds())
    assert result_of(s.report("Q", "spam")) == ["user:a@x.test", "domain:x.test"]
    assert store.records["user:a@x.test"].reports_spam == 1
    assert store.records["domain:x.test"].points == LIMITS.report_points
    assert result_of(s.report("nope", "ham")) == []
    with pytest.raises(ValueError):
        s.report("Q", "eggs")
