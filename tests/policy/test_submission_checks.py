"""The submission checks as ICheck implementations, on their own (the SMTP and webmail tests
cover them in place): the header check also reads a message that no HeaderCompleter parsed."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailgw.model import Address
from mailgw.model.reply import R
from mailgw.model.verdict import ACCEPT, Verdict
from mailgw.policy import CheckContext, Pipeline, Stage
from mailgw.policy.submission import HeaderCheck, SubmissionPolicy, facts_of, submission_checks
from mailgw.spool import Spool
from tests.smtp.fakes import FakeDirectory


def policy(**kwargs: object) -> SubmissionPolicy:
    clock = Clock()
    clock.advance(1_700_000_000)
    directory = FakeDirectory(
        {"example.test"},
        {"alice@example.test": ["alice@example.test"], "bob@example.test": ["bob@example.test"]},
    )
    return SubmissionPolicy(directory, "smtp.example.test", clock, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "reply"),
    [
        (b"From: alice@example.test\r\nSubject: s\r\n\r\nbody\r\n", None),
        (b"From: bob@example.test\r\n\r\nbody\r\n", R.FROM_NOT_OWNED),
        (b"From: alice@example.test\r\nFrom: alice@example.test\r\n\r\nx\r\n", R.DUPLICATE_FROM),
        (b"From: alice@example.test\r\nSubject: no body\r\n", None),
        (b"Subject: none\r\n\r\nFrom: alice@example.test\r\n", R.NO_FROM),
        (b"From: alice@example.test\r\nX-Big: " + b"y" * 300 + b"\r\n\r\nx\r\n", R.HEADER_TOO_BIG),
        (b"From: alice@example.test\r\nX-Big: " + b"y" * 300 + b"\r\n", R.HEADER_TOO_BIG),
    ],
)
def test_header_check_reads_a_plain_spool_message(
    tmp_path: Path, message: bytes, reply: object
) -> None:
    spool = Spool(str(tmp_path / "spool"))
    incoming = spool.begin()
    incoming.write(message)
    check = HeaderCheck(policy(max_header_size=256))
    ctx = CheckContext(user="alice@example.test", message=incoming, stage=Stage.DATA)
    assert check.check(ctx) == (ACCEPT if reply is None else Verdict.refuse(reply))  # type: ignore[arg-type]
    assert facts_of(incoming, 256).too_big == (reply is R.HEADER_TOO_BIG)
    incoming.abort()


def test_submission_checks_in_order_and_the_rate_limit_counts() -> None:
    p = policy(max_recipients=2, max_messages_per_hour=1)
    pipeline = Pipeline(submission_checks(p))
    ctx = CheckContext(user="alice@example.test", sender="alice@example.test")
    assert pipeline.run(Stage.MAIL, ctx) is ACCEPT
    ctx.sender = "bob@example.test"
    assert pipeline.run(Stage.MAIL, ctx) == Verdict.reject(R.SENDER_NOT_OWNED)
    assert ctx.decided_by == "sender-ownership"
    p.count("alice@example.test")
    assert pipeline.run(Stage.MAIL, ctx) == Verdict.tempfail(R.RATE_LIMITED)  # checked first
    assert ctx.decided_by == "rate-limit"
    ctx.recipient = Address("nobody", "example.test")
    assert pipeline.run(Stage.RCPT, ctx) == Verdict.reject(R.UNKNOWN_USER)
    ctx.recipients = [Address("a", "x.example"), Address("b", "x.example")]
    assert pipeline.run(Stage.RCPT, ctx) == Verdict.tempfail(R.TOO_MANY_RECIPIENTS)
    p.max_recipients = 3  # read at each RCPT, as the role did
    assert pipeline.run(Stage.RCPT, ctx) == Verdict.reject(R.UNKNOWN_USER)
